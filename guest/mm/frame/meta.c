/* Frame metadata slots (spec §4): slot i of frame i*4096 at meta_base + 64*i. */
#include "mm.h"

void meta_tear_down(struct meta_slot *s) {
    /* drop_last_in_place (§5.10): metadata dropped, vtable uninit, rc UNUSED. */
    memset(s->storage, 0, sizeof(s->storage));
    s->vtable = 0;
    s->in_list = 0;
    s->ref_count = REF_COUNT_UNUSED;
}

void meta_mark_in_use(u64 pa, u64 usage) {
    /* Boot marks kernel/reserved/meta frames like OSTD: Segment::from_unused + forget. */
    struct meta_slot *s = meta_slot(pa);
    memset(s->storage, 0, sizeof(s->storage));
    s->storage[0] = HIL_STORAGE_UNTYPED;
    s->vtable = usage;
    s->in_list = 0;
    s->ref_count = 1;
}

void meta_mark_pt_node(u64 pa, u8 level, u16 nr_children) {
    /* PageTablePageMeta::new(level) (§4.5), rc 1 held by the parent PTE / the root owner. */
    struct meta_slot *s = meta_slot(pa);
    memset(s->storage, 0, sizeof(s->storage));
    s->storage[0] = HIL_STORAGE_PT_NODE;
    s->storage[HIL_SLOT_OFF_PT_LEVEL] = level;
    pt_set_nr_children(pa, nr_children);
    s->vtable = HIL_USAGE_PAGE_TABLE;
    s->in_list = 0;
    s->ref_count = 1;
}

static void mark_range(u64 start, u64 end, u64 usage) {
    for (u64 pa = ALIGN_DOWN(start, PAGE_SIZE); pa < end && pa < mm.ram_size; pa += PAGE_SIZE)
        meta_mark_in_use(pa, usage);
}

void kspace_mark_meta(void);

void meta_init(void) {
    /* Upstream alloc_meta_frames: every slot storage Empty, rc UNUSED, vtable uninit. */
    for (u64 i = 0; i < mm.slot_count; i++) {
        struct meta_slot *s = (struct meta_slot *)paddr_to_vaddr(mm.meta_base + i * META_SLOT_SIZE);
        memset(s->storage, 0, sizeof(s->storage));
        s->vtable = 0;
        s->in_list = 0;
        s->ref_count = REF_COUNT_UNUSED;
    }
    mark_range(0, 1UL << 20, HIL_USAGE_RESERVED);
    mark_range(mm.kernel_start, mm.kreserved_end, HIL_USAGE_KERNEL);
    mark_range(mm.meta_base, mm.meta_end, HIL_USAGE_META);
    kspace_mark_meta();
}
