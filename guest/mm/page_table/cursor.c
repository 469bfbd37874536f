/* Page-table cursor (spec §5.2-§5.9), root-locked: guard level 4, no allocation at open.
 *
 * The cursor's state is its registry entry (w4 va, w5 level | guard << 8), so the harness
 * always sees it current, even after a panic mid-op. path[] is not stored: with root locking
 * the node of every level in [level, 4] is the one the walk of va from the root reaches
 * (§5.3: push/pop/move_forward/jump keep this true), so it is derived (node_at).
 */
#include "mm.h"

struct cursor {
    struct reg_entry *e;
    u64 root, start, end;
};

static u64 va_of(struct cursor *c) { return c->e->w[4]; }
static int level_of(struct cursor *c) { return (int)(c->e->w[5] & 0xff); }
static int guard_of(struct cursor *c) { return (int)((c->e->w[5] >> 8) & 0xff); }
static void set_va(struct cursor *c, u64 va) { c->e->w[4] = va; }
static void set_level(struct cursor *c, int l) { c->e->w[5] = (u64)l | ((u64)guard_of(c) << 8); }

static u64 node_at(struct cursor *c, int level) {
    u64 node = c->root, va = va_of(c);
    for (int l = NR_LEVELS; l > level; l--) {
        u64 pte = pt_node(node)[pte_index(va, l)];
        if (!pte_is_present(pte) || pte_is_last(pte))
            hil_panic(HIL_PANIC_GUEST_ASSERT, "cursor path broken");
        node = pte_paddr(pte);
    }
    return node;
}

/* cur_entry(): entry pte_index(va, level) of path[level-1] */
static u64 *cur_entry(struct cursor *c, u64 *node_out) {
    u64 node = node_at(c, level_of(c));
    if (node_out)
        *node_out = node;
    return &pt_node(node)[pte_index(va_of(c), level_of(c))];
}

/* ChildRef::from_pte: a present entry is a frame if it is a leaf (bit 7) or at level 1. */
static bool is_frame(u64 pte, int level) { return pte_is_present(pte) && (pte_is_last(pte) || level == 1); }

static u64 range_start(struct cursor *c) { return ALIGN_DOWN(va_of(c), page_size(level_of(c))); }
static u64 range_end(struct cursor *c) { return range_start(c) + page_size(level_of(c)); }

static void push_level(struct cursor *c) { set_level(c, level_of(c) - 1); }

static void pop_level(struct cursor *c) {
    if (level_of(c) >= guard_of(c))
        hil_panic(HIL_PANIC_GUEST_ASSERT, "pop_level above the guard level");
    set_level(c, level_of(c) + 1);
}

static void move_forward(struct cursor *c) {
    /* §5.3: next = end of cur_va_range; pop while at a node boundary below the guard. */
    u64 next = range_end(c);
    while (level_of(c) < guard_of(c) && pte_index(next, level_of(c)) == 0)
        set_level(c, level_of(c) + 1);
    set_va(c, next);
}

static void nav_panics(struct cursor *c, u64 len) {
    /* find_next_panic_condition (§5.5), va + len computed without overflow */
    if (len % PAGE_SIZE)
        hil_panic(HIL_PANIC_FIND_NEXT_LEN_UNALIGNED, "find_next: len % 4096 != 0");
    if ((u128)va_of(c) + len > c->end)
        hil_panic(HIL_PANIC_FIND_NEXT_PAST_BARRIER, "find_next: va + len > barrier end");
}

