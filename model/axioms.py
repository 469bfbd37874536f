"""The spec's per-op postconditions (§3), literally: one predicate per clause id.

Each clause is a function of (before, after, op, result) returning `(antecedent, violations)`:
`antecedent` says whether the clause was exercised non-vacuously (its outer condition held:
the op ran and its result branch matched). They restate the Verus text (the seed wins over the
digest); a clause that looks wrong is the thing under test and is not fixed here.

Conventions:
- A clause applies only when `op_pre(before, op)` holds and the op returned (no PANIC) through
  exec: validation errors (UNKNOWN_OP, BAD_ID, WRONG_KIND, BAD_ARG, NO_SPACE, CURSOR_BUSY,
  VM_SPACE_BUSY) are not calls of the exec function and make every clause not applicable.
  Exec errors (ACCESS_DENIED, INVALID_VADDR, get_slot errors) are the spec's `None` branch.
- FULL(i) compares the ghost fields (rc, usage, inl, vt, sto, paths); `va` is constant.
- "slots unchanged" compares the parked-perm domain (RAM minus the walked roots).
- "A.inv" is evaluated incrementally (over the slots the op changed) and reported under the
  clause with field "inv:<clause>".
- "Soundness preserved" (∀ CursorOwner c: sound(B) ⇒ sound(A)) is evaluated over the cursors
  that exist in both states; A's tree is checked where it changed and B fully only then.
- `paths_in_pt` is the set `Slot.paths`; |paths| is its size (the raw count `refs` is in the
  message).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from model import ops as o
from model.invariants import (
    changed_nodes,
    check_invariants,
    cursor_inv,
    has_safe_slot,
    metaregion_sound,
    parked,
    unparked,
)
from model.ops import ErrorCode, OpResult, Status
from model.state import Slot, State, changed_slots, ghost_changed_slots
from model.types import (
    MAX_PADDR,
    PAGE_SIZE,
    REF_COUNT_MAX,
    REF_COUNT_UNIQUE,
    REF_COUNT_UNUSED,
    Usage,
    frame_to_index,
    valid_frame_paddr,
)
from model.violation import Violation

EXEC_ERRORS = frozenset(
    {
        ErrorCode.ACCESS_DENIED, ErrorCode.INVALID_VADDR, ErrorCode.NOT_ALIGNED, ErrorCode.OUT_OF_BOUND,
        ErrorCode.UNUSED, ErrorCode.UNIQUE, ErrorCode.BUSY, ErrorCode.IN_USE,
    }
)  # fmt: skip


# --- op_pre (§2) ------------------------------------------------------------------------------


def op_pre(state: State, op: o.Op) -> bool:
    """The spec's `op_pre`: existence of the named entries (plus the few extra conditions of §2)."""
    if isinstance(op, o.NewVmSpace):
        return True
    if isinstance(op, o.DropVmSpace):
        return op.vs in state.vm_spaces and all(c.vs != op.vs for c in state.cursors.values())
    if isinstance(op, (o.OpenCursor, o.OpenCursorMut)):
        return op.vs in state.vm_spaces
    if isinstance(op, (o.DropCursor, o.Query, o.FindNext, o.Jump, o.VirtAddr, o.Unmap, o.ProtectNext)):
        return op.cursor in state.cursors
    if isinstance(op, o.Map):
        return op.cursor in state.cursors and op.frame in state.frames
    if isinstance(op, (o.FrameFromUnused, o.FrameFromInUse, o.SegmentFromUnused, o.UniqueFromUnused)):
        return True
    if isinstance(op, o.FrameDrop):
        return op.frame in state.frames and state.segment_cover_count(frame_to_index(state.frames[op.frame])) == 0
    if isinstance(op, (o.SegmentDrop, o.SegmentNext)):
        return op.segment in state.segments
    if isinstance(op, o.SegmentSplit):
        if op.segment not in state.segments:
            return False
        start, end = state.segments[op.segment]
        return op.offset % PAGE_SIZE == 0 and 0 < op.offset < end - start
    if isinstance(op, o.SegmentClone):
        if op.segment not in state.segments:
            return False
        start, end = state.segments[op.segment]
        return all(state.slot_of(p).rc + 1 <= REF_COUNT_MAX for p in range(start, end, PAGE_SIZE))
    if isinstance(op, o.SegmentSlice):
        if op.segment not in state.segments:
            return False
        start, end = state.segments[op.segment]
        if op.start % PAGE_SIZE or op.end % PAGE_SIZE or not op.start < op.end <= end - start:
            return False
        return all(state.slot_of(p).rc + 1 <= REF_COUNT_MAX for p in range(start + op.start, start + op.end, PAGE_SIZE))
    if isinstance(op, (o.UniqueDrop, o.FromUnique)):
        return op.unique in state.uniques
    if isinstance(op, o.TryFromShared):
        return op.frame in state.frames
    return False  # harness-only ops are not spec ops


def applicable(before: State, op: o.Op, result: OpResult) -> bool:
    """The axioms of `op` bind: op_pre holds and exec returned (OK or an exec error)."""
    if not op_pre(before, op):
        return False
    if result.status == Status.OK:
        return True
    return result.status == Status.ERR and result.code in EXEC_ERRORS


# --- clause machinery ---------------------------------------------------------------------------

ClauseFn = Callable[["Ctx"], tuple[bool, list[Violation]]]


@dataclass(frozen=True)
class Clause:
    id: str
    ops: tuple[type[o.Op], ...]
    fn: ClauseFn
    text: str
    digest_only: bool = False


