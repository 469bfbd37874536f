"""Hand-written scenarios for every op, from the exec rules of §5 and docs/semantics.md."""

from __future__ import annotations

import dataclasses

import pytest
from model_helpers import BASE, LAY, RAM, GiB, MiB, Run, data, known_finding

from model import ops as o
from model.invariants import check_invariants
from model.ops import ErrorCode, PanicCode, Status
from model.store import PoolAllocator, apply, initial_state
from model.types import (
    PAGE_SIZE,
    PTE_PCD,
    PTE_PWT,
    REF_COUNT_MAX,
    REF_COUNT_UNIQUE,
    REF_COUNT_UNUSED,
    CachePolicy,
    PageProperty,
    PropTransform,
    StorageTag,
    Usage,
    frame_to_index,
    pte_new_page,
    pte_new_pt,
    pte_paddr,
)

P0 = LAY.pt_pool_start


def clean_inv(run: Run) -> None:
    assert [v for v in check_invariants(run.state) if not known_finding(v)] == []


def setup_mapped(n: int = 1, start: int = 0, end: int = GiB) -> tuple[Run, int, int]:
    run = Run()
    vs = run.vm_space()
    c = run.cursor(vs, start, end)
    for k in range(n):
        run.map_at(c, start + k * PAGE_SIZE, k)
    return run, vs, c


# --- VmSpace ---------------------------------------------------------------------------------


def test_new_vm_space_root() -> None:
    run = Run()
    r = run.ok(o.NewVmSpace())
    assert r.values == (("vs", 1), ("root", P0))
    s = run.state.slot_of(P0)
    assert (s.rc, s.usage, s.sto, s.paths, s.refs) == (1, Usage.PAGE_TABLE, (StorageTag.PT_NODE, 4), {()}, 0)
    assert s.node is not None and s.node.nr_children == 0
    root = run.state.vm_spaces[1].nodes[P0]
    assert root.entries[:256] == (0,) * 256
    assert root.entries[256:] == BASE.kernel_upper
    clean_inv(run)


def test_new_vm_space_kernel_root_entry_panic() -> None:
    bad = dataclasses.replace(BASE, kernel_upper=BASE.kernel_upper[:-1] + (0,))
    run = Run(bad)
    r = run.do(o.NewVmSpace())
    assert r == o.OpResult.panic(PanicCode.KERNEL_ROOT_ENTRY)
    assert run.state.slot_of(P0).rc == 1 and not run.state.vm_spaces  # root allocated, no VmSpace


