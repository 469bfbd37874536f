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
    fill_layout();
    log_kv("ram_size ", mm.ram_size);
    log_kv("meta_base ", mm.meta_base);
    log_kv("kernel_root ", mm.kernel_root);
    log_kv("pt_pool ", mm.pt_pool_start);
    log_kv("data_pool ", mm.data_pool_start);
    log_kv("seeded_bug ", HIL_SEEDED_BUG);
    hil_main_loop();
}
