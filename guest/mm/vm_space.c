/* VmSpace::new / drop and the harness-only Activate (spec §5.2, docs/semantics.md). */
#include "mm.h"

#if HIL_EXEC_UPSTREAM
/* The active VmSpace (0: the kernel page table) is registry[0].w[5] (hil/target/abi.py): the
 * CPU holds a reference on its root (PageTableNode::activate, U:mm/page_table/node/mod.rs:94)
 * and, for a VmSpace, the Arc that keeps it alive (U:mm/vm_space.rs:126, ACTIVATED_VM_SPACE). */
#define ACTIVE_VS (registry[0].w[5])

static u64 activate_upstream(u64 vsid, u64 root) {
    struct reg_entry *old_e = NULL;
    u64 old = mm.kernel_root;
    if (ACTIVE_VS) {
        old_e = reg_find(HIL_REG_VM_SPACE, ACTIVE_VS);
        if (!old_e)
            old_e = reg_find(HIL_REG_LEAKED_ROOT, ACTIVE_VS);
        if (!old_e)
            hil_panic(HIL_PANIC_GUEST_ASSERT, "the active VmSpace has no registry entry");
        old = old_e->w[0];
    }
    if (old == root)
        return 0;  /* already active: nothing */
    frame_inc_ref(root);  /* self.clone().into_raw(): may panic before anything changed */
    write_cr3(root);
    ACTIVE_VS = vsid;
    pt_node_drop_ref(old);  /* the old root loses the CPU's reference */
    if (old_e && old_e->kind == HIL_REG_LEAKED_ROOT) {
        /* the `last` Arc was the dropped VmSpace's last owner: its PageTable drops the root */
        reg_free(old_e);
        pt_node_drop_ref(old);
    }
    return 0;
}
#endif

u64 op_vm_space(u64 op) {
    u64 a0 = mb_arg(0);
    struct reg_entry *e;
    switch (op) {
    case HIL_OP_VM_SPACE_NEW: {
        if (reg_free_count() < 1)
            return HIL_ERR_NO_SPACE;
        /* create_user_page_table: a fresh zeroed root, then raw new_pt copies of the kernel
         * root's entries 256..511 (shared L3 nodes, their refcounts untouched; not counted
         * in the new root's nr_children because they are write_pte, not Entry::replace). */
        u64 root = pt_alloc_node(4);
        u64 *kr = pt_node(mm.kernel_root), *r = pt_node(root);
        for (int i = 256; i < NR_ENTRIES; i++) {
            if (!pte_is_present(kr[i]) || pte_is_last(kr[i]))
                hil_panic(HIL_PANIC_KERNEL_ROOT_ENTRY, "kernel root entry 256..511 absent or a leaf");
            r[i] = pte_new_pt(pte_paddr(kr[i]));
        }
        e = reg_new(HIL_REG_VM_SPACE, ID_VM_SPACE);
        e->w[0] = root;
        e->w[1] = 0;
        mb_result(HIL_RES_VM_SPACE_NEW_VS, e->id);
        mb_result(HIL_RES_VM_SPACE_NEW_ROOT, root);
        return 0;
    }
    case HIL_OP_VM_SPACE_DROP:
        if (!(e = reg_find(HIL_REG_VM_SPACE, a0)))
            return HIL_ERR_BAD_ID;
        if (e->w[1] && !SEEDED(22))  /* seeded bug 22: drop with a live cursor is let through */
            return HIL_ERR_VM_SPACE_BUSY;
    {
        /* Dropping VmSpace drops its PageTable's root PageTableNode (a Frame): rc - 1, and at
         * the last reference drop_last_in_place runs PageTablePageMeta::on_drop, which drops
         * every child of user entries 0..255 (TOP_LEVEL_INDEX_RANGE): the whole user tree is
         * freed, each mapped frame loses one reference per PTE (docs/semantics.md). */
        u64 root = e->w[0];
#if HIL_EXEC_UPSTREAM
        if (a0 == ACTIVE_VS) {  /* the activation's Arc keeps it alive until the next activate */
            e->kind = HIL_REG_LEAKED_ROOT;
            e->w[1] = 0;
            return 0;
        }
#endif
        reg_free(e);
        /* harness-only: the CPU must not keep a freed root in CR3 (exec's activate would hold
         * a reference on it; the guest does not model that reference, docs/semantics.md). */
        if ((read_cr3() & PHYS_ADDR_MASK) == root)
            write_cr3(mm.kernel_root);
        pt_node_drop_ref(root);
        return 0;
    }
    case HIL_OP_ACTIVATE:
#if HIL_EXEC_UPSTREAM
        if (a0 == 0)
            return activate_upstream(0, mm.kernel_root);
        if (!(e = reg_find(HIL_REG_VM_SPACE, a0)))
            return HIL_ERR_BAD_ID;
        return activate_upstream(a0, e->w[0]);
#endif
        if (a0 == 0) {
            write_cr3(mm.kernel_root);
            return 0;
        }
        if (!(e = reg_find(HIL_REG_VM_SPACE, a0)))
            return HIL_ERR_BAD_ID;
        write_cr3(e->w[0]);  /* kernel half stays mapped through the shared L3 nodes */
        return 0;
    }
    return HIL_ERR_UNKNOWN_OP;
}