def test_drop_vm_space_frees_tree() -> None:
    """Exec drops the root PageTableNode: at its last reference on_drop frees the user tree
    (every node's slot UNUSED) and each mapped frame loses one reference per PTE."""
    run, vs, c = setup_mapped(2)
    run.map_at(c, GiB // 2, 0)  # data(0) mapped twice (FrameFromInUse: rc 2 after the map)
    keep = run.ok(o.FrameFromInUse(paddr=data(1))).get("frame")  # data(1): PTE + handle
    assert run.do(o.DropVmSpace(vs=vs)) == o.OpResult.err(ErrorCode.VM_SPACE_BUSY)
    run.ok(o.DropCursor(cursor=c))
    nodes = sorted(run.state.vm_spaces[vs].nodes)
    assert len(nodes) == 5  # root, L3, two L2 / L1 paths share the L3
    run.ok(o.DropVmSpace(vs=vs))
    s = run.state
    assert vs not in s.vm_spaces and not s.leaked
    for pa in nodes:
        assert s.slot_of(pa).rc == REF_COUNT_UNUSED and s.slot_of(pa).usage == Usage.PAGE_TABLE
        assert s.slot_of(pa).paths == frozenset() and s.slot_of(pa).refs == 0
    assert s.slot_of(data(0)).rc == REF_COUNT_UNUSED  # two PTEs, two references
    assert (s.slot_of(data(1)).rc, s.slot_of(data(1)).paths, s.slot_of(data(1)).refs) == (1, frozenset(), 0)
    assert s.frames == {keep: data(1)}
    assert run.do(o.OpenCursor(vs=vs, start=0, end=GiB)) == o.OpResult.err(ErrorCode.BAD_ID)
    clean_inv(run)


def test_drop_vm_space_root_held_by_a_handle() -> None:
    """A FrameFromInUse handle on the root keeps it: the drop is rc - 1 and nothing else is
    released (the tree is no longer walked)."""
    run, vs, c = setup_mapped(1)
    root = run.state.vm_spaces[vs].root
    run.ok(o.FrameFromInUse(paddr=root))
    run.ok(o.DropCursor(cursor=c))
    run.ok(o.DropVmSpace(vs=vs))
    s = run.state
    assert s.slot_of(root).rc == 1 and s.slot_of(root).paths == frozenset()
    assert s.slot_of(data(0)).rc == 1 and s.slot_of(data(0)).paths == frozenset()


# --- cursor open / drop ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start,end", [(0, 0), (PAGE_SIZE, 0), (8, PAGE_SIZE), (0, PAGE_SIZE + 8), (0, (1 << 47) + PAGE_SIZE)]
)
def test_open_cursor_access_denied(start: int, end: int) -> None:
    run = Run()
    vs = run.vm_space()
    before = run.state
    assert run.do(o.OpenCursorMut(vs=vs, start=start, end=end)) == o.OpResult.err(ErrorCode.ACCESS_DENIED)
    assert run.state == before and run.state.changed == frozenset()


def test_open_cursor_busy_and_drop() -> None:
    run = Run()
    vs = run.vm_space()
    c = run.cursor(vs, 0, GiB, mutable=False)
    cur = run.state.cursors[c]
    assert (cur.va, cur.level, cur.guard_level, cur.mutable) == (0, 4, 4, False)
    assert run.state.vm_spaces[vs].cursor == c
    assert run.do(o.OpenCursorMut(vs=vs, start=8, end=0)) == o.OpResult.err(ErrorCode.CURSOR_BUSY)
    run.ok(o.DropCursor(cursor=c))
    assert run.state.vm_spaces[vs].cursor == 0 and c not in run.state.cursors
    assert run.do(o.DropCursor(cursor=c)) == o.OpResult.err(ErrorCode.BAD_ID)


# --- map ------------------------------------------------------------------------------------------


def test_first_map_allocates_three_nodes() -> None:
    run = Run()
    vs = run.vm_space()
    va = (3 << 39) | (5 << 30) | (7 << 21) | (9 << 12)
    c = run.cursor(vs, va, va + 2 * PAGE_SIZE)
    f = run.frame(0)
    prop = PageProperty.rw_user()
    assert run.ok(o.Map(cursor=c, frame=f, prop=prop)).values == (("replaced", 0), ("old_paddr", 0))
    l3, l2, l1 = P0 + PAGE_SIZE, P0 + 2 * PAGE_SIZE, P0 + 3 * PAGE_SIZE
    view = run.state.vm_spaces[vs]
    assert view.nodes[P0].entries[3] == pte_new_pt(l3)
    assert view.nodes[l3].entries[5] == pte_new_pt(l2) and view.nodes[l3].path == (3,)
    assert view.nodes[l2].entries[7] == pte_new_pt(l1) and view.nodes[l2].path == (3, 5)
    assert view.nodes[l1].entries[9] == pte_new_page(data(0), prop)
    for pa, level, path in ((l3, 3, (3,)), (l2, 2, (3, 5)), (l1, 1, (3, 5, 7))):
        s = run.state.slot_of(pa)
        assert (s.rc, s.usage, s.sto, s.paths, s.refs) == (1, Usage.PAGE_TABLE, (3, level), {path}, 1)
        assert s.node is not None and s.node.nr_children == 1 and s.node.level == level
    assert run.state.slot_of(P0).node.nr_children == 1  # type: ignore[union-attr]
    d = run.state.slot_of(data(0))
    assert (d.rc, d.paths, d.refs) == (1, {(3, 5, 7, 9)}, 1)
    assert f not in run.state.frames
    cur = run.state.cursors[c]
    assert (cur.va, cur.level) == (va + PAGE_SIZE, 1)
    assert all(known_finding(v) for v in run.axioms())
    clean_inv(run)


