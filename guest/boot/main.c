/* kmain: reached from boot/entry.S in long mode on the boot stack, higher half. */
#include "mm.h"

u64 hil_layout[HIL_LAYOUT_NR_WORDS] __attribute__((aligned(64)));
void registry_init(u64 base_pa);

static void fill_layout(void) {
    u64 *l = hil_layout;
    l[HIL_LAYOUT_MAGIC] = HIL_MAGIC;
    l[HIL_LAYOUT_ABI_VERSION] = HIL_ABI_VERSION;
    l[HIL_LAYOUT_RAM_SIZE] = mm.ram_size;
    l[HIL_LAYOUT_META_BASE] = mm.meta_base;
    l[HIL_LAYOUT_SLOT_SIZE] = META_SLOT_SIZE;
    l[HIL_LAYOUT_SLOT_COUNT] = mm.slot_count;
    l[HIL_LAYOUT_KERNEL_ROOT] = mm.kernel_root;
    l[HIL_LAYOUT_REGISTRY_BASE] = mm.registry_base;
    l[HIL_LAYOUT_REGISTRY_ENTRY_SIZE] = HIL_REGISTRY_ENTRY_SIZE;
    l[HIL_LAYOUT_REGISTRY_ENTRIES] = REGISTRY_ENTRIES;
    l[HIL_LAYOUT_MAILBOX] = kimage_paddr((const void *)hil_mailbox);
    l[HIL_LAYOUT_PT_POOL_START] = mm.pt_pool_start;
    l[HIL_LAYOUT_PT_POOL_END] = mm.pt_pool_end;
    l[HIL_LAYOUT_DATA_POOL_START] = mm.data_pool_start;
    l[HIL_LAYOUT_DATA_POOL_END] = mm.data_pool_end;
    l[HIL_LAYOUT_KERNEL_VIRT_OFFSET] = KERNEL_BASE;
    l[HIL_LAYOUT_LINEAR_MAP_BASE] = LINEAR_MAPPING_BASE;
    l[HIL_LAYOUT_SEEDED_BUG] = HIL_SEEDED_BUG;
    l[HIL_LAYOUT_EXEC] = HIL_EXEC_UPSTREAM;  /* abi.EXEC_NAMES index: 0 vostd, 1 upstream */
    l[HIL_LAYOUT_PROBE_USER] = cpu_smap;  /* cpu_init ran: SMAP is on, probes see U */
}

/* SMAP self-test: a CPU model or hypervisor may report SMAP in CPUID without enforcing it
 * (not seen on this workplace's TCG or kvm_pvm; a guard, since then every U probe would pass
 * and say a wrong thing about U). A user page at VA 0x1000, through the kernel root's empty
 * entry 0 and tables in .bss: a read with AC clear must fault (#PF: error code P set, U/S
 * clear), one with AC set must not, and one with AC clear after it must fault again, or SMAP
 * goes off again and probe_user says 0 (the probes do not see U) rather than lie about it. */
static u64 st_l3[512] __attribute__((aligned(4096)));
static u64 st_l2[512] __attribute__((aligned(4096)));
static u64 st_l1[512] __attribute__((aligned(4096)));
static u64 st_page[512] __attribute__((aligned(4096)));

static bool smap_read_faults(volatile u64 *va) {
    static volatile bool faulted;  /* static: live across the setjmp */
    faulted = true;
    if (hil_setjmp(&probe_recover) == 0) {
        probe_armed = 1;
        (void)*va;
        probe_armed = 0;
        faulted = false;
    }
    return faulted;
}

static void smap_selftest(void) {
    if (!cpu_smap)
        return;
    u64 *root = paddr_to_vaddr(read_cr3() & PHYS_ADDR_MASK);
    u64 saved = root[0];
    u64 flags = PTE_P | PTE_RW | PTE_US;
    st_l3[0] = kimage_paddr(st_l2) | flags;
    st_l2[0] = kimage_paddr(st_l1) | flags;
    st_l1[1] = kimage_paddr(st_page) | flags;
    root[0] = kimage_paddr(st_l3) | flags;
    write_cr3(read_cr3());
    volatile u64 *va = (volatile u64 *)0x1000;
    bool enforced = smap_read_faults(va) && (probe_error_code & 5) == 1;  /* present, supervisor access */
    smap_allow();
    bool allowed = !smap_read_faults(va);
    smap_enforce();
    /* and again once an AC-set read has cached the page, as the probes' touches do */
    enforced = enforced && smap_read_faults(va) && (probe_error_code & 5) == 1;
    root[0] = saved;
    write_cr3(read_cr3());
    if (enforced && allowed)
        return;
    serial_puts("SMAP reported but not enforced: off (the MMU probes do not see U)\n");
    u64 cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" ::"r"(cr4 & ~(1UL << 21)) : "memory");
    cpu_smap = false;
}

static void log_kv(const char *k, u64 v) {
    serial_puts(k);
    serial_hex(v);
    serial_puts("\n");
}

void kmain(u64 magic, u64 mbi_pa) {
    serial_init();
    serial_puts("ostd-hil guest booting\n");
    if (magic != 0x2BADB002)
        serial_puts("warning: not loaded by a multiboot v1 loader\n");
    cpu_init();
#if HIL_EXEC_UPSTREAM
    configure_pat();  /* upstream's enable_essential_features (U:arch/x86/mm/mod.rs:316) */
#endif
    kspace_init(mbi_pa);
    meta_init();
    registry_init(mm.registry_base);
#if HIL_EXEC_UPSTREAM
    frame_inc_ref(mm.kernel_root);  /* first_activate: the CPU's reference on the kernel root */
#endif
    smap_selftest();
    fill_layout();
    log_kv("ram_size ", mm.ram_size);
    log_kv("smap ", cpu_smap);
    log_kv("meta_base ", mm.meta_base);
    log_kv("kernel_root ", mm.kernel_root);
    log_kv("pt_pool ", mm.pt_pool_start);
    log_kv("data_pool ", mm.data_pool_start);
    log_kv("seeded_bug ", HIL_SEEDED_BUG);
    hil_main_loop();
}
