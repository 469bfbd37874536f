/* PTE encoding (spec §5.12) and the page-table node allocator (docs/semantics.md). */
#include "mm.h"

bool prop_word_valid(u64 prop) {
    /* docs/semantics.md validation 3: known bits, R set, cache code <= 4. */
    u64 flags = prop & 0xff, cache = (prop >> 8) & 0xff, priv = (prop >> 16) & 0xff;
    return (prop >> 24) == 0 && !(flags & ~PF_ALL) && (flags & PF_R) && cache <= CACHE_WB &&
           !(priv & ~PRIV_ALL);
}

bool prop_cache_supported(u64 prop) {
    u64 cache = (prop >> 8) & 0xff;
#if HIL_EXEC_UPSTREAM  /* WC goes through the PAT; WP panics (U:arch/x86/mm/pat.rs:38) */
    return cache != CACHE_WP;
#endif
    return cache != CACHE_WC && cache != CACHE_WP;  /* set_prop panics on these (§5.12) */
}

static u64 pte_prop_bits(u64 prop) {
    u64 flags = prop & 0xff, cache = (prop >> 8) & 0xff, priv = (prop >> 16) & 0xff, b = 0;
    if (flags & PF_R) b |= PTE_P;
    if (flags & PF_W) b |= PTE_RW;
    if (!(flags & PF_X)) b |= PTE_NX;
    if (flags & PF_ACCESSED) b |= PTE_A;
    if (flags & PF_DIRTY) b |= PTE_D;
    if (flags & PF_AVAIL1) b |= PTE_IGN1;
    if (flags & PF_AVAIL2) b |= PTE_IGN2;
    if (priv & PRIV_USER) b |= PTE_US;
    if (priv & PRIV_GLOBAL) b |= PTE_G;
#if HIL_EXEC_UPSTREAM  /* PAT index PCD<<1|PWT: WB 0, WT 1, WC 2, UC 3 (U:arch/x86/mm/pat.rs:15) */
    if (cache == CACHE_WT) b |= PTE_PWT;
    else if (cache == CACHE_WC) b |= PTE_PCD;
    else if (cache == CACHE_UC) b |= PTE_PCD | PTE_PWT;
    return b;
#endif
    if (cache == CACHE_WT) b |= PTE_PWT;
    else if (cache == CACHE_UC) b |= PTE_PCD;
    return b;
}

u64 pte_set_prop(u64 raw, u64 prop) {
    /* §5.12 set_prop: no-op if absent; keeps the paddr bits and bit 7, rewrites the rest. */
    if (!pte_is_present(raw))
        return raw;
    return (raw & ~PROP_MASK) | pte_prop_bits(prop);
}

u64 pte_new_page(u64 pa, u64 prop) {
    /* §5.12 new_page: every leaf, at every level, has bit 7 (the L1 PAT bit; default PAT). */
    return pte_set_prop((pa & PHYS_ADDR_MASK) | PTE_HUGE, prop);
}

u64 pte_prop(u64 raw) {
    u64 flags = 0, priv = 0, cache;
    if (raw & PTE_P) flags |= PF_R;
    if (raw & PTE_RW) flags |= PF_W;
    if (!(raw & PTE_NX)) flags |= PF_X;
    if (raw & PTE_A) flags |= PF_ACCESSED;
    if (raw & PTE_D) flags |= PF_DIRTY;
    if (raw & PTE_IGN1) flags |= PF_AVAIL1;
    if (raw & PTE_IGN2) flags |= PF_AVAIL2;
    if (raw & PTE_US) priv |= PRIV_USER;
    if (raw & PTE_G) priv |= PRIV_GLOBAL;
    cache = (raw & PTE_PCD) ? CACHE_UC : (raw & PTE_PWT) ? CACHE_WT : CACHE_WB;
#if HIL_EXEC_UPSTREAM  /* flags_to_cache_policy (U:arch/x86/mm/pat.rs:26) */
    cache = (raw & PTE_PCD) ? ((raw & PTE_PWT) ? CACHE_UC : CACHE_WC) : (raw & PTE_PWT) ? CACHE_WT : CACHE_WB;
#endif
    return flags | (cache << 8) | (priv << 16);
}

/* PropTransform word: set 0-7, clear 8-15, cache 16-23, set_priv 24-31, clear_priv 32-39. */
bool prop_transform_valid(u64 t) {
    u64 set = t & 0xff, clr = (t >> 8) & 0xff, cache = (t >> 16) & 0xff;
    u64 sp = (t >> 24) & 0xff, cp = (t >> 32) & 0xff;
    return (t >> 40) == 0 && !((set | clr) & ~PF_ALL) && !((sp | cp) & ~PRIV_ALL) &&
           !(clr & PF_R) && (cache == KEEP_CACHE || cache <= CACHE_WB);
}

u64 prop_transform_apply(u64 t, u64 prop) {
    u64 set = t & 0xff, clr = (t >> 8) & 0xff, cache = (t >> 16) & 0xff;
    u64 sp = (t >> 24) & 0xff, cp = (t >> 32) & 0xff;
    u64 flags = ((prop & 0xff) & ~clr) | set;
    u64 priv = (((prop >> 16) & 0xff) & ~cp) | sp;
    u64 c = cache == KEEP_CACHE ? (prop >> 8) & 0xff : cache;
    return flags | (c << 8) | (priv << 16);
}

u64 pt_alloc_node(int level) {
    /* PageTableNode::alloc (§5.10): the lowest-addressed pool slot with rc UNUSED, zeroed,
     * rc 1, PageTablePageMeta::new(level). */
    for (u64 pa = mm.pt_pool_start; pa < mm.pt_pool_end; pa += PAGE_SIZE) {
        /* seeded bug 11: the check reads the next page's slot (an off-by-one in the index) */
        if (meta_slot(SEEDED(11) ? pa + PAGE_SIZE : pa)->ref_count != REF_COUNT_UNUSED)
            continue;
        if (!SEEDED(7))  /* seeded bug 7: the new node keeps whatever the page held */
            memset(pt_node(pa), 0, PAGE_SIZE);
        meta_mark_pt_node(pa, (u8)level, 0);
        return pa;
    }
    hil_panic(HIL_PANIC_OUT_OF_MEMORY, "page-table node pool exhausted");
}

#if HIL_EXEC_UPSTREAM
/* configure_pat (U:arch/x86/mm/pat.rs:68): entries 0..7 = WB WT WC UC WB WT WC UC, so a leaf's
 * PCD|PWT (bit 7 set on every leaf: entries 4..7) picks its cache policy. The value read back
 * is kept for the harness (tests/hil/test_upstream.py). */
u64 hil_pat_msr;

void configure_pat(void) {
    u64 pat = 0x0001040600010406ULL;
    u32 lo, hi;
    __asm__ volatile("wrmsr" ::"c"(0x277), "a"((u32)pat), "d"((u32)(pat >> 32)) : "memory");
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0x277));
    hil_pat_msr = (u64)hi << 32 | lo;
}
#endif