/* §5.5 find_next_impl(len, find_unmap_subtree, split_huge); the caller ran nav_panics. */
static bool find_next_impl(struct cursor *c, u64 len, bool unmap_subtree, bool split_huge) {
    u64 end = va_of(c) + len;
    /* seeded bug 10: find_next's loop also looks at the entry at `end` (<= for <) */
    bool off_by_one = SEEDED(10) && !unmap_subtree && !split_huge;
    /* seeded bug 25: find_next stops one page short of its end (never looks at the last) */
    if (SEEDED(25) && !unmap_subtree && !split_huge)
        end -= PAGE_SIZE;
    while (va_of(c) < end || (off_by_one && va_of(c) == end)) {
        int level = level_of(c);
        u64 pte = *cur_entry(c, NULL);
        bool fits = va_of(c) == range_start(c) && range_end(c) <= end;
        if (!pte_is_present(pte)) {
            move_forward(c);
        } else if (is_frame(pte, level)) {
            if (fits || !split_huge)
                return true;
            hil_panic(HIL_PANIC_GUEST_ASSERT, "huge leaf in a user page table (split unreachable)");
        } else {
            /* TOP_LEVEL_CAN_UNMAP is true for UserPtConfig: any level may be taken. */
            if (unmap_subtree && fits)
                return true;
            if (pt_nr_children(pte_paddr(pte)) != 0)
                push_level(c);
            else
                move_forward(c);  /* an empty node: skip it */
        }
    }
    return false;
}

static u64 load(u64 id, struct cursor *c, bool need_mut) {
    struct reg_entry *e = reg_find(HIL_REG_CURSOR, id);
    if (!e)
        return HIL_ERR_BAD_ID;
    c->e = e;
    c->start = e->w[2];
    c->end = e->w[3];
    struct reg_entry *vs = reg_find(HIL_REG_VM_SPACE, e->w[0]);
    if (!vs)
        hil_panic(HIL_PANIC_GUEST_ASSERT, "cursor of a dead VmSpace");
    c->root = vs->w[0];
    if (need_mut && !e->w[1])
        return HIL_ERR_WRONG_KIND;
    return 0;
}

#if HIL_EXEC_UPSTREAM
/* lock_range (U:mm/page_table/cursor/locking.rs:21, :90): the guard node is the lowest node
 * covering [start, end); missing nodes on the way down are allocated at open. */
static int guard_level_of(u64 start, u64 end) {
    for (int l = NR_LEVELS; l > 1; l--)
        if (pte_index(start, l) != pte_index(end - 1, l))
            return l;
    return 1;
}

static u64 op_open_upstream(u64 op) {
    u64 vsid = mb_arg(0), start = mb_arg(1), end = mb_arg(2);
    struct reg_entry *vs = reg_find(HIL_REG_VM_SPACE, vsid);
    if (!vs)
        return HIL_ERR_BAD_ID;
    if (reg_free_count() < 1)
        return HIL_ERR_NO_SPACE;
    if (!(start < end && start % PAGE_SIZE == 0 && end % PAGE_SIZE == 0 && end <= USER_VA_END))
        return HIL_ERR_ACCESS_DENIED;
    /* harness-only: a cursor whose guard node's span meets a live cursor's would (or could)
     * block on its locks: CURSOR_BUSY. Disjoint guard spans never share a lock. */
    int guard = guard_level_of(start, end);
    u64 span = page_size(guard + 1), lo = ALIGN_DOWN(start, span);
    for (int i = 1; i < REGISTRY_ENTRIES; i++) {
        struct reg_entry *o = &registry[i];
        if (o->kind != HIL_REG_CURSOR || o->w[0] != vsid)
            continue;
        u64 ospan = page_size((int)((o->w[5] >> 8) & 0xff) + 1), olo = ALIGN_DOWN(o->w[2], ospan);
        if (lo < olo + ospan && olo < lo + span)
            return HIL_ERR_CURSOR_BUSY;
    }
    u64 node = vs->w[0];
    for (int l = NR_LEVELS; l > guard; l--) {  /* try_traverse_and_lock_subtree_root */
        u64 *e = &pt_node(node)[pte_index(start, l)];
        if (!pte_is_present(*e)) {
            u64 child = pt_alloc_node(l - 1);
            *e = pte_new_pt(child);
            pt_set_nr_children(node, pt_nr_children(node) + 1);
        } else if (pte_is_last(*e)) {
            hil_panic(HIL_PANIC_GUEST_ASSERT, "huge leaf in a user page table (split unreachable)");
        }
        node = pte_paddr(*e);
    }
    struct reg_entry *e = reg_new(HIL_REG_CURSOR, ID_CURSOR);
    e->w[0] = vsid;
    e->w[1] = op == HIL_OP_CURSOR_MUT;
    e->w[2] = start;
    e->w[3] = end;
    e->w[4] = start;
    e->w[5] = (u64)guard | ((u64)guard << 8);
    vs->w[1] += 1;  /* upstream: the number of live cursors */
    mb_result(0, e->id);
    return 0;
}
#endif

