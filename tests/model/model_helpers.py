"""Shared helpers of the model tests: a small boot state, a runner, a random op generator."""

from __future__ import annotations

import dataclasses
import random

from model import ops as o
from model.axioms import ClauseCoverage, check_axioms
from model.invariants import check_invariants
from model.ops import OpResult
from model.state import Slot, State
from model.store import BootLayout, PoolAllocator, apply, boot_layout, initial_state
from model.types import MAX_PADDR, PAGE_SIZE, CachePolicy, PageProperty, PropTransform
from model.violation import Violation

RAM = 16 << 20
LAY: BootLayout = boot_layout(RAM)
BASE: State = initial_state(RAM)
D0 = LAY.data_pool_start  # first data page
GiB = 1 << 30
MiB = 1 << 20


def data(k: int) -> int:
    return D0 + k * PAGE_SIZE


def known_finding(v: Violation) -> bool:
    """R2 at a walked root: VS-NEW-3 unparks the root, R2 wants every slot parked (a genuine
    contradiction of the spec; reported literally, filtered where a test is about something else)."""
    return v.clause == "S1/R2" or v.field == "inv:S1/R2"


class Run:
    """Apply ops to the model, keeping the history."""

    def __init__(self, state: State | None = None, pool: tuple[int, int] | None = None) -> None:
        self.state = state if state is not None else BASE
        self.pool = pool or (LAY.pt_pool_start, LAY.pt_pool_end)
        self.last: tuple[State, o.Op, OpResult, State] | None = None

    def do(self, op: o.Op) -> OpResult:
        before = self.state
        result, after = apply(before, op, PoolAllocator(self.pool[0], self.pool[1], before))
        self.last = (before, op, result, after)
        self.state = after
        return result

    def ok(self, op: o.Op) -> OpResult:
        r = self.do(op)
        assert r.status == o.Status.OK, (op, r)
        return r

    def frame(self, k: int) -> int:
        return self.ok(o.FrameFromUnused(paddr=data(k))).get("frame")

    def vm_space(self) -> int:
        return self.ok(o.NewVmSpace()).get("vs")

    def cursor(self, vs: int, start: int = 0, end: int = GiB, mutable: bool = True) -> int:
        cls = o.OpenCursorMut if mutable else o.OpenCursor
        return self.ok(cls(vs=vs, start=start, end=end)).get("cursor")

    def map_at(self, c: int, va: int, k: int, prop: object = None) -> OpResult:
        self.ok(o.Jump(cursor=c, va=va))
        fid = (
            self.frame(k)
            if self.state.slot_of(data(k)).rc == (1 << 64) - 1
            else self.ok(o.FrameFromInUse(paddr=data(k))).get("frame")
        )
        kwargs = {} if prop is None else {"prop": prop}
        return self.ok(o.Map(cursor=c, frame=fid, **kwargs))  # type: ignore[arg-type]

    def axioms(self) -> list[Violation]:
        assert self.last is not None
        before, op, result, after = self.last
        return check_axioms(before, after, op, result)


def mutate(after: State, index: int, **fields: object) -> State:
    """A deliberately wrong after-state: slot `index` with `fields` replaced."""
    slots = dict(after.slots)
    slots[index] = dataclasses.replace(after.slot(index), **fields)  # type: ignore[arg-type]
    changed = (after.changed or frozenset()) | {index}
    return dataclasses.replace(after, slots=slots, changed=changed)


def with_slot(after: State, index: int, slot: Slot) -> State:
    slots = dict(after.slots)
    slots[index] = slot
    return dataclasses.replace(after, slots=slots, changed=(after.changed or frozenset()) | {index})


# --- random op generation ---------------------------------------------------------------------

WINDOWS = [(0, 4 * MiB), (0, GiB), (0, 1 << 39), (GiB - 8 * PAGE_SIZE, GiB + 8 * PAGE_SIZE), (1 << 39, 1 << 40)]
NR_DATA = 48


