"""Every clause: a case where it holds (antecedent true) and a deliberately wrong after-state
that violates it, with the report naming clause, slot and field."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from model_helpers import LAY, RAM, GiB, Run, data, known_finding, mutate

from model import ops as o
from model.axioms import CLAUSES, Ctx
from model.ops import OpResult
from model.state import PageTableNode, State, VmSpaceView
from model.types import PAGE_SIZE, REF_COUNT_UNIQUE, REF_COUNT_UNUSED, Usage, frame_to_index

P0 = LAY.pt_pool_start
L1 = P0 + 3 * PAGE_SIZE  # the level-1 node of the first mapping
T0 = frame_to_index(data(0))
T1 = frame_to_index(data(1))
Case4 = tuple[State, o.Op, OpResult, State]


def last(run: Run) -> Case4:
    assert run.last is not None
    return run.last


def mapped(n: int = 1, extra_handle: bool = False) -> tuple[Run, int, int]:
    run = Run()
    vs = run.vm_space()
    c = run.cursor(vs)
    for k in range(n):
        run.map_at(c, k * PAGE_SIZE, k)
    if extra_handle:
        run.ok(o.FrameFromInUse(paddr=data(0)))
    return run, vs, c


# --- scenarios: each returns (before, op, result, after) -------------------------------------------


def sc_new_vs() -> Case4:
    run, _, _ = mapped()
    run.ok(o.NewVmSpace())
    return last(run)


def exec_drop_vs() -> Case4:
    run, vs, c = mapped()
    run.ok(o.DropCursor(cursor=c))
    run.ok(o.DropVmSpace(vs=vs))
    return last(run)


def sc_drop_vs() -> Case4:
    """The state VS-DROP describes (nothing but the vm_spaces entry changes: the tree is kept
    and still walked). Exec frees the tree instead: test_vs_drop_fails_on_exec."""
    before, op, result, _ = exec_drop_vs()
    assert isinstance(op, o.DropVmSpace)
    view = before.vm_spaces[op.vs]
    vm_spaces = {k: v for k, v in before.vm_spaces.items() if k != op.vs}
    after = dataclasses.replace(before, vm_spaces=vm_spaces, leaked={**before.leaked, op.vs: view},
                                parent=before, changed=frozenset())  # fmt: skip
    return before, op, result, after


def test_vs_drop_fails_on_exec() -> None:
    """The SPEC finding VS-DROP: exec's drop frees the root and the tree and releases the mapped
    frames; the clause says every slot is unchanged."""
    before, op, result, after = exec_drop_vs()
    antecedent, bad = run_clause("VS-DROP", (before, op, result, after))
    assert antecedent
    assert any(v.slot == T0 and "rc" in v.field for v in bad), [str(v) for v in bad]
    root = frame_to_index(before.vm_spaces[op.vs].root)  # type: ignore[attr-defined]
    assert any(v.slot == root for v in bad), [str(v) for v in bad]


def sc_open() -> Case4:
    run, _, _ = mapped()
    vs2 = run.vm_space()
    run.ok(o.OpenCursor(vs=vs2, start=0, end=GiB))
    return last(run)


def sc_drop_cursor() -> Case4:
    run, _, c = mapped()
    run.ok(o.DropCursor(cursor=c))
    return last(run)


def sc_query_some() -> Case4:
    run, _, c = mapped()
    run.ok(o.Jump(cursor=c, va=0))
    run.ok(o.Query(cursor=c))
    return last(run)


def sc_query_none() -> Case4:
    run, _, c = mapped()
    run.ok(o.Query(cursor=c))
    return last(run)


def sc_find() -> Case4:
    run, _, c = mapped()
    run.ok(o.Jump(cursor=c, va=0))
    run.ok(o.FindNext(cursor=c, len=GiB))
    return last(run)


def sc_map() -> Case4:
    run, _, c = mapped()
    run.ok(o.Map(cursor=c, frame=run.frame(1)))  # at va 4K: no allocation, root untouched
    return last(run)


def sc_unmap() -> Case4:
    run, _, c = mapped(1, extra_handle=True)
    run.ok(o.Jump(cursor=c, va=0))
    run.ok(o.Unmap(cursor=c, len=PAGE_SIZE))
    return last(run)


def sc_fu() -> Case4:
    run = Run()
    run.frame(0)
    return last(run)


def sc_fu_none() -> Case4:
    run = Run()
    run.frame(0)
    run.do(o.FrameFromUnused(paddr=data(0)))
    return last(run)


def sc_fu_invalid() -> Case4:
    run = Run()
    run.do(o.FrameFromUnused(paddr=data(0) + 8))
    return last(run)


def sc_fu_unparked() -> Case4:
    run = Run()
    run.do(o.FrameFromUnused(paddr=RAM))  # valid_frame_paddr, but no slot: the step is a no-op
    return last(run)


def sc_fi() -> Case4:
    run = Run()
    run.frame(0)
    run.ok(o.FrameFromInUse(paddr=data(0)))
    return last(run)


def sc_fi_unparked() -> Case4:
    run = Run()
    run.do(o.FrameFromInUse(paddr=RAM))
    return last(run)


def sc_fd1() -> Case4:
    run = Run()
    run.ok(o.FrameDrop(frame=run.frame(0)))
    return last(run)


def sc_fd2() -> Case4:
    run = Run()
    f = run.frame(0)
    run.ok(o.FrameFromInUse(paddr=data(0)))
    run.ok(o.FrameDrop(frame=f))
    return last(run)


def _seg(run: Run) -> int:
    return run.ok(o.SegmentFromUnused(start=data(0), end=data(2))).get("segment")


def sc_seg_new() -> Case4:
    run = Run()
    _seg(run)
    return last(run)


def sc_seg(op: Callable[[int], o.Op]) -> Callable[[], Case4]:
    def build() -> Case4:
        run = Run()
        run.ok(op(_seg(run)))
        return last(run)

    return build


def sc_u_new() -> Case4:
    run = Run()
    run.ok(o.UniqueFromUnused(paddr=data(0)))
    return last(run)


def sc_u(op: Callable[[int], o.Op]) -> Callable[[], Case4]:
    def build() -> Case4:
        run = Run()
        run.ok(op(run.ok(o.UniqueFromUnused(paddr=data(0))).get("unique")))
        return last(run)

    return build


def sc_try() -> Case4:
    run = Run()
    run.ok(o.TryFromShared(frame=run.frame(0)))
    return last(run)


# --- mutations ------------------------------------------------------------------------------------

Mut = Callable[[State, State], State]


def slot_m(index: int, **fields: object) -> Mut:
    return lambda b, a: mutate(a, index, **fields)


def rc_m(index: int, delta: int) -> Mut:
    return lambda b, a: mutate(a, index, rc=a.slot(index).rc + delta)


def table_m(name: str, value: dict[int, object]) -> Mut:
    return lambda b, a: dataclasses.replace(a, **{name: value})


def unsound_m(b: State, a: State) -> State:
    return mutate(a, frame_to_index(L1), paths=frozenset())  # the cursor's L1 node loses its path


def inv_m(index: int) -> Mut:
    return lambda b, a: mutate(a, index, inl=1)  # S3 / M3 in the after-state


def extra_frame_m(b: State, a: State) -> State:
    return dataclasses.replace(a, frames={**a.frames, 999: data(7)})


def unpark_m(b: State, a: State) -> State:
    """Make the after-state's parked domain differ (an extra walked root)."""
    node = PageTableNode(data(9), 4, (), (0,) * 512)
    fake = VmSpaceView(77, data(9), {data(9): node})
    return dataclasses.replace(a, leaked={**a.leaked, 77: fake})


