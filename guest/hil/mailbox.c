/* The mailbox loop and the op dispatcher (protocol: hil/abi.py module docstring). */
#include "mm.h"

volatile u8 hil_mailbox[HIL_MAILBOX_SIZE] __attribute__((section(".data.hil_mailbox"), aligned(4096)));

/* A root the guest can run on: a page in RAM whose kernel half is the kernel root's (every
 * OSTD root copies it). Loading any other into CR3 (the probes' and QEMU's view) would fault
 * the next instruction with no handler mapped: a triple fault instead of a finding. */
static bool root_runs_kernel(u64 root) {
    if (root & (PAGE_SIZE - 1) || root >= mm.ram_size)
        return false;
    const u64 *mine = pt_node(root), *kernel = pt_node(mm.kernel_root);
    for (int i = 256; i < 512; i++)
        if ((mine[i] ^ kernel[i]) & ~(PTE_A | PTE_D))  /* A / D: the CPU sets them per walk */
            return false;
    return true;
}

void hil_panic(u64 code, const char *why) {
    volatile char *msg = (volatile char *)(hil_mailbox + HIL_OFF_MESSAGE);
    int i = 0;
    for (; why[i] && i < HIL_MESSAGE_SIZE - 1; i++)
        msg[i] = why[i];
    msg[i] = 0;
    *mb_word(HIL_OFF_RESP_CODE) = code;
    *mb_word(HIL_OFF_RESP_STATUS) = HIL_STATUS_PANIC;
    serial_puts("panic: ");
    serial_puts(why);
    serial_puts("\n");
    if (op_recover_armed)
        hil_longjmp(&op_recover, 1);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static u64 op_probe(void) {
    u64 va = mb_arg(HIL_ARG_PROBE_VA), write = mb_arg(HIL_ARG_PROBE_WRITE);
    u64 value = mb_arg(HIL_ARG_PROBE_VALUE);
    if (write > 1)
        return HIL_ERR_BAD_ARG;
    volatile u64 got = 0;
    if (hil_setjmp(&probe_recover) == 0) {
        probe_armed = 1;
        smap_allow();  /* ring 0 as before SMAP: a user page is readable too */
        if (write) {
            *(volatile u64 *)va = value;
            got = value;
        } else {
            got = *(volatile u64 *)va;
        }
        smap_enforce();
        probe_armed = 0;
        mb_result(HIL_RES_PROBE_FAULTED, 0);
        mb_result(HIL_RES_PROBE_VALUE, got);
    } else {
        smap_enforce();
        mb_result(HIL_RES_PROBE_FAULTED, 1);
        mb_result(HIL_RES_PROBE_ERROR_CODE, probe_error_code);
        mb_result(HIL_RES_PROBE_CR2, probe_cr2);
    }
    return 0;
}

/* One MMU access of a probe entry: 1 no fault, 2 | error_code << 8 on a #PF; 0 (not run) for
 * a PROBE_SMAP access without SMAP (it would not see U). Without PROBE_SMAP the access runs
 * with AC set, so U plays no part in it. */
static u64 probe_access(u64 va, u64 mode, u64 *value) {
    if ((mode & HIL_PROBE_SMAP) && !cpu_smap)
        return 0;
    if (hil_setjmp(&probe_recover) != 0) {
        smap_enforce();
        return HIL_PROBE_FAULT | probe_error_code << 8;
    }
    probe_armed = 1;
    if (!(mode & HIL_PROBE_SMAP))
        smap_allow();
    if (mode & HIL_PROBE_READ)
        *value = *(volatile u64 *)va;
    if (mode & HIL_PROBE_WRITE)  /* a write that keeps the bytes (and sets D like any write) */
        __asm__ volatile("lock addq $0, (%0)" ::"r"(va) : "memory");
    if (mode & HIL_PROBE_EXEC)   /* the harness put a `ret` at va + PROBE_EXEC_OFFSET */
        __asm__ volatile("call *%0" ::"r"(va + HIL_PROBE_EXEC_OFFSET)
                         : "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory");
    smap_enforce();
    probe_armed = 0;
    return HIL_PROBE_OK;
}

/* Run the probe entries of one phase (touch: before the op, to fill the TLB; else after). */
static void run_probes(u64 n, bool touch) {
    for (u64 i = 0; i < n; i++) {
        volatile u64 *e = mb_word(HIL_OFF_PROBES + HIL_PROBE_ENTRY_SIZE * i);
        u64 va = e[0], mode = e[1], value = 0;
        if (!(mode & HIL_PROBE_TOUCH) != !touch)
            continue;
        if (touch) {
            /* fill the TLB with every permission the walk grants (a read first, then a write
             * so the entry also caches W once D is set); faults are expected for some */
            probe_access(va, HIL_PROBE_READ, &value);
            e[2] = probe_access(va, mode & (HIL_PROBE_READ | HIL_PROBE_WRITE), &value);
            if (cpu_smap) {
                /* and the TLB entries of kernel accesses with AC clear (QEMU keeps them apart
                 * from AC-set ones), so a translation that turns user keeps a stale one */
                probe_access(va, HIL_PROBE_SMAP | HIL_PROBE_READ, &value);
                probe_access(va, HIL_PROBE_SMAP | (mode & (HIL_PROBE_READ | HIL_PROBE_WRITE)), &value);
            }
        } else {
            e[2] = probe_access(va, mode, &value);
        }
        e[3] = value;
    }
}

static u64 op_raise_fault(void) {
    u64 kind = mb_arg(HIL_ARG_RAISE_FAULT_KIND);
    if (kind > 3)
        return HIL_ERR_BAD_ARG;
    switch (kind) {
    case 0:
        __asm__ volatile("ud2");
        break;
    case 1:
        (void)*(volatile u64 *)0x8000000000000000UL;  /* non-canonical: #GP */
        break;
    case 2:
        (void)*(volatile u64 *)UNMAPPED_KERNEL_VA;     /* root entry 384's L3 is empty: #PF */
        break;
    case 3:
        __asm__ volatile("xorl %%edx, %%edx; movl $1, %%eax; xorl %%ecx, %%ecx; divl %%ecx"
                         ::: "rax", "rcx", "rdx");  /* #DE */
        break;
    }
    return 0;  /* unreachable: every kind faults */
}

#if HIL_FAULT_TEST
/* Test builds only (guest/Makefile FAULT_TEST): the faults the harness must survive, from
 * inside an op. The default build has none of this. */
static void fault_test(void) {
    static u64 nr_requests;
    if (++nr_requests != HIL_FAULT_AT)
        return;
    serial_puts("fault test: injecting\n");
    if (HIL_FAULT_TEST == 1) {
        for (;;)
            __asm__ volatile("pause");  /* hangs inside the op: the stop never comes */
    } else if (HIL_FAULT_TEST == 2) {
        struct { u16 limit; u64 base; } __attribute__((packed)) none = {0, 0};
        __asm__ volatile("lidt %0; int3" ::"m"(none));  /* no IDT: #BP, #GP, #DF fail: triple fault */
    } else if (HIL_FAULT_TEST == 3) {
        op_recover_armed = 0;
        hil_panic(0, "fault test: panic outside any op recovery");
    }
}
#endif

static u64 dispatch(u64 op) {
#if HIL_FAULT_TEST
    fault_test();
#endif
    switch (op) {
    case HIL_OP_NOP:
        mb_result(HIL_RES_NOP_VALUE, mb_arg(HIL_ARG_NOP_VALUE));
        return 0;
    case HIL_OP_VM_SPACE_NEW:
    case HIL_OP_VM_SPACE_DROP:
    case HIL_OP_ACTIVATE:
        return op_vm_space(op);
    case HIL_OP_CURSOR:
    case HIL_OP_CURSOR_MUT:
    case HIL_OP_CURSOR_DROP:
    case HIL_OP_QUERY:
    case HIL_OP_FIND_NEXT:
    case HIL_OP_JUMP:
    case HIL_OP_VIRT_ADDR:
    case HIL_OP_MAP:
    case HIL_OP_UNMAP:
    case HIL_OP_PROTECT_NEXT:
        return op_cursor(op);
    case HIL_OP_FRAME_FROM_UNUSED:
    case HIL_OP_FRAME_FROM_IN_USE:
    case HIL_OP_FRAME_DROP:
    case HIL_OP_SEGMENT_FROM_UNUSED:
    case HIL_OP_SEGMENT_DROP:
    case HIL_OP_SEGMENT_SPLIT:
    case HIL_OP_SEGMENT_NEXT:
    case HIL_OP_SEGMENT_CLONE:
    case HIL_OP_SEGMENT_SLICE:
    case HIL_OP_UNIQUE_FROM_UNUSED:
    case HIL_OP_UNIQUE_DROP:
    case HIL_OP_FROM_UNIQUE:
    case HIL_OP_TRY_FROM_SHARED:
        return op_frame(op);
    case HIL_OP_PROBE:
        return op_probe();
    case HIL_OP_RAISE_FAULT:
        return op_raise_fault();
    default:
        return HIL_ERR_UNKNOWN_OP;
    }
}

static void run_op(void) {
    /* Zero the per-op response fields so stale results never look fresh. */
    for (int i = 0; i < HIL_NR_RESULTS; i++)
        mb_result(i, 0);
    *mb_word(HIL_OFF_RESP_CODE) = 0;
    *mb_word(HIL_OFF_FLUSH_LOG_LEN) = 0;
    for (u64 off = HIL_OFF_EXC_VECTOR; off <= HIL_OFF_EXC_RSP; off += 8)
        *mb_word(off) = 0;
    hil_mailbox[HIL_OFF_MESSAGE] = 0;
    *mb_word(HIL_OFF_RESP_STATUS) = HIL_STATUS_NONE;

    /* the previous request lent CR3 to the harness's QEMU oracle (OFF_VIEW_ROOT): take it back */
    static u64 view_saved_cr3;
    if (view_saved_cr3) {
        write_cr3(view_saved_cr3);
        view_saved_cr3 = 0;
    }
    u64 op = *mb_word(HIL_OFF_REQ_OP);
    /* MMU probes around the op (hil/target/abi.py OFF_PROBE_*): touch, op, probe, in this one
     * request so nothing between the touch and the probe evicts the TLB entries */
    static u64 nprobe, saved_cr3;  /* static: live across the op's setjmp */
    nprobe = *mb_word(HIL_OFF_PROBE_COUNT);
    if (nprobe > HIL_PROBE_CAP)
        nprobe = 0;
    if (nprobe && !root_runs_kernel(*mb_word(HIL_OFF_PROBE_ROOT))) {
        nprobe = 0;
        *mb_word(HIL_OFF_PROBE_COUNT) = HIL_ROOT_REFUSED;
    }
    if (nprobe) {
        smap_ensure();
        saved_cr3 = read_cr3();
        write_cr3(*mb_word(HIL_OFF_PROBE_ROOT));
        run_probes(nprobe, true);
    }
    if (hil_setjmp(&op_recover) == 0) {
        op_recover_armed = 1;
        u64 err = dispatch(op);
        *mb_word(HIL_OFF_RESP_CODE) = err;
        *mb_word(HIL_OFF_RESP_STATUS) = err ? HIL_STATUS_ERR : HIL_STATUS_OK;
    }
    /* else: hil_panic / the exception handler already wrote status and code */
    op_recover_armed = 0;
    if (nprobe) {
        /* the op may have broken the root it ran under (handed it out as a new node) */
        bool runs = root_runs_kernel(*mb_word(HIL_OFF_PROBE_ROOT));
        if (runs && *mb_word(HIL_OFF_RESP_STATUS) == HIL_STATUS_OK)
            run_probes(nprobe, false);
        write_cr3(saved_cr3);
        *mb_word(HIL_OFF_PROBE_COUNT) = runs ? 0 : HIL_ROOT_REFUSED;  /* consumed */
    }
    u64 view = *mb_word(HIL_OFF_VIEW_ROOT);
    if (view) {
        bool runs = root_runs_kernel(view);
        if (runs) {
            view_saved_cr3 = read_cr3();
            write_cr3(view);
        }
        *mb_word(HIL_OFF_VIEW_ROOT) = runs ? 0 : HIL_ROOT_REFUSED;  /* consumed */
    }
}

void hil_main_loop(void) {
    *mb_word(HIL_OFF_RESP_SEQ) = 0;
    *mb_word(HIL_OFF_RESP_STATUS) = HIL_STATUS_READY;
    serial_puts("hil: READY\n");
    for (;;) {
        hil_op_done();
        u64 req = *mb_word(HIL_OFF_REQ_SEQ);
        if (req == *mb_word(HIL_OFF_RESP_SEQ))
            continue;
        run_op();
        barrier();
        *mb_word(HIL_OFF_RESP_SEQ) = req;  /* last: the response is complete */
    }
}
