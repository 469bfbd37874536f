/* TLB flusher (spec §5.13, docs/semantics.md): ops are queued, dispatched once at the end of
 * map / unmap; the frames and stray page tables kept with them are dropped at dispatch. */
#include "mm.h"

#define FLUSH_ALL_OPS_THRESHOLD 32
#define FLUSH_ALL_RANGE_THRESHOLD (32 * PAGE_SIZE)

static struct {
    int n;
    u64 va[FLUSH_ALL_OPS_THRESHOLD], len[FLUSH_ALL_OPS_THRESHOLD];
    bool need_flush_all;
    u64 nkeep;
    u64 npages;  /* upstream: pages queued (U:mm/tlb.rs:318) */
} fl;

/* page_keeper lives in kernel-reserved RAM (not .bss): entry = paddr | 1 for a stray PT. */
static u64 *keeper(void) { return (u64 *)paddr_to_vaddr(mm.keeper_base); }

void tlb_flusher_begin(void) {
    fl.n = 0;
    fl.need_flush_all = false;
    fl.nkeep = 0;
    fl.npages = 0;
}

static void log_flush(u64 va) {
    u64 n = *mb_word(HIL_OFF_FLUSH_LOG_LEN);
    if (n < HIL_FLUSH_LOG_CAP)
        *mb_word(HIL_OFF_FLUSH_LOG + 8 * n) = va;
    *mb_word(HIL_OFF_FLUSH_LOG_LEN) = n + 1;
}

static void do_flushes(bool from_unmap) {
    if (fl.need_flush_all) {
        /* full flush (CR4.PGE is off: globals go too); seeded bug 13: reloads the kernel's
         * root instead of the current one (switching address spaces under the caller) */
        write_cr3(SEEDED(13) ? mm.kernel_root : read_cr3());
        *mb_word(HIL_OFF_TLB_FLUSH_ALL) += 1;
        log_flush(HIL_FLUSH_LOG_ALL);
    } else {
        /* seeded bug 1: unmap forgets invlpg; seeded bug 2: re-map forgets invlpg */
        bool skip = (from_unmap && SEEDED(1)) || (!from_unmap && SEEDED(2));
        for (int i = 0; i < fl.n && !skip; i++)
            for (u64 off = 0; off < fl.len[i]; off += PAGE_SIZE) {
                invlpg(fl.va[i] + off);
                *mb_word(HIL_OFF_TLB_INVLPG) += 1;
                log_flush(fl.va[i] + off);
            }
    }
    fl.n = 0;
    fl.need_flush_all = false;
    fl.npages = 0;
}

static void drop_kept(void) {
    u64 *k = keeper();
    for (u64 i = 0; i < fl.nkeep; i++) {
        if (k[i] & 1)
            pt_node_drop_ref(k[i] & ~1UL);
        else
            frame_drop_ref(k[i]);
    }
    fl.nkeep = 0;
}

void tlb_dispatch(bool from_unmap) {
    if (fl.n == 0 && !fl.need_flush_all && fl.nkeep == 0)
        return;  /* empty stack: nothing to do */
    do_flushes(from_unmap);
    drop_kept();
}

void tlb_issue_flush_with(u64 va, u64 len, u64 keep_pa, bool stray_pt) {
    if (fl.nkeep == mm.keeper_cap) {
        /* page_keeper full: flush what is queued and release it early; the op's end state
         * is the same as with one dispatch. */
        do_flushes(true);
        drop_kept();
    }
    keeper()[fl.nkeep++] = keep_pa | (stray_pt ? 1 : 0);
#if HIL_EXEC_UPSTREAM  /* pages, not ops: >= 32 pages queued is All (U:mm/tlb.rs:223, :318) */
    if (fl.need_flush_all)
        return;
    if (fl.npages + len / PAGE_SIZE >= FLUSH_ALL_OPS_THRESHOLD) {
        fl.need_flush_all = true;
        fl.n = 0;
        return;
    }
    fl.va[fl.n] = va;
    fl.len[fl.n] = len;
    fl.n++;
    fl.npages += len / PAGE_SIZE;
    return;
#endif
    if (len > FLUSH_ALL_RANGE_THRESHOLD)
        fl.need_flush_all = true;  /* TlbFlushOp::for_range: a long range becomes All */
    if (fl.need_flush_all)
        return;
    if (fl.n >= FLUSH_ALL_OPS_THRESHOLD) {
        fl.need_flush_all = true;
        fl.n = 0;
        return;
    }
    fl.va[fl.n] = va;
    fl.len[fl.n] = len;
    fl.n++;
}