class Ctx:
    """Everything a clause needs, computed once per (before, after, op, result)."""

    def __init__(self, before: State, after: State, op: o.Op, result: OpResult) -> None:
        self.b = before
        self.a = after
        self.op = op
        self.res = result
        self.ok = result.status == Status.OK
        self._ghost: set[int] | None = None
        self._changed: set[int] | None = None
        self._inv: list[Violation] | None = None
        self._sound: dict[str, list[Violation]] = {}

    @property
    def ghost(self) -> set[int]:
        """Slots where FULL(i) fails."""
        if self._ghost is None:
            self._ghost = ghost_changed_slots(self.b, self.a)
        return self._ghost

    @property
    def changed(self) -> set[int]:
        if self._changed is None:
            self._changed = changed_slots(self.b, self.a)
        return self._changed

    def full_all(self, clause: str, exclude: Iterable[int] = ()) -> list[Violation]:
        skip = set(exclude)
        return [diff(clause, i, self.b.slot(i), self.a.slot(i), "FULL(i) fails") for i in sorted(self.ghost - skip)]

    def a_inv(self, clause: str) -> list[Violation]:
        if self._inv is None:
            self._inv = check_invariants(self.a, only=self.changed)
        return [
            Violation(clause, v.slot, f"inv:{v.clause}", v.before, v.after, v.message, v.digest_only) for v in self._inv
        ]

    def slots_unchanged(self, clause: str) -> list[Violation]:
        ub, ua = unparked(self.b), unparked(self.a)
        if ub == ua:
            return []
        return [Violation(clause, None, "slots", sorted(ub), sorted(ua), "slot-perm domain changed")]

    def inl_unchanged(self, clause: str) -> list[Violation]:
        return [
            Violation(clause, i, "inl", self.b.slot(i).inl, self.a.slot(i).inl, "in_list changed")
            for i in sorted(self.ghost)
            if self.b.slot(i).inl != self.a.slot(i).inl
        ]

    def sound_preserved(self, clause: str) -> list[Violation]:
        if clause in self._sound:
            return self._sound[clause]
        out: list[Violation] = []
        for cid in sorted(set(self.b.cursors) & set(self.a.cursors)):
            vs_b, vs_a = self.b.cursors[cid].vs, self.a.cursors[cid].vs
            nodes = changed_nodes(self.b, self.a, vs_a) if self.a.parent is self.b else None
            only = self.changed if self.a.parent is self.b else None
            bad_a = metaregion_sound(self.a, vs_a, clause, only, nodes)
            if bad_a and not metaregion_sound(self.b, vs_b, clause):
                out += [
                    Violation(
                        clause,
                        v.slot,
                        v.field,
                        v.before,
                        v.after,
                        f"cursor {cid}: sound before, not after: " + v.message,
                    )  # fmt: skip
                    for v in bad_a
                ]
        self._sound[clause] = out
        return out

    @property
    def cursor_live_both(self) -> bool:
        return bool(set(self.b.cursors) & set(self.a.cursors))


def diff(clause: str, i: int, b: Slot, a: Slot, message: str) -> Violation:
    names = ("rc", "usage", "inl", "vt", "sto", "paths")
    fields = [n for n, x, y in zip(names, b.ghost(), a.ghost(), strict=True) if x != y]
    field_ = ",".join(fields) or "node"
    return Violation(clause, i, field_, _fields(b, fields), _fields(a, fields), message)


def rc_or_diff(clause: str, i: int, b: Slot, a: Slot, want_rc: int, message: str) -> Violation:
    """Name `rc` when the rc is not the expected one, else the ghost fields that differ."""
    if a.rc != want_rc:
        return Violation(clause, i, "rc", b.rc, a.rc, f"{message} (expected rc {want_rc:#x})")
    return diff(clause, i, b, a, message)


def _fields(s: Slot, names: list[str]) -> object:
    vals = {n: getattr(s, n) for n in names}
    if "paths" in vals:
        vals["paths"] = sorted(s.paths)
    return vals if len(vals) != 1 else next(iter(vals.values()))


def v(clause: str, i: int | None, field_: str, before: object, after: object, msg: str) -> Violation:
    return Violation(clause, i, field_, before, after, msg)


CLAUSES: list[Clause] = []
BY_OP: dict[type[o.Op], list[Clause]] = {}


def clause(
    cid: str, ops: tuple[type[o.Op], ...], text: str, digest_only: bool = False
) -> Callable[[ClauseFn], ClauseFn]:
    def deco(fn: ClauseFn) -> ClauseFn:
        c = Clause(cid, ops, fn, text, digest_only)
        CLAUSES.append(c)
        for op in ops:
            BY_OP.setdefault(op, []).append(c)
        return fn

    return deco


# --- helpers on the result ---------------------------------------------------------------------


def _handle_added(ctx: Ctx, clause_id: str, table: str, paddr: int) -> list[Violation]:
    b, a = getattr(ctx.b, table), getattr(ctx.a, table)
    new = {k: p for k, p in a.items() if k not in b}
    gone = [k for k in b if k not in a]
    if list(new.values()) == [paddr] and not gone:
        return []
    return [v(clause_id, frame_to_index(paddr), table, dict(b), dict(a), f"expected one new entry {{{paddr:#x}}}")]


def _table_same(ctx: Ctx, clause_id: str, *tables: str) -> list[Violation]:
    return [
        v(clause_id, None, t, dict(getattr(ctx.b, t)), dict(getattr(ctx.a, t)), f"{t} changed")
        for t in tables
        if dict(getattr(ctx.b, t)) != dict(getattr(ctx.a, t))
    ]


VS = (o.NewVmSpace,)
OC = (o.OpenCursor, o.OpenCursorMut)
NAV = (o.FindNext, o.Jump, o.ProtectNext, o.VirtAddr)


def _root_index(ctx: Ctx) -> int:
    return frame_to_index(ctx.res.get("root"))


# --- 3.1 VmSpace ----------------------------------------------------------------------------------


