"""The reference model of upstream OSTD (asterinas/asterinas, pinned in docs/semantics.md).

The same store as model/store.py (vostd's exec) with the handlers of the ops where upstream
decides otherwise replaced; `apply` has store.apply's contract. Each override names its
upstream source (`U:path:line`, paths under ostd/src/ at the pinned commit). A guest built with
`make -C guest EXEC=upstream` follows this model (hil_layout's `exec` word selects it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from model import ops as o
from model import store
from model.ops import ErrorCode, OpResult, PanicCode
from model.state import CursorView, State
from model.store import _Cursor, _cursor, _Err, _index, _live, _ok, _Panic, _Tx, prop_ok
from model.types import (
    NR_LEVELS,
    PAGE_SIZE,
    REF_COUNT_MAX,
    TOP_LEVEL_USER_ENTRIES,
    USER_VA_END,
    CachePolicy,
    PageProperty,
    Usage,
    align_down,
    frame_to_index,
    page_size,
    pte_is_last,
    pte_is_present,
    pte_paddr,
)
from model.types import pte_new_page as vostd_pte_new_page
from model.types import pte_prop as vostd_pte_prop
from model.types import pte_set_prop as vostd_pte_set_prop

EXECS = ("vostd", "upstream")  # hil.target.abi.EXEC_NAMES, in the same order
Model = Callable[[State, o.Op, Callable[[int], int]], tuple[OpResult, State]]

# U:arch/x86/mm/pat.rs:15 (IA32_PAT_MAPPINGS) and :38 (cache_policy_to_flags): PCD|PWT picks a
# PAT index; WriteProtected has no index (panic "unsupported cache policy").
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
CACHE_BITS = {
    CachePolicy.WRITEBACK: 0,
    CachePolicy.WRITETHROUGH: PTE_PWT,
    CachePolicy.WRITE_COMBINING: PTE_PCD,
    CachePolicy.UNCACHEABLE: PTE_PCD | PTE_PWT,
}
UNSUPPORTED_CACHES = (CachePolicy.WRITE_PROTECTED,)
# the PAT MSR configure_pat writes (U:arch/x86/mm/pat.rs:68): entries 0..7 = WB WT WC UC WB WT WC UC
PAT_MSR = 0x0001040600010406


def pte_new_page(paddr: int, prop: PageProperty) -> int:
    """U:arch/x86/mm/mod.rs:229 new_page: vostd's bits except the cache policy's."""
    raw = vostd_pte_new_page(paddr, dataclasses.replace(prop, cache=CachePolicy.WRITEBACK))
    return raw | CACHE_BITS[prop.cache]


def pte_set_prop(raw: int, prop: PageProperty) -> int:
    if not pte_is_present(raw):
        return raw
    out = vostd_pte_set_prop(raw, dataclasses.replace(prop, cache=CachePolicy.WRITEBACK))
    return out | CACHE_BITS[prop.cache]


def pte_prop(raw: int) -> PageProperty:
    """U:arch/x86/mm/mod.rs:197 prop -> flags_to_cache_policy (U:arch/x86/mm/pat.rs:26)."""
    prop = vostd_pte_prop(raw & ~(PTE_PCD | PTE_PWT))
    index = (2 if raw & PTE_PCD else 0) | (1 if raw & PTE_PWT else 0)
    cache = (CachePolicy.WRITEBACK, CachePolicy.WRITETHROUGH, CachePolicy.WRITE_COMBINING,
             CachePolicy.UNCACHEABLE)[index]  # fmt: skip
    return dataclasses.replace(prop, cache=cache)


_HANDLERS: dict[type[o.Op], store.Handler] = dict(store._HANDLERS)


def _handles(cls: type[o.Op]) -> Callable[[store.Handler], store.Handler]:
    def deco(fn: store.Handler) -> store.Handler:
        _HANDLERS[cls] = fn
        return fn

    return deco


def apply(state: State, op: o.Op, alloc: Callable[[int], int]) -> tuple[OpResult, State]:
    """store.apply with upstream's handlers and cursor mechanics; an Activate that ran moves the
    CPU's reference (State.active) to its VmSpace."""
    result, after = store.apply(state, op, alloc, handlers=_HANDLERS, cursor_cls=_UpCursor)
    if isinstance(op, o.Activate) and result.status == o.Status.OK:
        after = dataclasses.replace(after, active=op.vs)
    return result, after


