/* Frame handles, segments and unique frames (spec §5.10, §2; docs/semantics.md "Frames",
 * "Segments and unique frames"). Handles live in the registry; rc lives in the slot. */
#include "mm.h"

u64 get_slot_check(u64 pa) {
    /* §4.3 get_slot: slots exist only for RAM frames below MAX_PADDR. */
    if (pa % PAGE_SIZE)
        return HIL_ERR_NOT_ALIGNED;
    if (pa >= mm.ram_size)  /* ram_size <= MAX_PADDR */
        return HIL_ERR_OUT_OF_BOUND;
    return 0;
}

static u64 from_unused_error(u64 rc) {
    if (rc == REF_COUNT_UNIQUE)
        return HIL_ERR_UNIQUE;
    return rc == 0 ? HIL_ERR_BUSY : HIL_ERR_IN_USE;
}

u64 frame_from_unused(u64 pa, bool unique) {
    /* §5.10 get_from_unused: CAS UNUSED -> 0, write metadata, store 1 (UNIQUE). */
    u64 err = get_slot_check(pa);
    if (err)
        return err;
    struct meta_slot *s = meta_slot(pa);
    if (s->ref_count != REF_COUNT_UNUSED)
        return from_unused_error(s->ref_count);
    memset(s->storage, 0, sizeof(s->storage));
    s->storage[0] = HIL_STORAGE_UNTYPED;
    s->vtable = HIL_USAGE_FRAME;
    s->in_list = 0;
    s->ref_count = unique ? REF_COUNT_UNIQUE : 1;
    return 0;
}

u64 frame_from_in_use(u64 pa) {
    /* §5.10 get_from_in_use: no usage check; overflow panics. */
    u64 err = get_slot_check(pa);
    if (err)
        return err;
    struct meta_slot *s = meta_slot(pa);
    u64 rc = s->ref_count;
    if (rc == REF_COUNT_UNUSED && !SEEDED(16))  /* seeded bug 16: no UNUSED check (rc wraps to 0) */
        return HIL_ERR_UNUSED;
    if (rc == REF_COUNT_UNIQUE)
        return HIL_ERR_UNIQUE;
    if (rc == 0)
        return HIL_ERR_BUSY;
    if (rc >= REF_COUNT_MAX)
        hil_panic(HIL_PANIC_REF_COUNT_OVERFLOW, "from_in_use: ref count overflow");
    s->ref_count = rc + 1;
    return 0;
}

void frame_inc_ref(u64 pa) {
    /* Frame::clone -> inc_ref_count: panics if the previous count is >= REF_COUNT_MAX. */
    struct meta_slot *s = meta_slot(pa);
    if (s->ref_count >= REF_COUNT_MAX)
        hil_panic(HIL_PANIC_REF_COUNT_OVERFLOW, "clone: ref count overflow");
    s->ref_count++;
}

static struct meta_slot *drop_check(u64 pa) {
    struct meta_slot *s = meta_slot(pa);
    u64 rc = s->ref_count;
    if (pa >= mm.ram_size || rc == 0 || rc == REF_COUNT_UNUSED || rc == REF_COUNT_UNIQUE)
        hil_panic(HIL_PANIC_GUEST_ASSERT, "drop of a frame without a shared reference");
    return s;
}

void frame_drop_ref(u64 pa) {
    /* Frame drop: fetch_sub 1; the last reference runs drop_last_in_place. A handle drop
     * does not know the slot's type, so a PT node's children are not dropped here
     * (docs/semantics.md; the model's _drop_ref). */
    struct meta_slot *s = drop_check(pa);
    if (s->ref_count == 1) {
        u64 vt = s->vtable;
        meta_tear_down(s);
        if (SEEDED(19))  /* seeded bug 19: the last drop leaves the slot's type word behind */
            s->vtable = vt;
    } else {
        s->ref_count--;
    }
}

void pt_node_drop_ref(u64 pa) {
    /* A stray page table released at dispatch (§5.8 step 4): at its last reference,
     * PageTablePageMeta::on_drop drops every child (level 4: user entries only). */
    struct meta_slot *s = drop_check(pa);
    if (s->ref_count != 1) {
        s->ref_count--;
        return;
    }
    int level = s->storage[HIL_SLOT_OFF_PT_LEVEL];
    meta_tear_down(s);
    u64 *e = pt_node(pa);
    for (int i = 0; i < (level == 4 ? 256 : NR_ENTRIES); i++) {
        u64 pte = e[i];
        if (!pte_is_present(pte))
            continue;
        if (pte_is_last(pte) || level == 1) {
            if (!SEEDED(9))  /* seeded bug 9: the frames under a taken subtree keep their rc */
                frame_drop_ref(pte_paddr(pte));
        } else {
            pt_node_drop_ref(pte_paddr(pte));
        }
    }
}

u64 frame_handle_type(u64 pa) {
    return meta_slot(pa)->vtable == HIL_USAGE_FRAME ? HIL_REG_FRAME_TYPE_UFRAME : HIL_REG_FRAME_TYPE_OTHER;
}