def test_map_move_forward_pops_at_node_boundary() -> None:
    run = Run()
    vs = run.vm_space()
    c = run.cursor(vs, 2 * MiB - PAGE_SIZE, 4 * MiB)
    run.ok(o.Map(cursor=c, frame=run.frame(0)))
    cur = run.state.cursors[c]
    assert (cur.va, cur.level) == (2 * MiB, 2)


def test_remap_releases_old_frame_and_flags_map_2() -> None:
    run, vs, c = setup_mapped(1)
    run.ok(o.Jump(cursor=c, va=0))
    f1 = run.frame(1)
    r = run.ok(o.Map(cursor=c, frame=f1))
    assert r.values == (("replaced", 1), ("old_paddr", data(0)))
    old = run.state.slot_of(data(0))
    assert (old.rc, old.vt, old.sto, old.paths, old.usage) == (REF_COUNT_UNUSED, None, None, frozenset(), Usage.FRAME)
    assert run.state.slot_of(P0 + 3 * PAGE_SIZE).node.nr_children == 1  # type: ignore[union-attr]
    clean_inv(run)
    # spec finding: MAP-2/3/7 do not allow the release of the replaced frame (§5.7 step 6)
    clauses = {(v.clause, v.slot) for v in run.axioms()}
    t_old = frame_to_index(data(0))
    assert {("MAP-2", t_old), ("MAP-3", t_old), ("MAP-7", t_old)} <= clauses


def test_remap_with_a_second_handle_keeps_frame() -> None:
    run, vs, c = setup_mapped(1)
    run.ok(o.FrameFromInUse(paddr=data(0)))
    run.ok(o.Jump(cursor=c, va=0))
    run.ok(o.Map(cursor=c, frame=run.frame(1)))
    assert run.state.slot_of(data(0)).rc == 1
    assert [v.clause for v in run.axioms()] == ["MAP-2"]


def test_map_same_frame_over_itself() -> None:
    run, vs, c = setup_mapped(1)
    fid = run.ok(o.FrameFromInUse(paddr=data(0))).get("frame")
    assert run.state.slot_of(data(0)).rc == 2
    run.ok(o.Jump(cursor=c, va=0))
    r = run.ok(o.Map(cursor=c, frame=fid))
    assert r.values == (("replaced", 1), ("old_paddr", data(0)))
    s = run.state.slot_of(data(0))
    assert (s.rc, s.paths, s.refs) == (1, {(0, 0, 0, 0)}, 1)
    clean_inv(run)
    assert {"MAP-4", "MAP-5"} <= {v.clause for v in run.axioms()}  # spec finding


def test_same_path_in_two_vm_spaces_flags_map_5() -> None:
    run, vs, c = setup_mapped(1)
    vs2 = run.vm_space()
    c2 = run.cursor(vs2)
    run.ok(o.Map(cursor=c2, frame=run.ok(o.FrameFromInUse(paddr=data(0))).get("frame")))
    s = run.state.slot_of(data(0))
    assert (s.rc, s.paths, s.refs) == (2, {(0, 0, 0, 0)}, 2)
    assert "MAP-5" in {v.clause for v in run.axioms()}  # |paths| is a set size: literal finding
    # and A3 (rc == H + |paths|) fails as well: the set cannot count two PTEs
    assert "A3" in {v.clause for v in check_invariants(run.state)}