class _UpCursor(_Cursor):
    """Upstream's cursor: the VmSpace counts its cursors (open / drop keep it), and find_next_impl
    clamps va to the barrier end when nothing was found (U:mm/page_table/cursor/mod.rs:250)."""

    def save(self) -> None:
        self.tx.cursors[self.c.id] = self.c.view()

    def find_next_impl(self, length: int, unmap_subtree: bool, split_huge: bool) -> int | None:
        found = super().find_next_impl(length, unmap_subtree, split_huge)
        if found is None and self.c.va > self.c.end:
            self.c.va = self.c.end
        return found


def guard_level(start: int, end: int) -> int:
    """lock_range's subtree root (U:mm/page_table/cursor/locking.rs:90): the lowest level whose
    node holds all of [start, end) (no huge leaves in user tables: the Mapped break never fires)."""
    for level in range(NR_LEVELS, 1, -1):
        if _index(start, level) != _index(end - 1, level):
            return level
    return 1


def guard_span(start: int, level: int) -> tuple[int, int]:
    """The VA span of the guard node of a cursor starting at `start` with guard `level`."""
    size = page_size(level + 1)
    lo = align_down(start, size)
    return lo, lo + size


def apply_for(exec_name: str) -> Model:
    """The model of the exec a guest build follows (hil_layout `exec`, abi.EXEC_NAMES)."""
    if exec_name == "vostd":
        return store.apply
    if exec_name == "upstream":
        return apply
    raise ValueError(f"unknown exec {exec_name!r}: expected one of {', '.join(EXECS)}")


def _root_of(tx: _Tx, vs: int) -> int:
    return tx.base.kernel_root if vs == 0 else tx.tree(vs).root