@clause("VS-NEW-1", VS, "A.inv and o.inv()")
def vs_new_1(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    out = ctx.a_inv("VS-NEW-1")
    vs = ctx.res.get("vs")
    if vs not in ctx.a.vm_spaces:
        out.append(v("VS-NEW-1", None, "vm_spaces", None, vs, "new VmSpace missing"))
    return True, out


@clause("VS-NEW-2", VS, "B contains slot r (parked)")
def vs_new_2(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    r = _root_index(ctx)
    return True, ([] if parked(ctx.b, r) else [v("VS-NEW-2", r, "slots", False, None, "root slot was not parked")])


@clause("VS-NEW-3", VS, "A.slots == B.slots minus r")
def vs_new_3(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    r = _root_index(ctx)
    ub, ua = unparked(ctx.b), unparked(ctx.a)
    if ua == ub | {r}:
        return True, []
    return True, [v("VS-NEW-3", r, "slots", sorted(ub), sorted(ua), "parked domain != B minus r")]


@clause("VS-NEW-4", VS, "A.usage[r] == PageTable and A.rc[r] != UNUSED")
def vs_new_4(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    r = _root_index(ctx)
    s = ctx.a.slot(r)
    if s.usage == Usage.PAGE_TABLE and s.rc != REF_COUNT_UNUSED:
        return True, []
    return True, [v("VS-NEW-4", r, "usage/rc", None, (s.usage, s.rc), "root not an in-use PT node")]


@clause("VS-NEW-5", VS, "forall i: A.inl == B.inl")
def vs_new_5(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return ctx.ok, ctx.inl_unchanged("VS-NEW-5") if ctx.ok else []


def _only_fresh_pt(
    ctx: Ctx, cid: str, usage_ok: Callable[[Usage], bool], exclude: Iterable[int] = ()
) -> list[Violation]:
    out = []
    skip = set(exclude)
    for i in sorted(ctx.ghost - skip):
        b, a = ctx.b.slot(i), ctx.a.slot(i)
        if not (b.rc == REF_COUNT_UNUSED and a.rc != REF_COUNT_UNUSED and usage_ok(a.usage)):
            out.append(diff(cid, i, b, a, "changed slot is not a fresh PT node"))
    return out


@clause("VS-NEW-6", VS, "changed slots: B UNUSED -> A in use, A.usage == PageTable")
def vs_new_6(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    return True, _only_fresh_pt(ctx, "VS-NEW-6", lambda u: u == Usage.PAGE_TABLE)


@clause("VS-NEW-7", VS, "cursor soundness preserved")
def vs_new_7(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return ctx.ok and ctx.cursor_live_both, ctx.sound_preserved("VS-NEW-7") if ctx.ok else []


@clause("VS-DROP", (o.DropVmSpace,), "regions and all other maps unchanged; vs removed")
def vs_drop(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.DropVmSpace)
    out = ctx.full_all("VS-DROP") + ctx.slots_unchanged("VS-DROP")
    out += _table_same(ctx, "VS-DROP", "frames", "segments", "uniques", "cursors")
    if ctx.op.vs in ctx.a.vm_spaces:
        out.append(v("VS-DROP", None, "vm_spaces", None, ctx.op.vs, "vs still live"))
    return True, out


# --- 3.2 cursors ----------------------------------------------------------------------------------


@clause("OC-1", OC, "A.inv; slots unchanged; inl unchanged")
def oc_1(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return True, ctx.a_inv("OC-1") + ctx.slots_unchanged("OC-1") + ctx.inl_unchanged("OC-1")


@clause("OC-2", OC, "changed slots: B UNUSED -> A in use, A.usage != Frame")
def oc_2(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return True, _only_fresh_pt(ctx, "OC-2", lambda u: u != Usage.FRAME)


@clause("OC-3", OC, "cursor soundness preserved")
def oc_3(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return ctx.cursor_live_both, ctx.sound_preserved("OC-3")


@clause("OC-4", OC, "Some: entry kind, va, vm_space as requested; inv; sound")
def oc_4(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, (o.OpenCursor, o.OpenCursorMut))
    if not ctx.ok:
        return False, []
    cid = ctx.res.get("cursor")
    c = ctx.a.cursors.get(cid)
    if c is None:
        return True, [v("OC-4", None, "cursors", None, cid, "new cursor missing")]
    out = []
    want = (ctx.op.vs, isinstance(ctx.op, o.OpenCursorMut), ctx.op.start, ctx.op.end)
    if (c.vs, c.mutable, c.start, c.end) != want:
        out.append(v("OC-4", None, f"cursor {cid}", want, (c.vs, c.mutable, c.start, c.end), "entry fields"))
    out += cursor_inv(ctx.a, cid, "OC-4")
    out += metaregion_sound(ctx.a, c.vs, "OC-4")
    return True, out


@clause("DC", (o.DropCursor,), "regions unchanged; entry removed")
def dc(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.DropCursor)
    out = ctx.full_all("DC") + ctx.slots_unchanged("DC")
    if ctx.op.cursor in ctx.a.cursors:
        out.append(v("DC", None, "cursors", None, ctx.op.cursor, "cursor still live"))
    return True, out


# --- 3.3 query ---------------------------------------------------------------------------------


def _query_some(ctx: Ctx) -> int | None:
    if ctx.ok and ctx.res.get("present"):
        return ctx.res.get("paddr")
    return None


@clause("Q-1", (o.Query,), "A.inv; slots unchanged; soundness preserved")
def q_1(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return True, ctx.a_inv("Q-1") + ctx.slots_unchanged("Q-1") + ctx.sound_preserved("Q-1")


@clause("Q-2", (o.Query,), "None => forall i FULL(i)")
def q_2(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if _query_some(ctx) is not None:
        return False, []
    return True, ctx.full_all("Q-2")


@clause("Q-3", (o.Query,), "Some(p) => has_safe_slot(p) and B.usage[t] == Frame")
def q_3(ctx: Ctx) -> tuple[bool, list[Violation]]:
    p = _query_some(ctx)
    if p is None:
        return False, []
    t = frame_to_index(p)
    out = []
    if not has_safe_slot(ctx.b, p):
        out.append(v("Q-3", t, "paddr", None, p, "not has_safe_slot"))
    if ctx.b.slot(t).usage != Usage.FRAME:
        out.append(v("Q-3", t, "usage", ctx.b.slot(t).usage, None, "B.usage[t] != Frame"))
    return True, out


@clause("Q-4", (o.Query,), "Some(p) => A.rc[t] == B.rc[t] + 1 <= MAX")
def q_4(ctx: Ctx) -> tuple[bool, list[Violation]]:
    p = _query_some(ctx)
    if p is None:
        return False, []
    t = frame_to_index(p)
    b, a = ctx.b.slot(t).rc, ctx.a.slot(t).rc
    if a == b + 1 and a <= REF_COUNT_MAX:
        return True, []
    return True, [v("Q-4", t, "rc", b, a, "rc not +1 (or above MAX)")]


@clause("Q-5", (o.Query,), "Some(p) => forall i != t FULL(i); at t only rc changes")
def q_5(ctx: Ctx) -> tuple[bool, list[Violation]]:
    p = _query_some(ctx)
    if p is None:
        return False, []
    t = frame_to_index(p)
    out = ctx.full_all("Q-5", exclude=[t])
    b, a = ctx.b.slot(t), ctx.a.slot(t)
    for name in ("usage", "paths", "inl", "sto", "vt"):
        if getattr(b, name) != getattr(a, name):
            out.append(v("Q-5", t, name, getattr(b, name), getattr(a, name), "changed at the cloned slot"))
    return True, out


@clause("Q-6", (o.Query,), "Some(p) => a fresh FrameEntry{p}")
def q_6(ctx: Ctx) -> tuple[bool, list[Violation]]:
    p = _query_some(ctx)
    if p is None:
        return False, []
    return True, _handle_added(ctx, "Q-6", "frames", p)


# --- 3.4 navigation ------------------------------------------------------------------------------


@clause("NAV-1", NAV, "A.inv; slots unchanged; forall i FULL(i); soundness preserved")
def nav_1(ctx: Ctx) -> tuple[bool, list[Violation]]:
    out = ctx.a_inv("NAV-1") + ctx.slots_unchanged("NAV-1") + ctx.full_all("NAV-1")
    return True, out + ctx.sound_preserved("NAV-1")


@clause("NAV-2", NAV + (o.Query, o.Map, o.Unmap), "entry vm_space/kind/va unchanged; entry inv")
def nav_2(ctx: Ctx) -> tuple[bool, list[Violation]]:
    cid = getattr(ctx.op, "cursor", 0)
    b, a = ctx.b.cursors.get(cid), ctx.a.cursors.get(cid)
    if b is None or a is None:
        return False, [v("NAV-2", None, f"cursor {cid}", b, a, "cursor entry vanished")] if b else []
    out = []
    if (b.vs, b.mutable, b.start, b.end) != (a.vs, a.mutable, a.start, a.end):
        out.append(v("NAV-2", None, f"cursor {cid}", b, a, "entry vm_space/kind/va changed"))
    return True, out + cursor_inv(ctx.a, cid, "NAV-2")


# --- 3.5 map ----------------------------------------------------------------------------------------


def _map_t(ctx: Ctx) -> int:
    assert isinstance(ctx.op, o.Map)
    return frame_to_index(ctx.b.frames[ctx.op.frame])


@clause("MAP-0", (o.Map,), "pre: has_safe_slot(p), B.usage[t] == Frame, H >= 1, B.rc == H+P+C")
def map_0(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.Map)
    p = ctx.b.frames[ctx.op.frame]
    t = frame_to_index(p)
    s = ctx.b.slot(t)
    h, pp, c = ctx.b.handle_count(t), len(s.paths), ctx.b.segment_cover_count(t)
    out = []
    if not has_safe_slot(ctx.b, p):
        out.append(v("MAP-0", t, "paddr", p, None, "not has_safe_slot"))
    if s.usage != Usage.FRAME:
        out.append(v("MAP-0", t, "usage", s.usage, None, "B.usage[t] != Frame"))
    if h < 1:
        out.append(v("MAP-0", t, "H", h, None, "no handle"))
    if s.rc != h + pp + c:
        out.append(v("MAP-0", t, "rc", s.rc, None, f"B.rc != H+P+C = {h}+{pp}+{c} (refs {s.refs})"))
    return True, out


@clause("MAP-1", (o.Map,), "A.inv; slots unchanged; inl unchanged")
def map_1(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    return True, ctx.a_inv("MAP-1") + ctx.slots_unchanged("MAP-1") + ctx.inl_unchanged("MAP-1")


@clause("MAP-2", (o.Map,), "forall i != t with B.rc != UNUSED: FULL(i)")
def map_2(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    t = _map_t(ctx)
    return True, [
        diff("MAP-2", i, ctx.b.slot(i), ctx.a.slot(i), "in-use slot other than t changed")
        for i in sorted(ctx.ghost - {t})
        if ctx.b.slot(i).rc != REF_COUNT_UNUSED
    ]


@clause("MAP-3", (o.Map,), "forall i: B.rc != UNUSED => A.rc != UNUSED")
def map_3(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    return True, [
        v("MAP-3", i, "rc", ctx.b.slot(i).rc, ctx.a.slot(i).rc, "in-use slot became UNUSED")
        for i in sorted(ctx.ghost)
        if ctx.b.slot(i).rc != REF_COUNT_UNUSED and ctx.a.slot(i).rc == REF_COUNT_UNUSED
    ]


@clause("MAP-4", (o.Map,), "A.rc[t] == B.rc[t]")
def map_4(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    t = _map_t(ctx)
    b, a = ctx.b.slot(t).rc, ctx.a.slot(t).rc
    return True, ([] if a == b else [v("MAP-4", t, "rc", b, a, "rc of the mapped frame changed")])


@clause("MAP-5", (o.Map,), "|A.paths[t]| == |B.paths[t]| + 1")
def map_5(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    t = _map_t(ctx)
    b, a = ctx.b.slot(t), ctx.a.slot(t)
    if len(a.paths) == len(b.paths) + 1:
        return True, []
    msg = f"|paths| {len(b.paths)} -> {len(a.paths)} (refs {b.refs} -> {a.refs})"
    return True, [v("MAP-5", t, "paths", sorted(b.paths), sorted(a.paths), msg)]


@clause("MAP-6", (o.Map,), "A.usage[t] == B.usage[t]; A.sto[t] == B.sto[t]")
def map_6(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    t = _map_t(ctx)
    b, a = ctx.b.slot(t), ctx.a.slot(t)
    return True, [
        v("MAP-6", t, n, getattr(b, n), getattr(a, n), "changed at t")
        for n in ("usage", "sto")
        if getattr(b, n) != getattr(a, n)
    ]


@clause("MAP-7", (o.Map,), "forall i: A.rc == UNUSED => FULL(i)")
def map_7(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    return True, [
        diff("MAP-7", i, ctx.b.slot(i), ctx.a.slot(i), "UNUSED after but changed")
        for i in sorted(ctx.ghost)
        if ctx.a.slot(i).rc == REF_COUNT_UNUSED
    ]


@clause("MAP-8", (o.Map,), "forall i != t: B UNUSED and A in use => A.usage != Frame")
def map_8(ctx: Ctx) -> tuple[bool, list[Violation]]:
    if not ctx.ok:
        return False, []
    t = _map_t(ctx)
    return True, [
        v("MAP-8", i, "usage", ctx.b.slot(i).usage, ctx.a.slot(i).usage, "fresh slot is a Frame")
        for i in sorted(ctx.ghost - {t})
        if ctx.b.slot(i).rc == REF_COUNT_UNUSED
        and ctx.a.slot(i).rc != REF_COUNT_UNUSED
        and ctx.a.slot(i).usage == Usage.FRAME
    ]


@clause("MAP-9", (o.Map,), "cursor soundness preserved")
def map_9(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return ctx.ok, ctx.sound_preserved("MAP-9") if ctx.ok else []


@clause("MAP-S", (o.Map,), "store: fid removed (H(t) - 1)")
def map_s(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.Map)
    if not ctx.ok:
        return False, []
    want = {k: p for k, p in ctx.b.frames.items() if k != ctx.op.frame}
    got = dict(ctx.a.frames)
    return True, ([] if want == got else [v("MAP-S", _map_t(ctx), "frames", want, got, "fid not consumed")])


# --- 3.6 unmap -------------------------------------------------------------------------------------


@clause("UNMAP-1", (o.Unmap,), "A.inv; slots unchanged; soundness preserved")
def unmap_1(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return True, ctx.a_inv("UNMAP-1") + ctx.slots_unchanged("UNMAP-1") + ctx.sound_preserved("UNMAP-1")


@clause("UNMAP-2", (o.Unmap,), "forall i: usage, inl, vt unchanged; no new UNIQUE; A in use => sto unchanged")
def unmap_2(ctx: Ctx) -> tuple[bool, list[Violation]]:
    out = []
    for i in sorted(ctx.ghost):
        b, a = ctx.b.slot(i), ctx.a.slot(i)
        for n in ("usage", "inl", "vt"):
            if getattr(b, n) != getattr(a, n):
                out.append(v("UNMAP-2", i, n, getattr(b, n), getattr(a, n), f"{n} changed"))
        if b.rc != REF_COUNT_UNIQUE and a.rc == REF_COUNT_UNIQUE:
            out.append(v("UNMAP-2", i, "rc", b.rc, a.rc, "rc became UNIQUE"))
        if a.rc != REF_COUNT_UNUSED and a.sto != b.sto:
            out.append(v("UNMAP-2", i, "sto", b.sto, a.sto, "storage changed at an in-use slot"))
    return True, out


@clause("UNMAP-3", (o.Unmap,), "forall i not in B.slots: FULL(i)", digest_only=True)
def unmap_3(ctx: Ctx) -> tuple[bool, list[Violation]]:
    out = [
        Violation("UNMAP-3", i, "FULL", ctx.b.slot(i).ghost(), ctx.a.slot(i).ghost(), "unparked slot changed", True)
        for i in sorted(unparked(ctx.b) & ctx.ghost)
    ]
    return bool(unparked(ctx.b)), out


@clause(
    "UNMAP-4",
    (o.Unmap,),
    "B.usage == Frame: A.rc+|B.paths| == B.rc+|A.paths|, A.rc<=B.rc, |A.p|<=|B.p|, A.rc!=0",
)
def unmap_4(ctx: Ctx) -> tuple[bool, list[Violation]]:
    out = []
    for i in sorted(ctx.ghost):
        b, a = ctx.b.slot(i), ctx.a.slot(i)
        if b.usage != Usage.FRAME:
            continue
        pb, pa = len(b.paths), len(a.paths)
        checks = (
            (a.rc + pb == b.rc + pa, "A.rc + |B.paths| != B.rc + |A.paths|"),
            (a.rc <= b.rc, "A.rc > B.rc"),
            (pa <= pb, "|A.paths| > |B.paths|"),
            (a.rc != 0, "A.rc == 0"),
        )
        for good, msg in checks:
            if not good:
                out.append(v("UNMAP-4", i, "rc/paths", (b.rc, pb), (a.rc, pa), f"{msg} (refs {b.refs} -> {a.refs})"))
    return True, out


@clause("UNMAP-5", (o.Unmap,), "B.usage == MMIO => FULL(i)")
def unmap_5(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return True, [
        diff("UNMAP-5", i, ctx.b.slot(i), ctx.a.slot(i), "MMIO slot changed")
        for i in sorted(ctx.ghost)
        if ctx.b.slot(i).usage == Usage.MMIO
    ]


@clause("UNMAP-S", (o.Unmap,), "store: frames/segments/uniques unchanged")
def unmap_s(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return True, _table_same(ctx, "UNMAP-S", "frames", "segments", "uniques")


# --- 3.7 frames ------------------------------------------------------------------------------------


def _slot_guard(ctx: Ctx, paddr: int) -> bool:
    """FU-0 / FI-1 step guard: the axiom is called iff ¬valid_frame_paddr(p) ∨ slots contains t."""
    return not valid_frame_paddr(paddr) or parked(ctx.b, frame_to_index(paddr))


def _regions_same(ctx: Ctx, cid: str) -> list[Violation]:
    return ctx.full_all(cid) + ctx.slots_unchanged(cid)


FRU = (o.FrameFromUnused,)
FRI = (o.FrameFromInUse,)


@clause("FU-0", FRU, "guard false (valid p, slot not parked) => no-op")
def fu_0(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FrameFromUnused)
    if _slot_guard(ctx, ctx.op.paddr):
        return False, []
    return True, _regions_same(ctx, "FU-0") + _table_same(ctx, "FU-0", "frames")


@clause("FU-1", FRU, "¬valid_frame_paddr(p) => None")
def fu_1(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FrameFromUnused)
    if valid_frame_paddr(ctx.op.paddr):
        return False, []
    return True, ([] if not ctx.ok else [v("FU-1", None, "result", None, ctx.res, "Some for an invalid paddr")])


@clause("FU-2", FRU, "None => A.regions == B.regions")
def fu_2(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FrameFromUnused)
    if ctx.ok or not _slot_guard(ctx, ctx.op.paddr):
        return False, []
    return True, _regions_same(ctx, "FU-2")


@clause("FU-3", FRU, "Some => B UNUSED; A rc 1, inl 0, sto/vt init, usage Frame, paths same; others FULL")
def fu_3(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FrameFromUnused)
    if not ctx.ok or not _slot_guard(ctx, ctx.op.paddr):
        return False, []
    t = frame_to_index(ctx.op.paddr)
    b, a = ctx.b.slot(t), ctx.a.slot(t)
    out = ctx.full_all("FU-3", exclude=[t])
    checks = (
        (b.rc == REF_COUNT_UNUSED, "rc", b.rc, "B.rc != UNUSED"),
        (a.rc == 1, "rc", a.rc, "A.rc != 1"),
        (a.inl == 0, "inl", a.inl, "A.inl != 0"),
        (a.sto is not None, "sto", a.sto, "storage uninit"),
        (a.vt is not None, "vt", a.vt, "vtable uninit"),
        (a.usage == Usage.FRAME, "usage", a.usage, "usage != Frame"),
        (a.paths == b.paths, "paths", sorted(a.paths), "paths changed"),
    )
    out += [v("FU-3", t, f, getattr(b, f.split("/")[0]), val, m) for good, f, val, m in checks if not good]
    return True, out


@clause("FU-4", FRU, "Some => slot perm re-parked (slots domain unchanged)")
def fu_4(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FrameFromUnused)
    if not ctx.ok or not _slot_guard(ctx, ctx.op.paddr):
        return False, []
    return True, ctx.slots_unchanged("FU-4")


@clause("FU-S", FRU, "Some => new FrameEntry{p}")
def fu_s(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FrameFromUnused)
    if not ctx.ok or not _slot_guard(ctx, ctx.op.paddr):
        return False, []
    return True, _handle_added(ctx, "FU-S", "frames", ctx.op.paddr)


@clause("FI-1", FRI, "guard/None as FU-0..2; slots unchanged on both branches")
def fi_1(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FrameFromInUse)
    out = ctx.slots_unchanged("FI-1")
    if not _slot_guard(ctx, ctx.op.paddr):
        return True, out + _regions_same(ctx, "FI-1") + _table_same(ctx, "FI-1", "frames")
    if not valid_frame_paddr(ctx.op.paddr) and ctx.ok:
        out.append(v("FI-1", None, "result", None, ctx.res, "Some for an invalid paddr"))
    if not ctx.ok:
        out += ctx.full_all("FI-1")
    return True, out


@clause("FI-2", FRI, "Some => A.rc[t] == B.rc[t]+1; sto, vt, inl, usage, paths same at t; others FULL")
def fi_2(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FrameFromInUse)
    if not ctx.ok or not _slot_guard(ctx, ctx.op.paddr):
        return False, []
    t = frame_to_index(ctx.op.paddr)
    b, a = ctx.b.slot(t), ctx.a.slot(t)
    out = ctx.full_all("FI-2", exclude=[t])
    if a.rc != b.rc + 1:
        out.append(v("FI-2", t, "rc", b.rc, a.rc, "rc not +1"))
    out += [
        v("FI-2", t, n, getattr(b, n), getattr(a, n), f"{n} changed")
        for n in ("sto", "vt", "inl", "usage", "paths")
        if getattr(b, n) != getattr(a, n)
    ]
    return True, out


@clause("FI-3", FRI, "Some => A.rc[t] not UNUSED/UNIQUE, A.sto init, A.usage[t] == Frame")
def fi_3(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FrameFromInUse)
    if not ctx.ok or not _slot_guard(ctx, ctx.op.paddr):
        return False, []
    t = frame_to_index(ctx.op.paddr)
    a = ctx.a.slot(t)
    out = []
    if a.rc in (REF_COUNT_UNUSED, REF_COUNT_UNIQUE):
        out.append(v("FI-3", t, "rc", None, a.rc, "rc UNUSED/UNIQUE"))
    if a.sto is None:
        out.append(v("FI-3", t, "sto", None, None, "storage uninit"))
    if a.usage != Usage.FRAME:
        out.append(v("FI-3", t, "usage", ctx.b.slot(t).usage, a.usage, "A.usage[t] != Frame"))
    return True, out


@clause("FI-S", FRI, "Some => new FrameEntry{p}")
def fi_s(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FrameFromInUse)
    if not ctx.ok or not _slot_guard(ctx, ctx.op.paddr):
        return False, []
    return True, _handle_added(ctx, "FI-S", "frames", ctx.op.paddr)


def _fd_t(ctx: Ctx) -> int:
    assert isinstance(ctx.op, o.FrameDrop)
    return frame_to_index(ctx.b.frames[ctx.op.frame])


FD = (o.FrameDrop,)


@clause("FD-pre", FD, "slot present; 0 < B.rc <= MAX; rc 1 => sto init, inl 0, paths empty; C == 0")
def fd_pre(ctx: Ctx) -> tuple[bool, list[Violation]]:
    t = _fd_t(ctx)
    s = ctx.b.slot(t)
    out = []
    if not parked(ctx.b, t):
        out.append(v("FD-pre", t, "slots", None, None, "slot not present (parked)"))
    if not 0 < s.rc <= REF_COUNT_MAX:
        out.append(v("FD-pre", t, "rc", s.rc, None, "B.rc not in 1..=MAX"))
    if s.rc == 1 and (s.sto is None or s.inl != 0 or s.paths):
        out.append(v("FD-pre", t, "sto/inl/paths", (s.sto, s.inl, sorted(s.paths)), None, "rc 1 but not droppable"))
    return True, out


@clause("FD-1", FD, "forall i != t FULL(i); slots unchanged")
def fd_1(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return True, ctx.full_all("FD-1", exclude=[_fd_t(ctx)]) + ctx.slots_unchanged("FD-1")


@clause("FD-2", FD, "at t: usage, paths, inl unchanged")
def fd_2(ctx: Ctx) -> tuple[bool, list[Violation]]:
    t = _fd_t(ctx)
    b, a = ctx.b.slot(t), ctx.a.slot(t)
    return True, [
        v("FD-2", t, n, getattr(b, n), getattr(a, n), f"{n} changed")
        for n in ("usage", "paths", "inl")
        if getattr(b, n) != getattr(a, n)
    ]


@clause("FD-3", FD, "B.rc[t] == 1 => A.rc[t] == UNUSED")
def fd_3(ctx: Ctx) -> tuple[bool, list[Violation]]:
    t = _fd_t(ctx)
    if ctx.b.slot(t).rc != 1:
        return False, []
    a = ctx.a.slot(t).rc
    return True, ([] if a == REF_COUNT_UNUSED else [v("FD-3", t, "rc", 1, a, "last drop did not free")])


@clause("FD-4", FD, "B.rc[t] > 1 => A.rc == B.rc - 1 and A.sto == B.sto")
def fd_4(ctx: Ctx) -> tuple[bool, list[Violation]]:
    t = _fd_t(ctx)
    b, a = ctx.b.slot(t), ctx.a.slot(t)
    if not b.rc > 1:
        return False, []
    out = []
    if a.rc != b.rc - 1:
        out.append(v("FD-4", t, "rc", b.rc, a.rc, "rc not -1"))
    if a.sto != b.sto:
        out.append(v("FD-4", t, "sto", b.sto, a.sto, "storage changed"))
    return True, out


@clause("FD-S", FD, "fid removed")
def fd_s(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FrameDrop)
    want = {k: p for k, p in ctx.b.frames.items() if k != ctx.op.frame}
    return True, ([] if want == dict(ctx.a.frames) else [v("FD-S", None, "frames", want, dict(ctx.a.frames), "")])


# --- 3.8 segments and unique frames ----------------------------------------------------------------


def _pages(start: int, end: int) -> range:
    return range(frame_to_index(start), frame_to_index(end))


@clause("SEG-NEW", (o.SegmentFromUnused,), "guard: Some => pages Frame rc 1 ...; outside FULL; None => same")
def seg_new(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.SegmentFromUnused)
    s, e = ctx.op.start, ctx.op.end
    guard = s % PAGE_SIZE == 0 and e % PAGE_SIZE == 0 and s < e and e <= MAX_PADDR
    guard = guard and all(parked(ctx.b, i) and ctx.b.slot(i).rc == REF_COUNT_UNUSED for i in _pages(s, e))
    if not guard or not ctx.ok:
        return (not guard), _regions_same(ctx, "SEG-NEW") + _table_same(ctx, "SEG-NEW", "segments")
    pages = set(_pages(s, e))
    out = ctx.full_all("SEG-NEW", exclude=pages)
    for i in sorted(pages):
        a = ctx.a.slot(i)
        if not (a.usage == Usage.FRAME and a.rc == 1 and not a.paths and a.inl == 0 and a.sto is not None):
            out.append(diff("SEG-NEW", i, ctx.b.slot(i), a, "covered page not a fresh Frame"))
    return True, out


@clause("SEG-DROP", (o.SegmentDrop,), "pages: usage/paths/inl same; rc 1 -> UNUSED, >1 -> -1; outside FULL")
def seg_drop(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.SegmentDrop)
    pages = set(_pages(*ctx.b.segments[ctx.op.segment]))
    out = ctx.full_all("SEG-DROP", exclude=pages)
    for i in sorted(pages):
        b, a = ctx.b.slot(i), ctx.a.slot(i)
        want = REF_COUNT_UNUSED if b.rc == 1 else b.rc - 1
        if a.rc != want or (b.usage, b.paths, b.inl) != (a.usage, a.paths, a.inl):
            out.append(rc_or_diff("SEG-DROP", i, b, a, want, "expected usage/paths/inl same"))
    return True, out


@clause("SEG-NEXT", (o.SegmentNext,), "all slots FULL (rc unchanged); C-1, H+1")
def seg_next(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.SegmentNext)
    start = ctx.b.segments[ctx.op.segment][0]
    return True, ctx.full_all("SEG-NEXT") + _handle_added(ctx, "SEG-NEXT", "frames", start)


def _seg_rc_plus(ctx: Ctx, cid: str, start: int, end: int) -> list[Violation]:
    pages = set(_pages(start, end))
    out = ctx.full_all(cid, exclude=pages)
    for i in sorted(pages):
        b, a = ctx.b.slot(i), ctx.a.slot(i)
        if a.rc != b.rc + 1 or b.ghost()[1:] != a.ghost()[1:]:
            out.append(rc_or_diff(cid, i, b, a, b.rc + 1, "covered page: rc + 1, other fields same"))
    return out


@clause("SEG-CLONE", (o.SegmentClone,), "every covered page rc + 1; others same")
def seg_clone(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.SegmentClone)
    return True, _seg_rc_plus(ctx, "SEG-CLONE", *ctx.b.segments[ctx.op.segment])


@clause("SEG-SLICE", (o.SegmentSlice,), "every page of the slice rc + 1; others same")
def seg_slice(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.SegmentSlice)
    base = ctx.b.segments[ctx.op.segment][0]
    return True, _seg_rc_plus(ctx, "SEG-SLICE", base + ctx.op.start, base + ctx.op.end)


@clause("SEG-SPLIT", (o.SegmentSplit,), "regions unchanged")
def seg_split(ctx: Ctx) -> tuple[bool, list[Violation]]:
    return True, _regions_same(ctx, "SEG-SPLIT")


@clause("U-NEW", (o.UniqueFromUnused,), "guard (valid, parked, usage Unused, UNUSED): Some => Frame UNIQUE ...")
def u_new(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.UniqueFromUnused)
    p = ctx.op.paddr
    t = frame_to_index(p)
    b = ctx.b.slot(t)
    guard = valid_frame_paddr(p) and parked(ctx.b, t) and b.usage == Usage.UNUSED and b.rc == REF_COUNT_UNUSED
    if not guard or not ctx.ok:
        out = _regions_same(ctx, "U-NEW") + _table_same(ctx, "U-NEW", "uniques")
        return (not guard), [
            Violation(
                x.clause,
                x.slot,
                x.field,
                x.before,
                x.after,
                "step guard false (or None): no-op; " + x.message,
            )
            for x in out
        ]
    a = ctx.a.slot(t)
    out = ctx.full_all("U-NEW", exclude=[t])
    good = a.usage == Usage.FRAME and a.rc == REF_COUNT_UNIQUE and a.inl == 0 and a.sto is not None
    if not good or a.paths != b.paths:
        out.append(diff("U-NEW", t, b, a, "expected usage Frame, rc UNIQUE, inl 0, sto init, paths same"))
    return True, out


@clause("U-DROP", (o.UniqueDrop,), "rc UNIQUE -> UNUSED; usage, paths, inl unchanged")
def u_drop(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.UniqueDrop)
    t = frame_to_index(ctx.b.uniques[ctx.op.unique])
    b, a = ctx.b.slot(t), ctx.a.slot(t)
    if b.rc == REF_COUNT_UNIQUE and a.rc == REF_COUNT_UNUSED and (b.usage, b.paths, b.inl) == (a.usage, a.paths, a.inl):
        return True, []
    return True, [rc_or_diff("U-DROP", t, b, a, REF_COUNT_UNUSED, "expected UNIQUE -> UNUSED, usage/paths/inl same")]


@clause("FROM-UNIQUE", (o.FromUnique,), "rc UNIQUE -> 1; usage, paths, inl, sto unchanged")
def from_unique(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.FromUnique)
    t = frame_to_index(ctx.b.uniques[ctx.op.unique])
    b, a = ctx.b.slot(t), ctx.a.slot(t)
    if b.rc == REF_COUNT_UNIQUE and a.rc == 1 and (b.usage, b.paths, b.inl, b.sto) == (a.usage, a.paths, a.inl, a.sto):
        return True, []
    return True, [rc_or_diff("FROM-UNIQUE", t, b, a, 1, "expected UNIQUE -> 1, usage/paths/inl/sto same")]


@clause("TRY-FROM-SHARED", (o.TryFromShared,), "rc 1 -> UNIQUE, others unchanged; else nothing changes")
def try_from_shared(ctx: Ctx) -> tuple[bool, list[Violation]]:
    assert isinstance(ctx.op, o.TryFromShared)
    t = frame_to_index(ctx.b.frames[ctx.op.frame])
    b, a = ctx.b.slot(t), ctx.a.slot(t)
    if b.rc != 1:
        return True, _regions_same(ctx, "TRY-FROM-SHARED")
    out = ctx.full_all("TRY-FROM-SHARED", exclude=[t])
    if a.rc != REF_COUNT_UNIQUE or b.ghost()[1:] != a.ghost()[1:]:
        out.append(rc_or_diff("TRY-FROM-SHARED", t, b, a, REF_COUNT_UNIQUE, "expected rc 1 -> UNIQUE, others same"))
    return True, out


# --- entry points -----------------------------------------------------------------------------------


@dataclass
class ClauseCoverage:
    """Per clause: how often it was evaluated and how often its antecedent held."""

    evaluated: dict[str, int] = field(default_factory=dict)
    exercised: dict[str, int] = field(default_factory=dict)
    violated: dict[str, int] = field(default_factory=dict)

    def record(self, cid: str, antecedent: bool, violated: bool) -> None:
        self.evaluated[cid] = self.evaluated.get(cid, 0) + 1
        if antecedent:
            self.exercised[cid] = self.exercised.get(cid, 0) + 1
        if violated:
            self.violated[cid] = self.violated.get(cid, 0) + 1

    def never_exercised(self) -> list[str]:
        return [c.id for c in CLAUSES if not self.exercised.get(c.id)]

    def merge(self, other: ClauseCoverage) -> None:
        for mine, theirs in ((self.evaluated, other.evaluated), (self.exercised, other.exercised),
                             (self.violated, other.violated)):  # fmt: skip
            for k, n in theirs.items():
                mine[k] = mine.get(k, 0) + n


def clauses_for(op: o.Op | type[o.Op]) -> list[Clause]:
    cls = op if isinstance(op, type) else type(op)
    return list(BY_OP.get(cls, []))


def check_axioms(
    before: State, after: State, op: o.Op, result: OpResult, coverage: ClauseCoverage | None = None
) -> list[Violation]:
    """Every clause of `op`'s axiom on (before, after); [] when not applicable (see `applicable`)."""
    if not applicable(before, op, result):
        return []
    ctx = Ctx(before, after, op, result)
    out: list[Violation] = []
    for c in BY_OP.get(type(op), []):
        antecedent, bad = c.fn(ctx)
        if c.digest_only:
            bad = [Violation(x.clause, x.slot, x.field, x.before, x.after, x.message, True) for x in bad]
        if coverage is not None:
            coverage.record(c.id, antecedent, bool(bad))
        out += bad
    return out


def check_clause(cid: str, before: State, after: State, op: o.Op, result: OpResult) -> list[Violation]:
    """One clause by id (no applicability filter: the caller decides)."""
    for c in CLAUSES:
        if c.id == cid:
            return c.fn(Ctx(before, after, op, result))[1]
    raise KeyError(cid)
