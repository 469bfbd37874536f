/* GDT + TSS (IST1 for #DF), IDT for vectors 0-31, and the exception handler that turns
 * an exception inside an op into a mailbox report instead of a triple fault. */
#include "kernel.h"
#include "hil.h"

struct tss {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

struct idt_entry {
    u16 off_lo, sel;
    u8 ist, type_attr;
    u16 off_mid;
    u32 off_hi, zero;
} __attribute__((packed));

struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error_code, rip, cs, rflags, rsp, ss;
};

static u64 gdt[5];
static struct tss tss;
static struct idt_entry idt[32];
static u8 df_stack[8192] __attribute__((aligned(16)));
extern const u64 isr_table[32];

struct jmp_buf op_recover;
volatile int op_recover_armed;
struct jmp_buf probe_recover;
volatile int probe_armed;
volatile u64 probe_error_code, probe_cr2;
bool cpu_smap;

/* SMAP, not SMEP: SMAP makes a ring-0 data access reveal U (faults on a user page with AC
 * clear, and the probes can still read any page with AC set), while SMEP would fault every
 * fetch from a user page, U or NX alike, and so hide NX on the user pages the workload maps. */
static void smap_init(void) {
    u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
    if (a < 7)
        return;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (!(b & (1u << 20)))  /* CPUID.(7,0):EBX.SMAP */
        return;
    u64 cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" ::"r"(cr4 | 1UL << 21) : "memory");  /* CR4.SMAP */
    cpu_smap = true;
    smap_enforce();  /* AC clear: the kernel touches user pages only inside a probe */
}

/* Before probes: CR4.SMAP back on if something turned it off. The harness's fast reset writes
 * the boot registers back through QEMU's gdb stub, and under KVM (kvm_pvm here) the CR4 of
 * that write does not take: measured 0x200020 at boot, 0x20 after a reset, and every U probe
 * then passed where it must fault. */
void smap_ensure(void) {
    if (!cpu_smap)
        return;
    u64 cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    if (!(cr4 & 1UL << 21))
        __asm__ volatile("mov %0, %%cr4" ::"r"(cr4 | 1UL << 21) : "memory");
}

void cpu_init(void) {
    u64 base = (u64)&tss, limit = sizeof(tss) - 1;
    gdt[0] = 0;
    gdt[1] = 0x00af9a000000ffffUL;  /* 0x08: 64-bit code, DPL 0 */
    gdt[2] = 0x00cf92000000ffffUL;  /* 0x10: data */
    /* 0x18: 64-bit available TSS (type 9, present), a 16-byte descriptor */
    gdt[3] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
             ((limit >> 16 & 0xf) << 48) | ((base >> 24 & 0xff) << 56);
    gdt[4] = base >> 32;
    tss.ist[0] = (u64)(df_stack + sizeof(df_stack));  /* IST1: #DF has its own stack */
    tss.iomap_base = sizeof(tss);

    struct { u16 limit; u64 base; } __attribute__((packed)) gdtr = {sizeof(gdt) - 1, (u64)gdt};
    __asm__ volatile(
        "lgdt %0\n"
        "pushq $0x08\n"
        "leaq 1f(%%rip), %%rax\n"
        "pushq %%rax\n"
        "lretq\n"          /* reload CS from the new GDT */
        "1: movw $0x10, %%ax\n"
        "movw %%ax, %%ds\n movw %%ax, %%es\n movw %%ax, %%ss\n"
        "movw $0x18, %%ax\n ltr %%ax\n"
        :: "m"(gdtr) : "rax", "memory");

    for (int v = 0; v < 32; v++) {
        u64 h = isr_table[v];
        idt[v].off_lo = h & 0xffff;
        idt[v].sel = 0x08;
        idt[v].ist = v == 8 ? 1 : 0;
        idt[v].type_attr = 0x8e;  /* present, DPL 0, 64-bit interrupt gate (IF cleared) */
        idt[v].off_mid = (h >> 16) & 0xffff;
        idt[v].off_hi = h >> 32;
        idt[v].zero = 0;
    }
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr) : "memory");
    smap_init();
}

void exception_handler(struct frame *f) {
    u64 cr2 = read_cr2();
    if (probe_armed && f->vector == 14) {
        /* Probe: the #PF is the expected outcome, not an error. */
        probe_armed = 0;
        probe_error_code = f->error_code;
        probe_cr2 = cr2;
        hil_longjmp(&probe_recover, 1);
    }
    probe_armed = 0;
    *mb_word(HIL_OFF_EXC_VECTOR) = f->vector;
    *mb_word(HIL_OFF_EXC_ERROR) = f->error_code;
    *mb_word(HIL_OFF_EXC_RIP) = f->rip;
    *mb_word(HIL_OFF_EXC_CR2) = cr2;
    *mb_word(HIL_OFF_EXC_RSP) = f->rsp;
    *mb_word(HIL_OFF_RESP_CODE) = f->vector;
    *mb_word(HIL_OFF_RESP_STATUS) = HIL_STATUS_EXCEPTION;
    serial_puts("exception vector ");
    serial_dec(f->vector);
    serial_puts(" err ");
    serial_hex(f->error_code);
    serial_puts(" rip ");
    serial_hex(f->rip);
    serial_puts(" cr2 ");
    serial_hex(cr2);
    serial_puts("\n");
    if (op_recover_armed)
        hil_longjmp(&op_recover, 1);
    serial_puts("exception outside an op: halting\n");
    for (;;)
        __asm__ volatile("cli; hlt");
}