def test_map_panics_and_errors() -> None:
    run = Run()
    vs = run.vm_space()
    c = run.cursor(vs, 0, PAGE_SIZE)
    ro = None
    f = run.frame(0)
    before = run.state
    assert run.do(o.Map(cursor=c, frame=99)) == o.OpResult.err(ErrorCode.BAD_ID)
    assert run.do(o.Map(cursor=c, frame=f, prop=PageProperty(flags=2))) == o.OpResult.err(ErrorCode.BAD_ARG)
    assert run.do(o.Map(cursor=c, frame=f, prop=PageProperty(flags=0x21))) == o.OpResult.err(ErrorCode.BAD_ARG)
    assert run.state == before
    run.ok(o.Map(cursor=c, frame=f))
    f2 = run.frame(1)
    assert run.do(o.Map(cursor=c, frame=f2)) == o.OpResult.panic(PanicCode.MAP_OUT_OF_RANGE)
    run.ok(o.DropCursor(cursor=c))
    ro = run.cursor(vs, 0, GiB, mutable=False)
    assert run.do(o.Map(cursor=ro, frame=f2)) == o.OpResult.err(ErrorCode.WRONG_KIND)
    assert run.do(o.Unmap(cursor=ro, len=PAGE_SIZE)) == o.OpResult.err(ErrorCode.WRONG_KIND)
    assert run.do(o.ProtectNext(cursor=ro, len=PAGE_SIZE)) == o.OpResult.err(ErrorCode.WRONG_KIND)


def test_map_out_of_memory() -> None:
    run = Run(pool=(P0, P0 + 2 * PAGE_SIZE))
    vs = run.vm_space()
    c = run.cursor(vs)
    f = run.frame(0)
    r = run.do(o.Map(cursor=c, frame=f))
    assert r == o.OpResult.panic(PanicCode.OUT_OF_MEMORY)
    assert run.state.slot_of(P0 + PAGE_SIZE).rc == 1  # L3 allocated before the panic
    assert f not in run.state.frames  # the handle was consumed


# --- unmap ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length,freed_level,cursor_level",
    [(2 * MiB, 1, 2), (GiB, 2, 3), (1 << 39, 3, 4)],
)
def test_unmap_whole_slot_takes_subtree(length: int, freed_level: int, cursor_level: int) -> None:
    run, vs, c = setup_mapped(3, 0, 1 << 39)
    run.ok(o.DropCursor(cursor=c))
    c = run.cursor(vs, 0, 1 << 39)  # fresh: level 4
    r = run.ok(o.Unmap(cursor=c, len=length))
    assert r.values == (("num", 3),)
    nodes = {1: P0 + 3 * PAGE_SIZE, 2: P0 + 2 * PAGE_SIZE, 3: P0 + PAGE_SIZE}
    for level, pa in nodes.items():
        s = run.state.slot_of(pa)
        if level <= freed_level:
            assert (s.rc, s.usage, s.paths, s.node) == (REF_COUNT_UNUSED, Usage.PAGE_TABLE, frozenset(), None)
        else:  # the node just above the taken subtree lost its only child
            assert s.rc == 1 and s.node is not None
            assert s.node.nr_children == (0 if level == freed_level + 1 else 1)
    for k in range(3):
        assert run.state.slot_of(data(k)).rc == REF_COUNT_UNUSED
    cur = run.state.cursors[c]
    assert (cur.va, cur.level) == (length, cursor_level)
    clean_inv(run)
    # spec findings: unmap frees the frames (UNMAP-4 integer equation, UNMAP-2 vt)
    clauses = {v.clause for v in run.axioms()}
    assert {"UNMAP-2", "UNMAP-4"} <= clauses


def test_partial_unmap_keeps_empty_nodes() -> None:
    run, vs, c = setup_mapped(2)
    fid = run.ok(o.FrameFromInUse(paddr=data(0))).get("frame")
    run.ok(o.Jump(cursor=c, va=0))
    assert run.ok(o.Unmap(cursor=c, len=PAGE_SIZE)).get("num") == 1
    assert run.state.slot_of(data(0)).rc == 1 and run.state.slot_of(data(0)).paths == frozenset()
    assert fid in run.state.frames
    l1 = run.state.slot_of(P0 + 3 * PAGE_SIZE)
    assert l1.rc == 1 and l1.node.nr_children == 1  # type: ignore[union-attr]
    assert run.axioms() == []
    assert run.ok(o.Unmap(cursor=c, len=PAGE_SIZE)).get("num") == 1
    assert run.state.slot_of(P0 + 3 * PAGE_SIZE).node.nr_children == 0  # type: ignore[union-attr]
    assert run.ok(o.Unmap(cursor=c, len=PAGE_SIZE)).get("num") == 0
    clean_inv(run)