def root_of(a: State) -> int:
    return frame_to_index(max(v.root for v in a.vm_spaces.values()))


@dataclass(frozen=True)
class Case:
    clause: str
    scenario: Callable[[], Case4]
    mutation: Mut
    slot: int | None | Callable[[State], int]
    field: str


NEW_ROOT = P0 + 4 * PAGE_SIZE  # root of the second VmSpace in sc_new_vs
FRESH_L1_OPEN = frame_to_index(P0 + 4 * PAGE_SIZE)

CASES = [
    Case("VS-NEW-1", sc_new_vs, inv_m(T1), T1, "inv:S3"),
    Case("VS-NEW-2", sc_new_vs, lambda b, a: a, frame_to_index(NEW_ROOT), "slots"),  # via a parked-wrong before
    Case("VS-NEW-3", sc_new_vs, unpark_m, frame_to_index(NEW_ROOT), "slots"),
    Case("VS-NEW-4", sc_new_vs, slot_m(frame_to_index(NEW_ROOT), usage=Usage.FRAME), frame_to_index(NEW_ROOT), "usage"),
    Case("VS-NEW-5", sc_new_vs, slot_m(T1, inl=1), T1, "inl"),
    Case("VS-NEW-6", sc_new_vs, rc_m(T0, 1), T0, "rc"),
    Case("VS-NEW-7", sc_new_vs, unsound_m, frame_to_index(L1), "paths"),
    Case("VS-DROP", sc_drop_vs, rc_m(T0, 1), T0, "rc"),
    Case("OC-1", sc_open, inv_m(T1), T1, "inl"),
    Case("OC-2", sc_open, rc_m(T0, 1), T0, "rc"),
    Case("OC-3", sc_open, unsound_m, frame_to_index(L1), "paths"),
    Case("OC-4", sc_open, lambda b, a: dataclasses.replace(
        a, cursors={k: dataclasses.replace(c, end=c.end - PAGE_SIZE) for k, c in a.cursors.items()}), None, "cursor 2"),
    Case("DC", sc_drop_cursor, rc_m(T0, 1), T0, "rc"),
    Case("Q-1", sc_query_some, unsound_m, frame_to_index(L1), "paths"),
    Case("Q-2", sc_query_none, rc_m(T0, 1), T0, "rc"),
    Case("Q-3", sc_query_some, lambda b, a: a, T0, "usage"),  # needs a wrong before: see test below
    Case("Q-4", sc_query_some, rc_m(T0, 1), T0, "rc"),
    Case("Q-5", sc_query_some, slot_m(T0, vt=99), T0, "vt"),
    Case("Q-6", sc_query_some, table_m("frames", {}), T0, "frames"),
    Case("NAV-1", sc_find, rc_m(T0, 1), T0, "rc"),
    Case("NAV-2", sc_find, lambda b, a: dataclasses.replace(
        a, cursors={k: dataclasses.replace(c, mutable=False) for k, c in a.cursors.items()}), None, "cursor 1"),
    Case("MAP-0", sc_map, lambda b, a: a, T1, "rc"),  # needs a wrong before: see test below
    Case("MAP-1", sc_map, inv_m(T0), T0, "inl"),
    Case("MAP-2", sc_map, rc_m(T0, 1), T0, "rc"),
    Case("MAP-3", sc_map, slot_m(T0, rc=REF_COUNT_UNUSED), T0, "rc"),
    Case("MAP-4", sc_map, rc_m(T1, 1), T1, "rc"),
    Case("MAP-5", sc_map, slot_m(T1, paths=frozenset()), T1, "paths"),
    Case("MAP-6", sc_map, slot_m(T1, sto=(3, 1)), T1, "sto"),
    Case("MAP-7", sc_map, slot_m(T1 + 5, vt=3), T1 + 5, "vt"),
    Case("MAP-8", sc_map, slot_m(T1 + 5, rc=1, usage=Usage.FRAME, vt=2, sto=(1, 0)), T1 + 5, "usage"),
    Case("MAP-9", sc_map, unsound_m, frame_to_index(L1), "paths"),
    Case("MAP-S", sc_map, extra_frame_m, T1, "frames"),
    Case("UNMAP-1", sc_unmap, unsound_m, frame_to_index(L1), "paths"),
    Case("UNMAP-2", sc_unmap, slot_m(T0, vt=7), T0, "vt"),
    Case("UNMAP-3", sc_unmap, rc_m(frame_to_index(P0), 1), frame_to_index(P0), "FULL"),
    Case("UNMAP-4", sc_unmap, rc_m(T0, 1), T0, "rc/paths"),
    Case("UNMAP-5", sc_unmap, lambda b, a: a, T0 + 9, "usage"),  # needs an MMIO before: see test below
    Case("UNMAP-S", sc_unmap, extra_frame_m, None, "frames"),
    Case("FU-0", sc_fu_unparked, slot_m(T0, rc=1), T0, "rc"),
    Case("FU-1", sc_fu_invalid, lambda b, a: a, None, "result"),  # needs a wrong result: see test below
    Case("FU-2", sc_fu_none, rc_m(T0, 1), T0, "rc"),
    Case("FU-3", sc_fu, slot_m(T0, rc=2), T0, "rc"),
    Case("FU-4", sc_fu, unpark_m, None, "slots"),  # the slot-perm domain is store-level
    Case("FU-S", sc_fu, table_m("frames", {}), T0, "frames"),
    Case("FI-1", sc_fi_unparked, slot_m(T0, rc=1), T0, "rc"),
    Case("FI-2", sc_fi, slot_m(T0, inl=1), T0, "inl"),
    Case("FI-3", sc_fi, slot_m(T0, usage=Usage.KERNEL), T0, "usage"),
    Case("FI-S", sc_fi, table_m("frames", {}), T0, "frames"),
    Case("FD-pre", sc_fd1, lambda b, a: a, T0, "paths"),  # a pre-condition: needs a wrong before
    Case("FD-1", sc_fd1, rc_m(T1, 1), T1, "rc"),
    Case("FD-2", sc_fd1, slot_m(T0, usage=Usage.UNUSED), T0, "usage"),
    Case("FD-3", sc_fd1, slot_m(T0, rc=5), T0, "rc"),
    Case("FD-4", sc_fd2, rc_m(T0, 1), T0, "rc"),
    Case("FD-S", sc_fd1, extra_frame_m, None, "frames"),
    Case("SEG-NEW", sc_seg_new, slot_m(T0, rc=2), T0, "rc"),
    Case("SEG-DROP", sc_seg(lambda s: o.SegmentDrop(segment=s)), slot_m(T1, rc=3), T1, "rc"),
    Case("SEG-NEXT", sc_seg(lambda s: o.SegmentNext(segment=s)), rc_m(T0, 1), T0, "rc"),
    Case("SEG-CLONE", sc_seg(lambda s: o.SegmentClone(segment=s)), rc_m(T1, 1), T1, "rc"),
    Case("SEG-SLICE", sc_seg(lambda s: o.SegmentSlice(segment=s, start=0, end=PAGE_SIZE)), rc_m(T1, 1), T1, "rc"),
    Case("SEG-SPLIT", sc_seg(lambda s: o.SegmentSplit(segment=s, offset=PAGE_SIZE)), rc_m(T1, 1), T1, "rc"),
    Case("U-NEW", sc_u_new, slot_m(T0, rc=1), T0, "rc"),
    Case("U-DROP", sc_u(lambda u: o.UniqueDrop(unique=u)), slot_m(T0, rc=REF_COUNT_UNIQUE), T0, "rc"),
    Case("FROM-UNIQUE", sc_u(lambda u: o.FromUnique(unique=u)), slot_m(T0, rc=2), T0, "rc"),
    Case("TRY-FROM-SHARED", sc_try, slot_m(T0, rc=1), T0, "rc"),
]  # fmt: skip