static bool room(u64 n) { return reg_free_count() >= n; }

static u64 new_handle(u64 kind, int idkind, u64 w0, u64 w1) {
    struct reg_entry *e = reg_new(kind, idkind);
    e->w[0] = w0;
    e->w[1] = w1;
    return e->id;
}

static void clone_range(u64 start, u64 end) {
    /* SegmentClone/Slice: every page's overflow is checked before any change. */
    for (u64 pa = start; pa < end; pa += PAGE_SIZE)
        if (meta_slot(pa)->ref_count >= REF_COUNT_MAX)
            hil_panic(HIL_PANIC_REF_COUNT_OVERFLOW, "segment clone: ref count overflow");
    for (u64 pa = start; pa < end; pa += PAGE_SIZE)
        meta_slot(pa)->ref_count++;
}

u64 op_frame(u64 op) {
    u64 a0 = mb_arg(0), a1 = mb_arg(1), a2 = mb_arg(2), err;
    struct reg_entry *e;
    switch (op) {
    case HIL_OP_FRAME_FROM_UNUSED:
    case HIL_OP_UNIQUE_FROM_UNUSED: {
        bool unique = op == HIL_OP_UNIQUE_FROM_UNUSED;
        if (!room(1))
            return HIL_ERR_NO_SPACE;
        if ((err = frame_from_unused(a0, unique)))
            return err;
        mb_result(0, unique ? new_handle(HIL_REG_UNIQUE, ID_UNIQUE, a0, 0)
                            : new_handle(HIL_REG_FRAME, ID_FRAME, a0, 0));
        return 0;
    }
    case HIL_OP_FRAME_FROM_IN_USE:
        if (!room(1))
            return HIL_ERR_NO_SPACE;
        if ((err = frame_from_in_use(a0)))
            return err;
        /* The handle's type is the slot's: a UFrame only over untyped (data-frame) metadata;
         * a page-table node, metadata or kernel frame stays a Frame<dyn AnyFrameMeta>, which
         * map cannot take (TryFrom<Frame<dyn AnyFrameMeta>> for UFrame checks is_untyped). */
        mb_result(HIL_RES_FRAME_FROM_IN_USE_FRAME,
                  new_handle(HIL_REG_FRAME, ID_FRAME, a0, frame_handle_type(a0)));
        return 0;
    case HIL_OP_FRAME_DROP: {
        if (!(e = reg_find(HIL_REG_FRAME, a0)))
            return HIL_ERR_BAD_ID;
        u64 pa = e->w[0];
        reg_free(e);
        struct meta_slot *s = drop_check(pa);
#if HIL_EXEC_UPSTREAM
        if (s->vtable == HIL_USAGE_PAGE_TABLE) {
            /* drop_last_in_place dispatches by vtable: a page-table node's last reference runs
             * PageTablePageMeta::on_drop over its children (U:mm/page_table/node/mod.rs:296) */
            pt_node_drop_ref(pa);
            return 0;
        }
#endif
        if (SEEDED(5) && s->ref_count == 1) {
            /* seeded bug 5: the last drop tears the metadata down but leaves rc at 0 */
            meta_tear_down(s);
            s->ref_count = 0;
        } else {
            frame_drop_ref(pa);
        }
        return 0;
    }
    case HIL_OP_SEGMENT_FROM_UNUSED: {
        if (a0 >= a1)
            return HIL_ERR_BAD_ARG;
        if (!room(1))
            return HIL_ERR_NO_SPACE;
        if (a0 % PAGE_SIZE || a1 % PAGE_SIZE)
            return HIL_ERR_NOT_ALIGNED;
        if (a1 > mm.ram_size)
            return HIL_ERR_OUT_OF_BOUND;
        /* Exec takes page by page and releases them again on the first failure: the net
         * effect is "no change + that page's error", done here without the round trip. */
        /* seeded bug 20: the availability check stops before the last page */
        for (u64 pa = a0; pa < (SEEDED(20) ? a1 - PAGE_SIZE : a1); pa += PAGE_SIZE)
            if (meta_slot(pa)->ref_count != REF_COUNT_UNUSED)
                return from_unused_error(meta_slot(pa)->ref_count);
        for (u64 pa = a0; pa < a1; pa += PAGE_SIZE)
            frame_from_unused(pa, false);
        mb_result(0, new_handle(HIL_REG_SEGMENT, ID_SEGMENT, a0, a1));
        return 0;
    }
    case HIL_OP_SEGMENT_DROP: {
        if (!(e = reg_find(HIL_REG_SEGMENT, a0)))
            return HIL_ERR_BAD_ID;
        u64 start = e->w[0], end = e->w[1];
        reg_free(e);
        for (u64 pa = start; pa < end; pa += PAGE_SIZE)
            frame_drop_ref(pa);
        return 0;
    }
    case HIL_OP_SEGMENT_SPLIT: {
        if (!(e = reg_find(HIL_REG_SEGMENT, a0)))
            return HIL_ERR_BAD_ID;
        u64 start = e->w[0], end = e->w[1];
        /* seeded bug 23: a split at the segment's end is accepted (an empty right half) */
        if (a1 % PAGE_SIZE || a1 == 0 || (SEEDED(23) ? a1 > end - start : a1 >= end - start))
            return HIL_ERR_BAD_ARG;
        if (!room(2))
            return HIL_ERR_NO_SPACE;
        reg_free(e);
        mb_result(0, new_handle(HIL_REG_SEGMENT, ID_SEGMENT, start, start + a1));
        mb_result(1, new_handle(HIL_REG_SEGMENT, ID_SEGMENT, start + a1, end));
        return 0;
    }
    case HIL_OP_SEGMENT_NEXT: {
        if (!(e = reg_find(HIL_REG_SEGMENT, a0)))
            return HIL_ERR_BAD_ID;
        if (!room(1))
            return HIL_ERR_NO_SPACE;
        u64 start = e->w[0];
        /* seeded bug 27: the id of an emptied segment stays live (> for >=) */
        if (SEEDED(27) ? start + PAGE_SIZE > e->w[1] : start + PAGE_SIZE >= e->w[1])
            reg_free(e);  /* a segment is never empty while live */
        else
            e->w[0] = start + PAGE_SIZE;
        mb_result(0, new_handle(HIL_REG_FRAME, ID_FRAME, start, 0));
        return 0;
    }
    case HIL_OP_SEGMENT_CLONE: {
        if (!(e = reg_find(HIL_REG_SEGMENT, a0)))
            return HIL_ERR_BAD_ID;
        if (!room(1))
            return HIL_ERR_NO_SPACE;
        u64 start = e->w[0], end = e->w[1];
        clone_range(start, end);
        mb_result(0, new_handle(HIL_REG_SEGMENT, ID_SEGMENT, start, end));
        return 0;
    }
    case HIL_OP_SEGMENT_SLICE: {
        if (!(e = reg_find(HIL_REG_SEGMENT, a0)))
            return HIL_ERR_BAD_ID;
        u64 start = e->w[0], end = e->w[1];
        if (a1 % PAGE_SIZE || a2 % PAGE_SIZE || a1 >= a2 || a2 > end - start)
            return HIL_ERR_BAD_ARG;
        if (!room(1))
            return HIL_ERR_NO_SPACE;
        /* seeded bug 28: the slice takes a reference on its first page only */
        clone_range(start + a1, SEEDED(28) ? start + a1 + PAGE_SIZE : start + a2);
        mb_result(0, new_handle(HIL_REG_SEGMENT, ID_SEGMENT, start + a1, start + a2));
        return 0;
    }
    case HIL_OP_UNIQUE_DROP: {
        if (!(e = reg_find(HIL_REG_UNIQUE, a0)))
            return HIL_ERR_BAD_ID;
        u64 pa = e->w[0];
        reg_free(e);
#if HIL_EXEC_UPSTREAM
        if (meta_slot(pa)->vtable == HIL_USAGE_PAGE_TABLE) {  /* drop_last_in_place: on_drop too */
            meta_slot(pa)->ref_count = 1;
            pt_node_drop_ref(pa);
            return 0;
        }
#endif
        meta_tear_down(meta_slot(pa));  /* UniqueFrame drop: UNIQUE -> UNUSED */
        return 0;
    }
    case HIL_OP_FROM_UNIQUE: {
        if (!(e = reg_find(HIL_REG_UNIQUE, a0)))
            return HIL_ERR_BAD_ID;
        if (!room(1))
            return HIL_ERR_NO_SPACE;
        u64 pa = e->w[0];
        reg_free(e);
        /* Frame::from_unique: UNIQUE -> 1; seeded bug 18: counts the unique ref and the new one */
        meta_slot(pa)->ref_count = SEEDED(18) ? 2 : 1;
        mb_result(0, new_handle(HIL_REG_FRAME, ID_FRAME, pa, 0));
        return 0;
    }
    case HIL_OP_TRY_FROM_SHARED: {
        if (!(e = reg_find(HIL_REG_FRAME, a0)))
            return HIL_ERR_BAD_ID;
        if (!room(1))
            return HIL_ERR_NO_SPACE;
        u64 pa = e->w[0];
        struct meta_slot *s = meta_slot(pa);
        if (SEEDED(17) ? s->ref_count > 2 : s->ref_count != 1)  /* seeded bug 17: rc 2 passes */
            return 0;  /* ok 0: CAS 1 -> UNIQUE failed, nothing changes */
        s->ref_count = REF_COUNT_UNIQUE;
        reg_free(e);
        mb_result(HIL_RES_TRY_FROM_SHARED_OK, 1);
        mb_result(HIL_RES_TRY_FROM_SHARED_UNIQUE, new_handle(HIL_REG_UNIQUE, ID_UNIQUE, pa, 0));
        return 0;
    }
    }
    return HIL_ERR_UNKNOWN_OP;
}