def test_unmap_panics() -> None:
    run, vs, c = setup_mapped(1, 0, 2 * PAGE_SIZE)
    assert run.do(o.Unmap(cursor=c, len=8)) == o.OpResult.panic(PanicCode.FIND_NEXT_LEN_UNALIGNED)
    assert run.do(o.Unmap(cursor=c, len=2 * PAGE_SIZE)) == o.OpResult.panic(PanicCode.FIND_NEXT_PAST_BARRIER)


# --- query / find_next / jump / protect_next -----------------------------------------------------


def test_query_absent_returns_whole_slot() -> None:
    run = Run()
    vs = run.vm_space()
    c = run.cursor(vs, 0x5000, GiB)
    r = run.ok(o.Query(cursor=c))
    assert (r.get("present"), r.get("start"), r.get("end")) == (0, 0, 1 << 39)
    run.map_at(c, 2 * MiB, 0)  # L3, L2, L1 exist for [2M, 4M)
    run.ok(o.Jump(cursor=c, va=0x5000))
    r = run.ok(o.Query(cursor=c))
    assert (r.get("present"), r.get("start"), r.get("end")) == (0, 0, 2 * MiB)  # L2 entry 0 absent
    assert run.state.cursors[c].level == 2
    assert run.axioms() == []  # type: ignore[misc]


def test_query_present_clones() -> None:
    run, vs, c = setup_mapped(1)
    run.ok(o.Jump(cursor=c, va=0))
    r = run.ok(o.Query(cursor=c))
    prop = PageProperty.rw_user()
    assert r.values == (("present", 1), ("start", 0), ("end", PAGE_SIZE), ("paddr", data(0)),
                        ("prop", prop.encode()), ("frame", 2))  # fmt: skip
    assert run.state.slot_of(data(0)).rc == 2 and run.state.frames[2] == data(0)
    assert run.axioms() == []
    clean_inv(run)


def test_query_errors_and_overflow() -> None:
    run, vs, c = setup_mapped(1, 0, PAGE_SIZE)
    assert run.do(o.Query(cursor=c)) == o.OpResult.err(ErrorCode.INVALID_VADDR)  # va == barrier end
    run.ok(o.Jump(cursor=c, va=0))
    t = frame_to_index(data(0))
    slots = dict(run.state.slots)
    slots[t] = dataclasses.replace(slots[t], rc=REF_COUNT_MAX)
    run.state = dataclasses.replace(run.state, slots=slots)
    assert run.do(o.Query(cursor=c)) == o.OpResult.panic(PanicCode.REF_COUNT_OVERFLOW)


def test_find_next_found_and_overshoot() -> None:
    run = Run()
    vs = run.vm_space()
    c = run.cursor(vs, 0, GiB)
    run.map_at(c, 3 * PAGE_SIZE, 0)
    run.ok(o.Jump(cursor=c, va=0))
    assert run.ok(o.FindNext(cursor=c, len=8 * PAGE_SIZE)).values == (("found", 1), ("va", 3 * PAGE_SIZE))
    assert run.state.cursors[c].va == 3 * PAGE_SIZE
    run.ok(o.Jump(cursor=c, va=4 * MiB))  # L2 entry 2 absent: overshoot to the end of the 2 MiB slot
    assert run.ok(o.FindNext(cursor=c, len=PAGE_SIZE)).values == (("found", 0), ("va", 0))
    cur = run.state.cursors[c]
    assert (cur.va, cur.level) == (6 * MiB, 2)
    c2 = run.cursor(run.vm_space(), GiB, 2 * GiB)
    run.ok(o.FindNext(cursor=c2, len=PAGE_SIZE))  # empty tree: the whole 512 GiB root slot
    assert run.state.cursors[c2].va == 1 << 39
    assert run.do(o.FindNext(cursor=c2, len=PAGE_SIZE)) == o.OpResult.panic(PanicCode.FIND_NEXT_PAST_BARRIER)