def random_op(rng: random.Random, s: State, findings: bool = True) -> o.Op:
    """An op biased towards live ids and a small VA / paddr window, with some bad ops."""
    cursors = sorted(s.cursors)
    mut = [c for c in cursors if s.cursors[c].mutable]
    frames, segs, uniq = sorted(s.frames), sorted(s.segments), sorted(s.uniques)
    free_vs = [v for v, view in s.vm_spaces.items() if not view.cursor]

    def pick(xs: list[int]) -> int:
        return rng.choice(xs) if xs and rng.random() > 0.03 else rng.randrange(0, 40)

    def va_in(cid: int) -> int:
        c = s.cursors.get(cid)
        if c is None:
            return rng.randrange(0, 1 << 20) * PAGE_SIZE
        pages = (c.end - c.start) // PAGE_SIZE
        off = rng.choice([0, 1, 2, pages - 1, pages // 2, rng.randrange(pages)])
        return c.start + min(off, pages - 1) * PAGE_SIZE

    def length(cid: int) -> int:
        c = s.cursors.get(cid)
        room = (c.end - c.va) if c is not None else GiB
        choices = [PAGE_SIZE, 2 * PAGE_SIZE, 2 * MiB, GiB, 1 << 39, room, room // 2]
        n = rng.choice(choices)
        n = max(0, min(n, room)) // PAGE_SIZE * PAGE_SIZE
        return n if rng.random() > 0.02 else n + 8

    def paddr() -> int:
        r = rng.random()
        if r < 0.8:
            return data(rng.randrange(NR_DATA))
        if r < 0.85:
            return LAY.pt_pool_start + rng.randrange(8) * PAGE_SIZE
        if r < 0.9:
            return RAM + rng.randrange(4) * PAGE_SIZE  # valid paddr, no slot
        if r < 0.95:
            return rng.choice([MAX_PADDR, data(1) + 8])
        return rng.randrange(0, 256) * PAGE_SIZE

    kind = rng.choices(
        ["vs", "drop_vs", "open", "drop_c", "query", "find", "jump", "va", "map", "unmap", "protect",
         "fu", "fi", "fd", "seg", "seg_drop", "split", "next", "clone", "slice", "u", "u_drop", "from_u", "try"],
        weights=[2, 1, 4, 2, 5, 3, 6, 1, 12, 4, 3, 8, 4, 5, 2, 1, 1, 1, 1, 1, 2, 1, 1, 2],
    )[0]  # fmt: skip
    if kind == "vs":
        return o.NewVmSpace()
    if kind == "drop_vs":
        return o.DropVmSpace(vs=pick(sorted(s.vm_spaces)))
    if kind == "open":
        start, end = rng.choice(WINDOWS)
        if rng.random() < 0.05:
            start, end = rng.choice([(end, start), (start + 8, end), (0, 1 << 48)])
        cls = o.OpenCursorMut if rng.random() < 0.8 else o.OpenCursor
        return cls(vs=pick(free_vs or sorted(s.vm_spaces)), start=start, end=end)
    if kind == "drop_c":
        return o.DropCursor(cursor=pick(cursors))
    if kind == "query":
        return o.Query(cursor=pick(cursors))
    if kind == "find":
        c = pick(cursors)
        return o.FindNext(cursor=c, len=length(c))
    if kind == "jump":
        c = pick(cursors)
        va = va_in(c)
        return o.Jump(cursor=c, va=va if rng.random() > 0.05 else va + rng.choice([8, 1 << 41]))
    if kind == "va":
        return o.VirtAddr(cursor=pick(cursors))
    if kind == "map":
        prop = PageProperty(flags=rng.choice([1, 3, 5, 7, 0x1B]), cache=CachePolicy(rng.choice([4, 4, 4, 3, 0])),
                              priv=rng.choice([1, 1, 3]))  # type: ignore[arg-type]  # fmt: skip
        if rng.random() < 0.02:
            prop = PageProperty(flags=rng.choice([0, 2, 0x21]), cache=CachePolicy(rng.choice([1, 2, 4])), priv=1)  # type: ignore[arg-type]
        return o.Map(cursor=pick(mut), frame=pick(frames), prop=prop)
    if kind == "unmap":
        c = pick(mut)
        return o.Unmap(cursor=c, len=length(c))
    if kind == "protect":
        c = pick(mut)
        t = PropTransform(
            set_flags=rng.choice([0, 2, 4]), clear_flags=rng.choice([0, 2]), cache=rng.choice([0xFF, 0, 3, 4, 1])
        )
        return o.ProtectNext(cursor=c, len=length(c), transform=t)
    if kind == "fu":
        return o.FrameFromUnused(paddr=paddr())
    if kind == "fi":
        if frames and rng.random() < 0.7:
            return o.FrameFromInUse(paddr=s.frames[rng.choice(frames)])
        if not findings:  # FrameFromInUse on a PT / kernel slot breaks S13 (FI-3): a spec finding
            return o.FrameFromInUse(paddr=rng.choice([data(rng.randrange(NR_DATA)), RAM, data(1) + 8]))
        return o.FrameFromInUse(paddr=paddr())
    if kind == "fd":
        return o.FrameDrop(frame=pick(frames))
    if kind == "seg":
        start = data(rng.randrange(NR_DATA))
        return o.SegmentFromUnused(start=start, end=start + rng.choice([1, 2, 3]) * PAGE_SIZE)
    if kind == "seg_drop":
        return o.SegmentDrop(segment=pick(segs))
    if kind == "split":
        return o.SegmentSplit(segment=pick(segs), offset=rng.choice([PAGE_SIZE, 2 * PAGE_SIZE, 100]))
    if kind == "next":
        return o.SegmentNext(segment=pick(segs))
    if kind == "clone":
        return o.SegmentClone(segment=pick(segs))
    if kind == "slice":
        return o.SegmentSlice(segment=pick(segs), start=0, end=rng.choice([PAGE_SIZE, 2 * PAGE_SIZE]))
    if kind == "u":
        return o.UniqueFromUnused(paddr=paddr())
    if kind == "u_drop":
        return o.UniqueDrop(unique=pick(uniq))
    if kind == "from_u":
        return o.FromUnique(unique=pick(uniq))
    return o.TryFromShared(frame=pick(frames))


Finding = tuple[int, o.Op, OpResult, list[Violation]]


def random_run(
    seed: int, steps: int, coverage: ClauseCoverage | None = None, check_every: int = 0, findings: bool = True
) -> list[Finding]:
    """Apply `steps` random ops from the boot state; incremental invariants after every op
    (full every `check_every`); a PANIC reboots (back to the boot state, like the harness)."""
    rng = random.Random(seed)
    run = Run()
    bad: list[Finding] = []
    for n in range(steps):
        op = random_op(rng, run.state, findings)
        before = run.state
        r = run.do(op)
        after = run.state
        inv = check_invariants(after, only=(after.changed or frozenset()))
        if check_every and n % check_every == 0:
            inv = check_invariants(after)
        inv = [v for v in inv if not known_finding(v)]
        if inv:
            bad.append((n, op, r, inv))
        if coverage is not None:
            check_axioms(before, after, op, r, coverage)
        if r.status == o.Status.PANIC:
            run.state = BASE
    return bad