static u64 op_open(u64 op) {
#if HIL_EXEC_UPSTREAM
    return op_open_upstream(op);
#endif
    u64 vsid = mb_arg(0), start = mb_arg(1), end = mb_arg(2);
    struct reg_entry *vs = reg_find(HIL_REG_VM_SPACE, vsid);
    if (!vs)
        return HIL_ERR_BAD_ID;
    if (vs->w[1] && !SEEDED(21))  /* seeded bug 21: a second cursor on a busy VmSpace */
        return HIL_ERR_CURSOR_BUSY;  /* root locking: a second cursor would deadlock */
    if (reg_free_count() < 1)
        return HIL_ERR_NO_SPACE;
    /* Cursor::new (§5.2): invalid / unaligned / empty ranges -> AccessDenied at VmSpace. */
    if (!(start < end && start % PAGE_SIZE == 0 && end % PAGE_SIZE == 0 && end <= USER_VA_END))
        return HIL_ERR_ACCESS_DENIED;
    struct reg_entry *e = reg_new(HIL_REG_CURSOR, ID_CURSOR);
    e->w[0] = vsid;
    e->w[1] = op == HIL_OP_CURSOR_MUT;
    e->w[2] = start;
    e->w[3] = end;
    e->w[4] = start;
    e->w[5] = NR_LEVELS | (NR_LEVELS << 8);  /* level = guard_level = 4 */
    vs->w[1] = e->id;
    mb_result(0, e->id);
    return 0;
}

static u64 op_query(struct cursor *c) {
    if (!HIL_EXEC_UPSTREAM && reg_free_count() < 1)  /* upstream: no handle (below) */
        return HIL_ERR_NO_SPACE;
    if (va_of(c) >= c->end)
        return HIL_ERR_INVALID_VADDR;  /* §5.4 step 1 */
    for (;;) {
        int level = level_of(c);
        u64 pte = *cur_entry(c, NULL);
        if (!pte_is_present(pte)) {
            mb_result(HIL_RES_QUERY_PRESENT, 0);
            mb_result(HIL_RES_QUERY_START, range_start(c));
            mb_result(HIL_RES_QUERY_END, range_end(c));
            return 0;
        }
#if HIL_EXEC_UPSTREAM
        if (is_frame(pte, level)) {  /* a borrowed item: no handle, rc untouched (U:mm/vm_space.rs:272) */
            mb_result(HIL_RES_QUERY_PRESENT, 1);
            mb_result(HIL_RES_QUERY_START, range_start(c));
            mb_result(HIL_RES_QUERY_END, range_end(c));
            mb_result(HIL_RES_QUERY_PADDR, pte_paddr(pte));
            mb_result(HIL_RES_QUERY_PROP, pte_prop(pte));
            return 0;
        }
#endif
        if (is_frame(pte, level)) {
            /* §5.4 step 2: clone_item -> Frame::clone (rc + 1) */
            u64 pa = pte_paddr(pte);
            if (SEEDED(3)) {  /* seeded bug 3: the clone forgets the rc bump */
                if (meta_slot(pa)->ref_count >= REF_COUNT_MAX)
                    hil_panic(HIL_PANIC_REF_COUNT_OVERFLOW, "clone: ref count overflow");
            } else {
                frame_inc_ref(pa);
            }
            struct reg_entry *f = reg_new(HIL_REG_FRAME, ID_FRAME);
            f->w[0] = pa;
            mb_result(HIL_RES_QUERY_PRESENT, 1);
            mb_result(HIL_RES_QUERY_START, range_start(c));
            mb_result(HIL_RES_QUERY_END, range_end(c));
            mb_result(HIL_RES_QUERY_PADDR, pa);
            mb_result(HIL_RES_QUERY_PROP, pte_prop(pte));
            mb_result(HIL_RES_QUERY_FRAME, f->id);
            return 0;
        }
        push_level(c);  /* a PageTable child: descend, even into an empty node */
    }
}