@_handles(o.Activate)
def _activate(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    """VmSpace::activate (U:mm/vm_space.rs:126) -> PageTableNode::activate
    (U:mm/page_table/node/mod.rs:94): the new root gains the CPU's reference (Frame::clone: PANIC
    REF_COUNT_OVERFLOW), the old one loses it; a VmSpace dropped while active (kept by the Arc in
    ACTIVATED_VM_SPACE, a leaked tree here) is dropped then. Activate(0): the kernel page table."""
    assert isinstance(op, o.Activate)
    if op.vs != 0:
        _live(tx.vm_spaces, op.vs)
    new, old_vs = _root_of(tx, op.vs), tx.base.active
    old = _root_of(tx, old_vs)
    if new == old:
        return _ok(op)
    i = frame_to_index(new)
    s = tx.slot(i)
    if s.rc >= REF_COUNT_MAX:
        raise _Panic(PanicCode.REF_COUNT_OVERFLOW)
    tx.put_slot(i, dataclasses.replace(s, rc=s.rc + 1))
    store._drop_ref(tx, old)
    if old_vs in tx.leaked:  # the last Arc: the VmSpace's PageTable drops its root
        _release_tree(tx, old_vs)
        del tx.leaked[old_vs]
    return _ok(op)


def _release_tree(tx: _Tx, vs: int) -> None:
    """store._drop_vm_space's release of a tree: it stops being walked, the root loses the
    VmSpace's reference, on_drop frees it at the last one."""
    root = tx.root(vs)
    i = frame_to_index(root.paddr)
    s = tx.slot(i)
    tx.put_slot(i, dataclasses.replace(s, paths=s.paths - {()}))
    tx.detached[root.paddr] = root
    for k in TOP_LEVEL_USER_ENTRIES:
        if pte_is_present(root.entries[k]):
            store._detach(tx, vs, pte_paddr(root.entries[k]), stray=False)
    tx.nodes.pop(vs, None)
    tx.put_frame(root.paddr)


@_handles(o.DropVmSpace)
def _drop_vm_space(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    """The active VmSpace is kept alive by the activation's Arc: its handle goes (the registry
    entry becomes a leaked root, still walked), nothing is freed until the next activate."""
    assert isinstance(op, o.DropVmSpace)
    if op.vs == 0 or op.vs != tx.base.active or op.vs not in tx.vm_spaces:
        return store._drop_vm_space(tx, op, alloc)
    view = tx.vm_spaces[op.vs]
    if view.cursor:
        raise _Err(ErrorCode.VM_SPACE_BUSY)
    del tx.vm_spaces[op.vs]
    tx.leaked[op.vs] = view.with_cursor(0)
    return _ok(op)


@_handles(o.FrameDrop)
def _frame_drop(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    """Frame::drop -> drop_last_in_place dispatches by vtable: the last reference of a page-table
    node runs PageTablePageMeta::on_drop (U:mm/page_table/node/mod.rs:296), its children are
    dropped (their entries: State.held_nodes, read by the snapshot)."""
    assert isinstance(op, o.FrameDrop)
    _live(tx.frames, op.frame)
    paddr = tx.frames.pop(op.frame)
    s = tx.slot(frame_to_index(paddr))
    if s.rc == 1 and s.vt == int(Usage.PAGE_TABLE):
        for held, node in tx.base.held_nodes.items():
            tx.detached.setdefault(held, node)
        tx.put_frame(paddr)
    else:
        store._drop_ref(tx, paddr)
    return _ok(op)


@_handles(o.UniqueDrop)
def _unique_drop(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    """UniqueFrame::drop -> drop_last_in_place: on a page-table node (a held node turned unique
    by TryFromShared) on_drop drops its children, as FrameDrop's last reference does."""
    assert isinstance(op, o.UniqueDrop)
    _live(tx.uniques, op.unique)
    paddr = tx.uniques[op.unique]
    s = tx.slot(frame_to_index(paddr))
    if s.vt != int(Usage.PAGE_TABLE):
        return store._unique_drop(tx, op, alloc)
    del tx.uniques[op.unique]
    tx.put_slot(frame_to_index(paddr), dataclasses.replace(s, rc=1))
    for held, node in tx.base.held_nodes.items():
        tx.detached.setdefault(held, node)
    tx.put_frame(paddr)
    return _ok(op)


@_handles(o.OpenCursor)
@_handles(o.OpenCursorMut)
def _open_cursor(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    """U:mm/vm_space.rs:113 -> lock_range: the guard node is the lowest covering one; missing
    nodes from the root down to it are allocated at open; the cursor starts at its level.
    Harness-only: a guard span meeting a live cursor's is CURSOR_BUSY (exec could block), checked
    once the range is valid (the spans need it)."""
    assert isinstance(op, (o.OpenCursor, o.OpenCursorMut))
    _live(tx.vm_spaces, op.vs)
    view = tx.vm_spaces[op.vs]
    store._registry_room(tx.base, 1)
    if not (op.start < op.end and op.start % PAGE_SIZE == 0 and op.end % PAGE_SIZE == 0 and op.end <= USER_VA_END):
        raise _Err(ErrorCode.ACCESS_DENIED)
    guard = guard_level(op.start, op.end)
    lo, hi = guard_span(op.start, guard)
    for other in tx.cursors.values():
        olo, ohi = guard_span(other.start, other.guard_level)
        if other.vs == op.vs and lo < ohi and olo < hi:
            raise _Err(ErrorCode.CURSOR_BUSY)
    node = tx.root(op.vs)
    for level in range(NR_LEVELS, guard, -1):  # try_traverse_and_lock_subtree_root
        k = _index(op.start, level)
        pte = node.entries[k]
        if not pte_is_present(pte):
            node = tx.alloc_node(alloc, op.vs, node, k)
        elif pte_is_last(pte):
            raise AssertionError("huge leaf in a user page table (split unreachable)")
        else:
            node = tx.node(op.vs, pte_paddr(pte))
    cid = tx.fresh_id("cursor")
    tx.cursors[cid] = CursorView(cid, op.vs, isinstance(op, o.OpenCursorMut), op.start, op.end, op.start,
                                 guard, guard)  # fmt: skip
    tx.vm_spaces[op.vs] = view.with_cursor(view.cursor + 1)  # upstream: a count
    return _ok(op, cursor=cid)


@_handles(o.DropCursor)
def _drop_cursor(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    """U:mm/page_table/cursor/mod.rs:340 unlock_range: no ref-count change; one cursor fewer."""
    assert isinstance(op, o.DropCursor)
    c = _cursor(tx.base, op.cursor)
    del tx.cursors[op.cursor]
    view = tx.vm_spaces.get(c.vs)
    if view is not None:
        tx.vm_spaces[c.vs] = view.with_cursor(view.cursor - 1)
    return _ok(op)


@_handles(o.Jump)
def _jump(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    """U:mm/page_table/cursor/mod.rs:264: a cursor at the barrier end pops to its guard level."""
    assert isinstance(op, o.Jump)
    view = _cursor(tx.base, op.cursor)
    if op.va % PAGE_SIZE:
        raise _Panic(PanicCode.JUMP_UNALIGNED)
    if not view.start <= op.va < view.end:
        raise _Err(ErrorCode.INVALID_VADDR)
    if view.va != view.end:
        return store._jump(tx, op, alloc)
    tx.cursors[view.id] = dataclasses.replace(view, va=op.va, level=view.guard_level)
    return _ok(op)


@_handles(o.Query)
def _query(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    """U:mm/page_table/cursor/mod.rs:131: the item is borrowed (VmQueriedItem,
    U:mm/vm_space.rs:272): no handle, no ref-count change, so no registry room is needed."""
    assert isinstance(op, o.Query)
    view = _cursor(tx.base, op.cursor)
    if view.va >= view.end:
        raise _Err(ErrorCode.INVALID_VADDR)
    cur = tx.cursor(view)
    try:
        while True:
            pte = cur.entry()
            start, end = cur.va_range()
            if not pte_is_present(pte):
                return _ok(op, present=0, start=start, end=end)
            if pte_is_last(pte) or cur.c.level == 1:
                return _ok(op, present=1, start=start, end=end, paddr=pte_paddr(pte), prop=pte_prop(pte).encode(),
                           frame=0)  # fmt: skip
            cur.c.level -= 1
    finally:
        cur.save()


@_handles(o.Map)
def _map(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    """U:mm/vm_space.rs:372 -> U:mm/page_table/cursor/mod.rs:422: the asserts, the descent that
    allocates missing nodes, then a panic if the slot is not absent (:469); WriteCombining is
    encoded through the PAT, WriteProtected panics in cache_policy_to_flags."""
    assert isinstance(op, o.Map)
    view = _cursor(tx.base, op.cursor)
    _live(tx.frames, op.frame)
    view = _cursor(tx.base, op.cursor, mutable=True)
    if not store._is_uframe(tx, tx.frames[op.frame]):
        raise _Err(ErrorCode.NOT_UFRAME)
    if not prop_ok(op.prop):
        raise _Err(ErrorCode.BAD_ARG)
    if view.va >= view.end or view.va + PAGE_SIZE > view.end:
        raise _Panic(PanicCode.MAP_OUT_OF_RANGE)
    paddr = tx.frames.pop(op.frame)  # the UFrame moves into the item
    cur = tx.cursor(view)
    try:
        while cur.c.level != 1:
            node = cur.node()
            pte = node.entries[_index(cur.c.va, cur.c.level)]
            if not pte_is_present(pte):
                tx.alloc_node(alloc, view.vs, node, _index(cur.c.va, cur.c.level))
            elif pte_is_last(pte):
                raise AssertionError("huge leaf in a user page table (split unreachable)")
            cur.c.level -= 1
        node = cur.node()
        k = _index(cur.c.va, 1)
        if pte_is_present(node.entries[k]):
            raise _Panic(PanicCode.MAP_ALREADY_MAPPED)
        if op.prop.cache in UNSUPPORTED_CACHES:  # new_page -> cache_policy_to_flags
            raise _Panic(PanicCode.UNSUPPORTED_CACHE)
        tx.set_entry(view.vs, node, k, pte_new_page(paddr, op.prop))
        tx.adjust_children(node.paddr, +1)
        tx.add_ref(paddr, node.path + (k,))
        cur.move_forward()
        return _ok(op, replaced=0, old_paddr=0)
    finally:
        cur.save()



@_handles(o.ProtectNext)
def _protect_next(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    """U:mm/page_table/cursor/mod.rs:544 protect_next with upstream's PTE encoding (WriteCombining
    through the PAT, WriteProtected panics); the entry is written only on a change."""
    assert isinstance(op, o.ProtectNext)
    view = _cursor(tx.base, op.cursor, mutable=True)
    if not op.transform.valid():
        raise _Err(ErrorCode.BAD_ARG)
    store._nav_panics(view, op.len)
    cur = tx.cursor(view)
    try:
        if cur.find_next_impl(op.len, False, True) is None:
            return _ok(op, found=0)
        node = cur.node()
        k = _index(cur.c.va, cur.c.level)
        pte = node.entries[k]
        old = pte_prop(pte)
        new = op.transform.apply(old)
        if new != old:
            if new.cache in UNSUPPORTED_CACHES:
                raise _Panic(PanicCode.UNSUPPORTED_CACHE)
            tx.set_entry(view.vs, node, k, pte_set_prop(pte, new))
        start, end = cur.va_range()
        cur.move_forward()
        return _ok(op, found=1, start=start, end=end)
    finally:
        cur.save()
