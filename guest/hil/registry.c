/* Handle registry (hil/abi.py): the harness reads live handles from here. Entry 0 holds
 * the id counters; the others are {kind, id, w[6]}, REG_FREE when unused. */
#include "mm.h"

struct reg_entry *registry;

void registry_init(u64 base_pa) {
    registry = paddr_to_vaddr(base_pa);
    memset(registry, 0, REGISTRY_ENTRIES * sizeof(struct reg_entry));
    registry[0].kind = HIL_REG_COUNTERS;
    for (int k = 0; k < NR_ID_KINDS; k++)
        registry[0].w[k] = 1;  /* ids start at 1; 0 never names a live object */
}

struct reg_entry *reg_find(u64 kind, u64 id) {
    if (id == 0)
        return NULL;
    for (int i = 1; i < REGISTRY_ENTRIES; i++)
        if (registry[i].kind == kind && registry[i].id == id)
            return &registry[i];
    return NULL;
}

u64 reg_free_count(void) {
    u64 n = 0;
    for (int i = 1; i < REGISTRY_ENTRIES; i++)
        n += registry[i].kind == HIL_REG_FREE;
    return n;
}

struct reg_entry *reg_new(u64 kind, int idkind) {
    for (int i = 1; i < REGISTRY_ENTRIES; i++) {
        struct reg_entry *e = &registry[i];
        if (e->kind == HIL_REG_FREE) {
            memset(e, 0, sizeof(*e));
            e->kind = kind;
            e->id = registry[0].w[idkind]++;
            return e;
        }
    }
    hil_panic(HIL_PANIC_GUEST_ASSERT, "registry full after the room check");
}

void reg_free(struct reg_entry *e) { memset(e, 0, sizeof(*e)); }