/* upstream clamps va to the barrier end when nothing was found (U:mm/page_table/cursor/mod.rs:250) */
static bool find_next_clamped(struct cursor *c, u64 len, bool unmap_subtree, bool split_huge) {
    bool found = find_next_impl(c, len, unmap_subtree, split_huge);
    if (HIL_EXEC_UPSTREAM && !found && va_of(c) > c->end)
        set_va(c, c->end);
    return found;
}

static u64 op_jump(struct cursor *c, u64 va) {
    if (va % PAGE_SIZE)
        hil_panic(HIL_PANIC_JUMP_UNALIGNED, "jump: va % 4096 != 0");
    /* seeded bug 8: the barrier check lets va == barrier end through */
    bool inside = SEEDED(8) ? (c->start <= va && va <= c->end) : (c->start <= va && va < c->end);
    if (!inside)
        return HIL_ERR_INVALID_VADDR;
#if HIL_EXEC_UPSTREAM
    if (va_of(c) == c->end) {  /* U:mm/page_table/cursor/mod.rs:272: pop to the guard level */
        set_level(c, guard_of(c));
        set_va(c, va);
        return 0;
    }
#endif
    for (;;) {  /* §5.6: pop until the current node contains va; level kept otherwise */
        int level = level_of(c);
        u64 span = page_size(level + 1);
        u64 node_start = ALIGN_DOWN(va_of(c), span);
        if (level <= guard_of(c) && node_start <= va && va - node_start < span) {
            set_va(c, va);
            return 0;
        }
        pop_level(c);
    }
}

static u64 op_map(struct cursor *c, u64 fid, u64 prop) {
    u64 va = va_of(c);
    /* §5.7 step 1 (map_panic_conditions) */
    if (va >= c->end || (u128)va + PAGE_SIZE > c->end)
        hil_panic(HIL_PANIC_MAP_OUT_OF_RANGE, "map: va outside the barrier");
    /* §5.7 step 2 item_into_raw: the handle's reference moves into the future PTE */
    struct reg_entry *f = reg_find(HIL_REG_FRAME, fid);
    u64 pa = f->w[0];
    reg_free(f);
    /* §5.7 step 3 map_loop(1): descend, allocating absent intermediate nodes */
    while (level_of(c) != 1) {
        u64 node;
        u64 *e = cur_entry(c, &node);
        if (!pte_is_present(*e)) {
            u64 child = pt_alloc_node(level_of(c) - 1);
            *e = pte_new_pt(child);
            pt_set_nr_children(node, pt_nr_children(node) + 1);
        } else if (is_frame(*e, level_of(c))) {
            hil_panic(HIL_PANIC_GUEST_ASSERT, "huge leaf in a user page table (split unreachable)");
        }
        push_level(c);
    }
    /* §5.7 step 4 replace_cur_entry(Frame(pa, 1, prop)): new_page -> set_prop panics on
     * WriteCombining/WriteProtected, after map_loop allocated the nodes and the handle was
     * consumed (vostd arch/x86/mm/mod.rs:349, :537; docs/semantics.md) */
#if HIL_EXEC_UPSTREAM  /* U:mm/page_table/cursor/mod.rs:468, before new_page encodes the prop */
    if (pte_is_present(*cur_entry(c, NULL)))
        hil_panic(HIL_PANIC_MAP_ALREADY_MAPPED, "map: mapping over an already mapped page");
#endif
    if (!prop_cache_supported(prop))
        hil_panic(HIL_PANIC_UNSUPPORTED_CACHE, "map: WriteCombining/WriteProtected");
    u64 node;
    u64 *e = cur_entry(c, &node);
    u64 old = *e;
    *e = pte_new_page(pa, prop);
    bool replaced = pte_is_present(old);
    if (!replaced && !SEEDED(4))  /* seeded bug 4: nr_children not incremented */
        pt_set_nr_children(node, pt_nr_children(node) + 1);
    /* §5.7 step 5 */
    move_forward(c);
    /* §5.7 step 6: Err(Mapped) -> flush Address(va) with the old frame kept, dispatch.
     * seeded bug 29: a re-map of the same frame that sets U is taken for a pure grant (a
     * spurious fault would fix it up, as for W) and not flushed; under SMAP, U revokes the
     * kernel's access, so the stale entry keeps it. The old PTE's reference is dropped at once. */
    if (replaced && SEEDED(29) && pte_paddr(old) == pa && (*e & PTE_US) && !(old & PTE_US)) {
        frame_drop_ref(pa);
        mb_result(HIL_RES_MAP_REPLACED, 1);
        mb_result(HIL_RES_MAP_OLD_PADDR, pa);
    } else if (replaced) {
        tlb_flusher_begin();
        /* seeded bug 14: flushes the cursor's VA after move_forward, not the re-mapped one;
         * seeded bug 15: keeps (releases) the new frame instead of the replaced one */
        tlb_issue_flush_with(SEEDED(14) ? va_of(c) : va, PAGE_SIZE, SEEDED(15) ? pa : pte_paddr(old), false);
        tlb_dispatch(false);
        mb_result(HIL_RES_MAP_REPLACED, 1);
        mb_result(HIL_RES_MAP_OLD_PADDR, pte_paddr(old));
    }
    return 0;
}