def test_jump() -> None:
    run, vs, c = setup_mapped(1)
    assert run.state.cursors[c].level == 1
    assert run.do(o.Jump(cursor=c, va=GiB)) == o.OpResult.err(ErrorCode.INVALID_VADDR)
    assert run.do(o.Jump(cursor=c, va=8)) == o.OpResult.panic(PanicCode.JUMP_UNALIGNED)
    run.ok(o.Jump(cursor=c, va=0x3000))
    assert (run.state.cursors[c].va, run.state.cursors[c].level) == (0x3000, 1)  # same node: level kept
    run.ok(o.Jump(cursor=c, va=5 * MiB))
    assert (run.state.cursors[c].va, run.state.cursors[c].level) == (5 * MiB, 2)  # popped once
    assert run.ok(o.VirtAddr(cursor=c)).values == (("va", 5 * MiB),)


def test_protect_next_changes_cache_policy() -> None:
    run, vs, c = setup_mapped(2)
    run.ok(o.Jump(cursor=c, va=0))
    t = PropTransform(cache=int(CachePolicy.UNCACHEABLE), clear_flags=2)
    r = run.ok(o.ProtectNext(cursor=c, len=GiB, transform=t))
    assert r.values == (("found", 1), ("start", 0), ("end", PAGE_SIZE))
    pte = run.state.vm_spaces[vs].nodes[P0 + 3 * PAGE_SIZE].entries[0]
    assert pte & PTE_PCD and not pte & PTE_PWT and pte_paddr(pte) == data(0) and not pte & 2
    assert run.state.cursors[c].va == PAGE_SIZE
    assert run.axioms() == []
    wc = PropTransform(cache=int(CachePolicy.WRITE_PROTECTED))
    assert run.do(o.ProtectNext(cursor=c, len=PAGE_SIZE, transform=wc)) == o.OpResult.panic(PanicCode.UNSUPPORTED_CACHE)
    assert run.state.cursors[c].va == PAGE_SIZE  # moved to the found leaf, PTE untouched
    bad = PropTransform(clear_flags=1)
    assert run.do(o.ProtectNext(cursor=c, len=PAGE_SIZE, transform=bad)) == o.OpResult.err(ErrorCode.BAD_ARG)
    run.ok(o.Jump(cursor=c, va=8 * PAGE_SIZE))
    assert run.ok(o.ProtectNext(cursor=c, len=PAGE_SIZE)).values == (("found", 0), ("start", 0), ("end", 0))


# --- frames, segments, uniques ---------------------------------------------------------------------


def test_frame_from_unused_and_errors() -> None:
    run = Run()
    f = run.frame(0)
    s = run.state.slot_of(data(0))
    assert (s.rc, s.usage, s.vt, s.sto) == (1, Usage.FRAME, int(Usage.FRAME), (StorageTag.UNTYPED, 0))
    before = run.state
    assert run.do(o.FrameFromUnused(paddr=data(0))) == o.OpResult.err(ErrorCode.IN_USE)
    assert run.do(o.FrameFromUnused(paddr=data(0) + 8)) == o.OpResult.err(ErrorCode.NOT_ALIGNED)
    assert run.do(o.FrameFromUnused(paddr=RAM)) == o.OpResult.err(ErrorCode.OUT_OF_BOUND)
    assert run.do(o.FrameFromInUse(paddr=data(1))) == o.OpResult.err(ErrorCode.UNUSED)
    assert run.do(o.FrameDrop(frame=f + 1)) == o.OpResult.err(ErrorCode.BAD_ID)
    assert run.state == before
    run.ok(o.FrameDrop(frame=f))
    s = run.state.slot_of(data(0))
    assert (s.rc, s.usage, s.vt, s.sto) == (REF_COUNT_UNUSED, Usage.FRAME, None, None)  # ghost usage stays


