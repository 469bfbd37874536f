/* Physical layout and the kernel page table (OSTD's kspace).
 *
 * Physical memory, low to high (all page aligned):
 *   [0, 1 MiB)                      RESERVED (BIOS, VGA, option ROMs)
 *   [1 MiB, kernel_end)             KERNEL: image incl. .bss, stacks, hil_mailbox
 *   [kreserved_start, +)            KERNEL: handle registry, TLB page keeper
 *   [meta_base, meta_end)           META: one 64-byte slot per RAM frame (spec §4)
 *   [kpt_start, kpt_end)            PAGE_TABLE: the kernel's own page-table nodes
 *   [pt_pool_start, pt_pool_end)    UNUSED: page-table nodes of user VmSpaces come from here
 *   [data_pool_start, ram_size)     UNUSED: for the harness's FrameFromUnused
 *
 * Kernel page table: root entry 256 -> the linear map of all RAM (2 MiB leaves), 511 -> the
 * image at 0xffffffff80000000 + paddr (2 MiB leaves), and every other upper entry 257..510
 * -> an empty L3 node, because create_user_page_table (spec §5.2) panics on an absent
 * upper-half root entry. No identity map: the boot stub's one dies with the boot tables.
 */
#include "mm.h"

struct mm_layout mm;
extern char _kernel_start_phys[], _kernel_end_phys[];

#define KPT_MAX 512
static u8 kpt_level[KPT_MAX];   /* level of each kernel node, by index from kpt_start */
static u64 kpt_count;

/* Before the linear map exists, RAM below 1 GiB is reached through the boot tables'
 * kernel-image window. */
static void *early_vaddr(u64 pa) { return (void *)(pa + KERNEL_BASE); }

static u64 kpt_alloc(int level) {
    u64 pa = mm.kpt_start + kpt_count * PAGE_SIZE;
    kpt_level[kpt_count++] = (u8)level;
    memset(early_vaddr(pa), 0, PAGE_SIZE);
    return pa;
}

static u64 mb_read_ram_size(u64 mbi_pa) {
    /* multiboot_info: u32 flags @0, mem_lower @4, mem_upper @8 (KiB above 1 MiB) */
    u32 *mbi = early_vaddr(mbi_pa);
    if (mbi_pa == 0 || mbi_pa >= (1UL << 30) || !(mbi[0] & 1)) {
        serial_puts("no multiboot mem info; assuming 64 MiB\n");
        return 64UL << 20;
    }
    return ((u64)mbi[2] + 1024) * 1024;
}

void kspace_init(u64 mbi_pa) {
    u64 ram = ALIGN_DOWN(mb_read_ram_size(mbi_pa), PAGE_SIZE);
    if (ram > MAX_PADDR)
        ram = MAX_PADDR;  /* slots exist only for frames below MAX_PADDR (spec §4.3) */
    mm.ram_size = ram;
    mm.slot_count = ram / PAGE_SIZE;
    mm.kernel_start = (u64)_kernel_start_phys;
    mm.kernel_end = (u64)_kernel_end_phys;

    mm.kreserved_start = mm.kernel_end;
    mm.registry_base = mm.kreserved_start;
    mm.keeper_base = mm.registry_base + REGISTRY_ENTRIES * HIL_REGISTRY_ENTRY_SIZE;
    mm.keeper_cap = 8192;
    mm.kreserved_end = ALIGN_UP(mm.keeper_base + mm.keeper_cap * 8, PAGE_SIZE);

    mm.meta_base = mm.kreserved_end;
    mm.meta_end = ALIGN_UP(mm.meta_base + mm.slot_count * META_SLOT_SIZE, PAGE_SIZE);

    u64 map_end = ALIGN_UP(ram, 2UL << 20);
    u64 nr_lin_l2 = (map_end + (1UL << 30) - 1) >> 30;
    mm.kpt_start = mm.meta_end;
    mm.kpt_end = mm.kpt_start + (1 + 256 + nr_lin_l2 + 1) * PAGE_SIZE;

    u64 pool = ram / 16;
    if (pool < (4UL << 20))
        pool = 4UL << 20;
    if (pool > (64UL << 20))
        pool = 64UL << 20;
    mm.pt_pool_start = mm.kpt_end;
    mm.pt_pool_end = mm.pt_pool_start + pool;
    mm.data_pool_start = mm.pt_pool_end;
    mm.data_pool_end = ram;
    if (mm.data_pool_start >= ram || mm.kpt_end > (1UL << 30)) {
        serial_puts("RAM too small for the layout\n");
        for (;;)
            __asm__ volatile("cli; hlt");
    }

    /* Build the kernel page table. */
    u64 root = kpt_alloc(4);
    u64 *root_v = early_vaddr(root);
    for (int i = 256; i < 512; i++)
        root_v[i] = pte_new_pt(kpt_alloc(3));
    u64 *lin_l3 = early_vaddr(pte_paddr(root_v[256]));
    for (u64 g = 0; g < nr_lin_l2; g++) {
        u64 l2 = kpt_alloc(2);
        u64 *l2v = early_vaddr(l2);
        lin_l3[g] = pte_new_pt(l2);
        for (u64 j = 0; j < 512; j++) {
            u64 pa = (g << 30) + (j << 21);
            if (pa < map_end)  /* 2 MiB leaf: P | RW | PS | NX (data only) */
                l2v[j] = pa | PTE_P | PTE_RW | PTE_HUGE | PTE_NX;
        }
    }
    u64 *img_l3 = early_vaddr(pte_paddr(root_v[511]));
    u64 img_l2 = kpt_alloc(2);
    u64 *img_l2v = early_vaddr(img_l2);
    img_l3[510] = pte_new_pt(img_l2);
    u64 img_end = map_end < (1UL << 30) ? map_end : (1UL << 30);
    for (u64 j = 0; (j << 21) < img_end; j++)
        img_l2v[j] = (j << 21) | PTE_P | PTE_RW | PTE_HUGE;  /* executable: kernel text */
    mm.kernel_root = root;
    write_cr3(root);
}

/* Boot metadata (after meta_init): every kernel page-table node is a PT_NODE slot whose
 * nr_children is its number of present entries. */
void kspace_mark_meta(void) {
    for (u64 k = 0; k < kpt_count; k++) {
        u64 pa = mm.kpt_start + k * PAGE_SIZE;
        u64 *e = pt_node(pa);
        u16 n = 0;
        for (int i = 0; i < NR_ENTRIES; i++)
            n += pte_is_present(e[i]);
        meta_mark_pt_node(pa, kpt_level[k], n);
    }
}