static u64 mark_stray(u64 node) {
    /* dfs_mark_stray_and_unlock (§5.8): stray = true on every node; the number of frames
     * is the sum of nr_children of the level-1 nodes. */
    struct meta_slot *s = meta_slot(node);
    s->storage[HIL_SLOT_OFF_PT_STRAY] = 1;
    if (s->storage[HIL_SLOT_OFF_PT_LEVEL] == 1)
        return pt_nr_children(node);
    u64 n = 0, *e = pt_node(node);
    for (int i = NR_ENTRIES - 1; i >= 0; i--)
        if (pte_is_present(e[i]) && !pte_is_last(e[i]))
            n += mark_stray(pte_paddr(e[i]));
    return n;
}

static u64 op_unmap(struct cursor *c, u64 len) {
    nav_panics(c, len);
    u64 end = va_of(c) + len, num = 0;
    tlb_flusher_begin();
    /* §5.8 step 2: take_next until nothing is left in [va, end) */
    while (va_of(c) < end && find_next_clamped(c, end - va_of(c), true, true)) {
        u64 node;
        int level = level_of(c);
        u64 *e = cur_entry(c, &node);
        u64 old = *e, va = va_of(c);
        *e = 0;  /* Entry::replace(None): the parent loses a child */
        pt_set_nr_children(node, pt_nr_children(node) - 1);
        if (is_frame(old, level)) {
            num += 1;
            tlb_issue_flush_with(va, PAGE_SIZE, pte_paddr(old), false);
        } else {
            num += mark_stray(pte_paddr(old));
            /* seeded bug 12: a taken subtree queues a flush of its first page only */
            tlb_issue_flush_with(va, SEEDED(12) ? PAGE_SIZE : page_size(level), pte_paddr(old), true);
        }
        move_forward(c);
    }
    tlb_dispatch(true);  /* §5.8 step 3: one dispatch; kept frames / stray PTs dropped */
    mb_result(HIL_RES_UNMAP_NUM, num);
    return 0;
}