def test_frame_from_in_use_on_page_table_slot() -> None:
    run, vs, c = setup_mapped(1)
    l1 = P0 + 3 * PAGE_SIZE
    fid = run.ok(o.FrameFromInUse(paddr=l1)).get("frame")
    assert run.state.slot_of(l1).rc == 2 and run.state.frames[fid] == l1
    clauses = {(v.clause, v.field) for v in run.axioms()}
    assert ("FI-3", "usage") in clauses  # spec finding: FI-3 claims usage Frame
    assert "S13" in {v.clause for v in check_invariants(run.state)}
    run.ok(o.FrameDrop(frame=fid))
    assert run.state.slot_of(l1).rc == 1


def test_unique_frames() -> None:
    run = Run()
    u = run.ok(o.UniqueFromUnused(paddr=data(0))).get("unique")
    assert run.state.slot_of(data(0)).rc == REF_COUNT_UNIQUE
    assert run.do(o.FrameFromInUse(paddr=data(0))) == o.OpResult.err(ErrorCode.UNIQUE)
    assert run.do(o.FrameFromUnused(paddr=data(0))) == o.OpResult.err(ErrorCode.UNIQUE)
    f = run.ok(o.FromUnique(unique=u)).get("frame")
    assert run.state.slot_of(data(0)).rc == 1 and u not in run.state.uniques
    r = run.ok(o.TryFromShared(frame=f))
    assert r.get("ok") == 1 and run.state.slot_of(data(0)).rc == REF_COUNT_UNIQUE
    u2 = r.get("unique")
    run.ok(o.UniqueDrop(unique=u2))
    assert run.state.slot_of(data(0)).rc == REF_COUNT_UNUSED
    f = run.frame(1)
    run.ok(o.FrameFromInUse(paddr=data(1)))
    assert run.ok(o.TryFromShared(frame=f)).values == (("ok", 0), ("unique", 0))
    clean_inv(run)


def test_unique_on_recycled_slot_flags_u_new_guard() -> None:
    run = Run()
    run.ok(o.FrameDrop(frame=run.frame(0)))
    run.ok(o.UniqueFromUnused(paddr=data(0)))  # exec succeeds; the step guard wants usage Unused
    assert {v.clause for v in run.axioms()} == {"U-NEW"}


def test_segments() -> None:
    run = Run()
    s = run.ok(o.SegmentFromUnused(start=data(0), end=data(4))).get("segment")
    assert all(run.state.slot_of(data(k)).rc == 1 for k in range(4))
    r = run.ok(o.SegmentSplit(segment=s, offset=PAGE_SIZE))
    left, right = r.get("left"), r.get("right")
    assert run.state.segments == {left: (data(0), data(1)), right: (data(1), data(4))}
    c = run.ok(o.SegmentClone(segment=right)).get("segment")
    assert run.state.slot_of(data(2)).rc == 2
    sl = run.ok(o.SegmentSlice(segment=right, start=PAGE_SIZE, end=2 * PAGE_SIZE)).get("segment")
    assert run.state.segments[sl] == (data(2), data(3)) and run.state.slot_of(data(2)).rc == 3
    f = run.ok(o.SegmentNext(segment=left)).get("frame")
    assert left not in run.state.segments and run.state.frames[f] == data(0)
    assert run.state.slot_of(data(0)).rc == 1
    for seg in (c, sl, right):
        run.ok(o.SegmentDrop(segment=seg))
    assert all(run.state.slot_of(data(k)).rc == REF_COUNT_UNUSED for k in (1, 2, 3))
    clean_inv(run)
    before = run.state
    assert run.do(o.SegmentFromUnused(start=data(5), end=data(5))) == o.OpResult.err(ErrorCode.BAD_ARG)
    assert run.do(o.SegmentFromUnused(start=data(5) + 8, end=data(6))) == o.OpResult.err(ErrorCode.NOT_ALIGNED)
    assert run.do(o.SegmentFromUnused(start=data(5), end=RAM + PAGE_SIZE)) == o.OpResult.err(ErrorCode.OUT_OF_BOUND)
    assert run.do(o.SegmentFromUnused(start=data(-1), end=data(1))) == o.OpResult.err(ErrorCode.IN_USE)
    assert run.do(o.SegmentSplit(segment=99, offset=PAGE_SIZE)) == o.OpResult.err(ErrorCode.BAD_ID)
    assert run.state == before


