/* Memory management, named after OSTD's ostd::mm. */
#ifndef MM_H
#define MM_H
#include "kernel.h"
#include "hil.h"

/* --- physical layout, fixed at boot (mm/kspace.c) --- */
struct mm_layout {
    u64 ram_size;
    u64 kernel_start, kernel_end;      /* image incl. .bss */
    u64 kreserved_start, kreserved_end; /* registry + TLB page keeper (KERNEL) */
    u64 registry_base;
    u64 keeper_base, keeper_cap;
    u64 meta_base, meta_end, slot_count;
    u64 kpt_start, kpt_end;            /* the kernel's own page-table nodes */
    u64 pt_pool_start, pt_pool_end;
    u64 data_pool_start, data_pool_end;
    u64 kernel_root;
};
extern struct mm_layout mm;
void kspace_init(u64 mbi_pa);

/* --- frame metadata (mm/frame/meta.c), spec §4.1 --- */
struct meta_slot {
    u8 storage[40];  /* [0] StorageTag; PT node: [1] level, [2] stray, [3] lock, [4..6) nr_children */
    u64 ref_count;
    u64 vtable;      /* type tag = Usage while in use, 0 when uninit */
    u64 in_list;
};
_Static_assert(sizeof(struct meta_slot) == 64, "MetaSlot is 64 bytes");

static inline struct meta_slot *meta_slot(u64 pa) {
    return (struct meta_slot *)paddr_to_vaddr(mm.meta_base + (pa / PAGE_SIZE) * META_SLOT_SIZE);
}
static inline u16 pt_nr_children(u64 node_pa) { return *(u16 *)&meta_slot(node_pa)->storage[4]; }
static inline void pt_set_nr_children(u64 node_pa, u16 n) { *(u16 *)&meta_slot(node_pa)->storage[4] = n; }
void meta_init(void);
void meta_mark_in_use(u64 pa, u64 usage);       /* boot: rc 1, storage UNTYPED, vt = usage */
void meta_mark_pt_node(u64 pa, u8 level, u16 nr_children);
void meta_tear_down(struct meta_slot *s);        /* drop_last_in_place: zero, rc UNUSED */

/* --- frames (mm/frame/frame.c), spec §5.10 --- */
u64 get_slot_check(u64 pa);            /* 0 or HIL_ERR_NOT_ALIGNED / OUT_OF_BOUND */
u64 frame_from_unused(u64 pa, bool unique);     /* 0 or an ERR code; state unchanged on ERR */
u64 frame_from_in_use(u64 pa);                  /* 0 or an ERR code; panics on overflow */
void frame_inc_ref(u64 pa);                     /* Frame::clone */
u64 frame_handle_type(u64 pa);                  /* HIL_REG_FRAME_TYPE_UFRAME iff the slot is a data frame */
void frame_drop_ref(u64 pa);                    /* Frame drop: rc - 1, tear down at 1 (no on_drop of children) */
void pt_node_drop_ref(u64 pa);                  /* drop a stray PT node: at its last ref, on_drop its children */
u64 op_frame(u64 op);                          /* frame / segment / unique op dispatch */

/* --- PTE encoding (mm/page_table/node.c), spec §5.12 --- */
#define PTE_P (1UL << 0)
#define PTE_RW (1UL << 1)
#define PTE_US (1UL << 2)
#define PTE_PWT (1UL << 3)
#define PTE_PCD (1UL << 4)
#define PTE_A (1UL << 5)
#define PTE_D (1UL << 6)
#define PTE_HUGE (1UL << 7)
#define PTE_G (1UL << 8)
#define PTE_IGN1 (1UL << 52)
#define PTE_IGN2 (1UL << 53)
#define PTE_NX (1UL << 63)
#define PHYS_ADDR_MASK 0x000ffffffffff000UL
#define PROP_MASK (~PHYS_ADDR_MASK & ~PTE_HUGE)

/* PageProperty mailbox word: flags 0-7, cache 8-15, priv 16-23 (model/types.py). */
#define PF_R 0x01
#define PF_W 0x02
#define PF_X 0x04
#define PF_ACCESSED 0x08
#define PF_DIRTY 0x10
#define PF_AVAIL1 0x40
#define PF_AVAIL2 0x80
#define PF_ALL 0xdf
#define PRIV_USER 0x01
#define PRIV_GLOBAL 0x02
#define PRIV_ALL 0x03
#define CACHE_UC 0
#define CACHE_WC 1
#define CACHE_WP 2
#define CACHE_WT 3
#define CACHE_WB 4
#define KEEP_CACHE 0xff

static inline bool pte_is_present(u64 pte) { return (pte & (PTE_P | PTE_HUGE)) != 0; }
static inline bool pte_is_last(u64 pte) { return (pte & PTE_HUGE) != 0; }
static inline u64 pte_paddr(u64 pte) { return pte & PHYS_ADDR_MASK; }
static inline u64 pte_new_pt(u64 pa) { return (pa & PHYS_ADDR_MASK) | PTE_P | PTE_RW | PTE_US; }
bool prop_word_valid(u64 prop);
bool prop_cache_supported(u64 prop);
#if HIL_EXEC_UPSTREAM
void configure_pat(void);
#endif
u64 pte_set_prop(u64 raw, u64 prop);  /* caller checked the cache policy */
u64 pte_new_page(u64 pa, u64 prop);
u64 pte_prop(u64 raw);
u64 prop_transform_apply(u64 transform, u64 prop);
bool prop_transform_valid(u64 transform);

static inline u64 page_size(int level) { return PAGE_SIZE << (9 * (level - 1)); }
static inline int pte_index(u64 va, int level) { return (va >> (12 + 9 * (level - 1))) & 511; }
static inline u64 *pt_node(u64 pa) { return (u64 *)paddr_to_vaddr(pa); }

u64 pt_alloc_node(int level);          /* pool allocator, panics OUT_OF_MEMORY */

/* --- TLB flusher (mm/tlb.c), spec §5.13 --- */
void tlb_flusher_begin(void);
void tlb_issue_flush_with(u64 va, u64 len, u64 keep_pa, bool stray_pt);   /* len 4096 = Address(va) */
void tlb_dispatch(bool from_unmap);

/* --- cursor (mm/page_table/cursor.c) and vm_space (mm/vm_space.c) --- */
u64 op_vm_space(u64 op);   /* each returns 0 (OK) or an ERR code */
u64 op_cursor(u64 op);
#endif