static u64 op_protect_next(struct cursor *c, u64 len, u64 transform) {
    nav_panics(c, len);
    if (!find_next_clamped(c, len, false, true))
        return 0;  /* found 0 */
    u64 *e = cur_entry(c, NULL);
    u64 old = *e;
    u64 prop = pte_prop(old);
    u64 new_prop = prop_transform_apply(transform, prop);
    if (new_prop != prop) {  /* Entry::protect writes only on a change */
        if (!prop_cache_supported(new_prop))
            hil_panic(HIL_PANIC_UNSUPPORTED_CACHE, "protect_next: WriteCombining/WriteProtected");
        u64 raw = pte_set_prop(old, new_prop);
        if (SEEDED(24))  /* seeded bug 24: protect_next keeps the old NX bit */
            raw = (raw & ~PTE_NX) | (old & PTE_NX);
        if (SEEDED(6))  /* seeded bug 6: keeps the paddr with the 2 MiB mask (bit 7 = "huge") */
            raw = (raw & ~PHYS_ADDR_MASK) | (old & PHYS_ADDR_MASK & ~0x1fffffUL);
        *e = raw;
    }
    mb_result(HIL_RES_PROTECT_NEXT_FOUND, 1);
    if (SEEDED(26))  /* seeded bug 26: the protected range is read after move_forward */
        move_forward(c);
    mb_result(HIL_RES_PROTECT_NEXT_START, range_start(c));
    mb_result(HIL_RES_PROTECT_NEXT_END, range_end(c));
    if (!SEEDED(26))
        move_forward(c);
    return 0;
}

u64 op_cursor(u64 op) {
    u64 a0 = mb_arg(0), a1 = mb_arg(1), a2 = mb_arg(2), err;
    struct cursor c;
    switch (op) {
    case HIL_OP_CURSOR:
    case HIL_OP_CURSOR_MUT:
        return op_open(op);
    case HIL_OP_CURSOR_DROP: {
        if ((err = load(a0, &c, false)))
            return err;
        struct reg_entry *vs = reg_find(HIL_REG_VM_SPACE, c.e->w[0]);
#if HIL_EXEC_UPSTREAM
        if (vs)
            vs->w[1] -= 1;  /* upstream: the number of live cursors */
#endif
        if (!HIL_EXEC_UPSTREAM && vs && vs->w[1] == c.e->id)
            vs->w[1] = 0;
        reg_free(c.e);  /* unlock only; no refcount change */
        return 0;
    }
    case HIL_OP_QUERY:
        if ((err = load(a0, &c, false)))
            return err;
        return op_query(&c);
    case HIL_OP_FIND_NEXT: {
        if ((err = load(a0, &c, false)))
            return err;
        nav_panics(&c, a1);
        if (find_next_clamped(&c, a1, false, false)) {
            mb_result(HIL_RES_FIND_NEXT_FOUND, 1);
            mb_result(HIL_RES_FIND_NEXT_VA, va_of(&c));
        }
        return 0;
    }
    case HIL_OP_JUMP:
        if ((err = load(a0, &c, false)))
            return err;
        return op_jump(&c, a1);
    case HIL_OP_VIRT_ADDR:
        if ((err = load(a0, &c, false)))
            return err;
        mb_result(HIL_RES_VIRT_ADDR_VA, va_of(&c));
        return 0;
    case HIL_OP_MAP:
        /* validation order: both ids, the cursor's kind, the handle's type, then the prop */
        if (!reg_find(HIL_REG_CURSOR, a0) || !reg_find(HIL_REG_FRAME, a1))
            return HIL_ERR_BAD_ID;
        if ((err = load(a0, &c, true)))
            return err;
        if (reg_find(HIL_REG_FRAME, a1)->w[1] != HIL_REG_FRAME_TYPE_UFRAME)
            return HIL_ERR_NOT_UFRAME;  /* map takes a UFrame: exec's types refuse any other */
        if (!prop_word_valid(a2))
            return HIL_ERR_BAD_ARG;
        return op_map(&c, a1, a2);
    case HIL_OP_UNMAP:
        if ((err = load(a0, &c, true)))
            return err;
        return op_unmap(&c, a1);
    case HIL_OP_PROTECT_NEXT:
        if ((err = load(a0, &c, true)))
            return err;
        if (!prop_transform_valid(a2))
            return HIL_ERR_BAD_ARG;
        return op_protect_next(&c, a1, a2);
    }
    return HIL_ERR_UNKNOWN_OP;
}