# clauses whose violation needs a wrong *before* state or result rather than a wrong after-state
BEFORE_MUTATIONS: dict[str, Callable[[Case4], Case4]] = {
    "VS-NEW-2": lambda c: (unpark_root(c[0], c[1 + 2]), c[1], c[2], c[3]),
    "Q-3": lambda c: (mutate(c[0], T0, usage=Usage.KERNEL), c[1], c[2], c[3]),
    "MAP-0": lambda c: (mutate(c[0], T1, rc=5), c[1], c[2], c[3]),
    "UNMAP-5": lambda c: (mutate(c[0], T0 + 9, usage=Usage.MMIO), c[1], c[2], c[3]),
    "FU-1": lambda c: (c[0], c[1], OpResult.ok(frame=1), c[3]),
    "FD-pre": lambda c: (mutate(c[0], T0, paths=frozenset({(1, 2, 3, 4)})), c[1], c[2], c[3]),
}


def unpark_root(before: State, after: State) -> State:
    """A before-state in which the new root's slot is already a walked root (not parked)."""
    view = after.vm_spaces[max(after.vm_spaces)]
    return dataclasses.replace(before, leaked={**before.leaked, 88: dataclasses.replace(view, vs=88)})


def run_clause(cid: str, case: Case4) -> tuple[bool, list]:
    clause = next(c for c in CLAUSES if c.id == cid)
    before, op, result, after = case
    return clause.fn(Ctx(before, after, op, result))


def test_every_clause_has_a_case() -> None:
    assert {c.id for c in CLAUSES} == {c.clause for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.clause for c in CASES])
def test_clause_holds(case: Case) -> None:
    antecedent, bad = run_clause(case.clause, case.scenario())
    assert antecedent
    assert [v for v in bad if not known_finding(v)] == []


@pytest.mark.parametrize("case", CASES, ids=[c.clause for c in CASES])
def test_clause_violated(case: Case) -> None:
    before, op, result, after = case.scenario()
    if case.clause in BEFORE_MUTATIONS:
        before, op, result, after = BEFORE_MUTATIONS[case.clause]((before, op, result, after))
    else:
        after = case.mutation(before, after)
    _, bad = run_clause(case.clause, (before, op, result, after))
    bad = [v for v in bad if not known_finding(v)]
    assert bad, f"{case.clause}: the wrong state was not flagged"
    assert all(v.clause == case.clause for v in bad)
    want_slot = case.slot(after) if callable(case.slot) else case.slot
    assert any(v.slot == want_slot and case.field in v.field for v in bad), [str(v) for v in bad]