def test_registry_capacity() -> None:
    run = Run(dataclasses.replace(BASE, registry_capacity=2))
    run.frame(0)
    assert run.do(o.FrameFromUnused(paddr=data(1))) == o.OpResult.err(ErrorCode.NO_SPACE)


def test_pool_allocator_and_purity() -> None:
    state = initial_state(RAM)
    alloc = PoolAllocator(P0, P0 + 4 * PAGE_SIZE, state)
    assert [alloc(1), alloc(1)] == [P0, P0 + PAGE_SIZE]
    r, after = apply(state, o.NewVmSpace(), PoolAllocator(P0, P0 + PAGE_SIZE, state))
    assert r.status == Status.OK and state.slot_of(P0).rc == REF_COUNT_UNUSED
    assert after.parent is state and after.changed == frozenset({frame_to_index(P0)})


def test_unknown_op_and_harness_ops() -> None:
    run = Run()
    assert run.do(o.Nop(value=5)).values == (("value", 5),)
    assert run.do(o.Activate(vs=3)) == o.OpResult.err(ErrorCode.BAD_ID)
    assert run.do(o.Activate(vs=0)).status == Status.OK


def test_map_of_a_non_uframe_handle_is_refused() -> None:
    """from_in_use on a page-table node, metadata or kernel frame gives a handle that is not a
    UFrame: map refuses it (NOT_UFRAME, after the ids and the cursor's kind, before the prop)."""
    run, vs, c = setup_mapped(1)
    root = run.state.vm_spaces[vs].root
    for paddr in (root, LAY.meta_start, LAY.kernel_start):
        h = run.ok(o.FrameFromInUse(paddr=paddr)).get("frame")
        before = run.state
        assert run.do(o.Map(cursor=c, frame=h)) == o.OpResult.err(ErrorCode.NOT_UFRAME)
        assert run.state == before and run.state.changed == frozenset()
    ro = run.ok(o.OpenCursor(vs=run.vm_space(), start=0, end=GiB)).get("cursor")
    assert run.do(o.Map(cursor=ro, frame=h)) == o.OpResult.err(ErrorCode.WRONG_KIND)


def test_map_unsupported_cache_panics_after_map_loop() -> None:
    """exec: new_page -> set_prop panics on WriteCombining / WriteProtected inside
    replace_cur_entry, after item_into_raw consumed the handle and map_loop allocated the
    nodes; nothing is written at level 1 (V:arch/x86/mm/mod.rs:349, :537)."""
    run = Run()
    vs = run.vm_space()
    c = run.cursor(vs, 0, GiB)
    f = run.frame(0)
    wc = PageProperty(flags=1, cache=CachePolicy.WRITE_COMBINING)
    assert run.do(o.Map(cursor=c, frame=f, prop=wc)) == o.OpResult.panic(PanicCode.UNSUPPORTED_CACHE)
    s = run.state
    assert f not in s.frames and s.slot_of(data(0)).rc == 1 and s.slot_of(data(0)).paths == frozenset()
    assert sorted(n.level for n in s.vm_spaces[vs].nodes.values()) == [1, 2, 3, 4]
    l1 = next(n for n in s.vm_spaces[vs].nodes.values() if n.level == 1)
    assert l1.entries == (0,) * 512 and s.cursors[c].level == 1 and s.cursors[c].va == 0
