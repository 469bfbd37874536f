"""Seeded workloads that reach the interesting states (issue "The checked run").

A `Workload` is called with the current State and returns the next op: several VmSpaces
sharing frames, re-maps, whole-subtree unmaps at 2 MiB / 1 GiB / 512 GiB boundaries, queries
of absent and present VAs, protect with every cache policy, frames cloned by query and then
dropped, segments and unique frames, and error-path ops at a configurable rate. The same
seed on the same guest gives the same ops (the choices depend only on the seed and the
observed state, which a deterministic guest reproduces).

The VAs a map / unmap / protect_next affects are touched right before it, so the TLB holds
them: the MMU probes do that inside the op's own request (hil/check/oracles.py), so no
workload op is spent on it and nothing between the touch and the op evicts the entries.
`hil/run/outcomes.py` measures which outcomes of each op a run reached.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable
from dataclasses import dataclass

from hil.target.abi import Layout
from model import ops as m
from model.state import PageTableNode, State, VmSpaceView
from model.types import (
    KEEP_CACHE,
    PAGE_SIZE,
    REF_COUNT_UNUSED,
    USER_VA_END,
    CachePolicy,
    PageFlags,
    PageProperty,
    PrivFlags,
    PropTransform,
)

GIB = 1 << 30
MIB = 1 << 20
SLOT_512G = 1 << 39

# A few hot regions so that ops collide: the start of user space, a 2 MiB and a 1 GiB
# boundary, the second 512 GiB slot, and the top of user space.
HOT_BASES = (0, 2 * MIB - 4 * PAGE_SIZE, GIB - 4 * PAGE_SIZE, SLOT_512G, USER_VA_END - 16 * PAGE_SIZE)
HOT_PAGES = 12
UNMAP_SIZES = (PAGE_SIZE, 2 * PAGE_SIZE, 8 * PAGE_SIZE, 2 * MIB, GIB, SLOT_512G)

PROPS = (
    PageProperty(int(PageFlags.R), CachePolicy.WRITEBACK, int(PrivFlags.USER)),
    PageProperty(int(PageFlags.R | PageFlags.W), CachePolicy.WRITEBACK, int(PrivFlags.USER)),
    PageProperty(int(PageFlags.R | PageFlags.X), CachePolicy.WRITETHROUGH, int(PrivFlags.USER)),
    PageProperty(int(PageFlags.R | PageFlags.W | PageFlags.X), CachePolicy.UNCACHEABLE, int(PrivFlags.USER)),
    PageProperty(int(PageFlags.R | PageFlags.AVAIL1), CachePolicy.WRITEBACK, int(PrivFlags.USER | PrivFlags.GLOBAL)),
)
TRANSFORMS = (
    PropTransform(set_flags=int(PageFlags.W)),
    PropTransform(clear_flags=int(PageFlags.W)),
    PropTransform(set_flags=int(PageFlags.X), cache=int(CachePolicy.WRITETHROUGH)),
    PropTransform(cache=int(CachePolicy.UNCACHEABLE)),
    PropTransform(cache=int(CachePolicy.WRITEBACK), set_flags=int(PageFlags.AVAIL2)),
    PropTransform(clear_priv=int(PrivFlags.USER)),  # [5]: the re-map plan of _aimed_nav uses it
    PropTransform(cache=KEEP_CACHE),
    PropTransform(clear_flags=int(PageFlags.X)),  # sets NX
    PropTransform(set_priv=int(PrivFlags.USER), set_flags=int(PageFlags.W | PageFlags.X)),
)


@dataclass
class WorkloadConfig:
    error_rate: float = 0.04  # ops that must be rejected (dead ids, unaligned, wrong kind...)
    panic_rate: float = 0.003  # ops that hit an OSTD panic condition (the guest reboots)
    max_vm_spaces: int = 3
    data_frames: int = 48  # distinct data-pool frames the workload cycles through


class MappedFrames:
    """The sorted distinct frames every VmSpace maps, kept across draws: a draw recounts only
    the nodes that changed since the last one (a 10,000-leaf tree re-sorted per draw cost the
    FrameFromInUse draw ~2 ms). The union of each view's `walk_nodes`' leaf frames, i.e. of
    `VmSpaceView.mapped_paddrs` over the views."""

    def __init__(self) -> None:
        self._nodes: dict[int, PageTableNode] = {}  # id -> node counted (held: ids stay unique)
        self._counts: dict[int, int] = {}  # frame -> how many counted nodes map it
        self.sorted: list[int] = []

    def update(self, views: Iterable[VmSpaceView]) -> list[int]:
        now = {id(n): n for v in views for n in v.walk_nodes}
        for key in self._nodes.keys() - now.keys():
            for paddr in self._nodes.pop(key).leaf_paddrs:
                left = self._counts[paddr] - 1
                if left:
                    self._counts[paddr] = left
                else:
                    del self._counts[paddr]
                    del self.sorted[bisect.bisect_left(self.sorted, paddr)]
        for key in now.keys() - self._nodes.keys():
            node = self._nodes[key] = now[key]
            for paddr in node.leaf_paddrs:
                if paddr in self._counts:
                    self._counts[paddr] += 1
                else:
                    self._counts[paddr] = 1
                    bisect.insort(self.sorted, paddr)
        return self.sorted

    def __contains__(self, paddr: int) -> bool:
        return paddr in self._counts


def _nth_of_merge(big: list[int], small: list[int], n: int) -> int:
    """merged[n] of two sorted lists with no common element, without building merged."""
    for i, x in enumerate(small):
        at = bisect.bisect_left(big, x) + i  # where x sits in the merge
        if n == at:
            return x
        if n < at:
            return big[n - i]
    return big[n - len(small)]


class Workload:
    def __init__(self, seed: int, layout: Layout, config: WorkloadConfig | None = None):
        self.seed = seed
        self.rng = random.Random(seed)
        self.layout = layout
        self.config = config or WorkloadConfig()
        start = layout.data_pool_start
        self.frames = [start + i * PAGE_SIZE for i in range(self.config.data_frames)]
        self.hot_vas = sorted({b + i * PAGE_SIZE for b in HOT_BASES for i in range(HOT_PAGES)})
        self.plan: list[m.Op] = []  # ops a multi-op pattern still has to issue
        # upstream exec (hil_layout): several cursors per VmSpace, map only where nothing is
        # mapped (over a mapped page exec panics), query makes no handle; vostd draws are unchanged
        self.upstream = layout.exec_name == "upstream"
        self.mapped = MappedFrames()

    # --- helpers ----------------------------------------------------------------------
    def _choice(self, seq: list[int] | tuple[int, ...]) -> int:
        return seq[self.rng.randrange(len(seq))]

    def _free_cursor_vs(self, state: State) -> list[int]:
        return sorted(vs for vs, v in state.vm_spaces.items() if not v.cursor)

    def _range(self) -> tuple[int, int]:
        r = self.rng.random()
        if r < 0.35:
            return 0, USER_VA_END
        base = self._choice(HOT_BASES) & ~(PAGE_SIZE - 1)
        if r < 0.7:
            size = self._choice((2 * MIB, GIB, SLOT_512G))
            start = base - (base % size)
            return start, min(start + size, USER_VA_END)
        return base, min(base + HOT_PAGES * PAGE_SIZE, USER_VA_END)

    # --- the generator ------------------------------------------------------------------
    def __call__(self, state: State) -> m.Op:
        if self.plan:
            return self.plan.pop(0)
        r = self.rng.random()
        if r < self.config.panic_rate:
            return self._panic_op(state)
        if r < self.config.panic_rate + self.config.error_rate:
            return self._error_op(state)
        return self._valid_op(state)

    def _valid_op(self, state: State) -> m.Op:
        rng = self.rng
        cursors = sorted(state.cursors)
        mut = [c for c in cursors if state.cursors[c].mutable]
        frames = sorted(state.frames)
        if len(state.vm_spaces) < 1 or (len(state.vm_spaces) < self.config.max_vm_spaces and rng.random() < 0.02):
            return m.NewVmSpace()
        free = self._free_cursor_vs(state)
        if self.upstream and (not cursors or rng.random() < 0.06):
            return self._open_upstream(state)
        if self.upstream and rng.random() < 0.015:  # the CPU's reference moves (upstream activate)
            return m.Activate(vs=self._choice([0, *sorted(state.vm_spaces)]))
        # one cursor per VmSpace at most (two would deadlock in exec), several VmSpaces at once
        if free and (not cursors or rng.random() < 0.04):
            start, end = self._range()
            cls = m.OpenCursorMut if rng.random() < 0.85 else m.OpenCursor
            return cls(vs=self._choice(free), start=start, end=end)
        if len(frames) < 3 and rng.random() < 0.7:
            return m.FrameFromUnused(paddr=self._choice(self.frames))
        w = rng.random()
        if cursors and w < 0.04:
            c = self._choice(cursors)
            return m.DropCursor(cursor=c)
        if w < 0.07 and len(state.vm_spaces) > 1:
            idle = [vs for vs in self._free_cursor_vs(state) if vs != min(state.vm_spaces)]
            if idle:
                return m.DropVmSpace(vs=self._choice(idle))
        if cursors and w < 0.22:
            c = self._choice(cursors)
            cur = state.cursors[c]
            candidates = [v for v in self.hot_vas if cur.start <= v < cur.end] or [cur.start]
            return m.Jump(cursor=c, va=self._choice(candidates))
        if self.upstream and mut and frames and w < 0.42:
            return self._map_upstream(state, self._choice(mut), self._choice(frames))
        if mut and frames and w < 0.42:
            return m.Map(cursor=self._choice(mut), frame=self._choice(frames), prop=PROPS[rng.randrange(len(PROPS))])
        if mut and w < 0.455:
            planned = self._subtree_unmap(state, self._choice(mut))
            if planned:
                return planned
        if cursors and w < 0.47:
            planned = self._aimed_nav(state, cursors, mut)
            if planned:
                return planned
        if len(mut) > 1 and w < 0.48 and not self.upstream:
            planned = self._share(state, mut)
            if planned:
                return planned
        if mut and w < 0.50:
            c = self._choice(mut)
            length = self._nav_len(state, c)
            return m.Unmap(cursor=c, len=length) if length else m.Jump(cursor=c, va=state.cursors[c].start)
        if cursors and w < 0.60:
            return m.Query(cursor=self._choice(cursors))
        if cursors and w < 0.66:
            c = self._choice(cursors)
            length = self._nav_len(state, c)
            return m.FindNext(cursor=c, len=length) if length else m.Jump(cursor=c, va=state.cursors[c].start)
        if mut and w < 0.71:
            c = self._choice(mut)
            length = self._nav_len(state, c)
            if not length:
                return m.Jump(cursor=c, va=state.cursors[c].start)
            return m.ProtectNext(cursor=c, len=length, transform=TRANSFORMS[rng.randrange(len(TRANSFORMS))])
        if cursors and w < 0.73:
            return m.VirtAddr(cursor=self._choice(cursors))
        if frames and w < 0.80:
            return m.FrameDrop(frame=self._choice(frames))
        if w < 0.84:
            # clones of handles and of mapped frames: the same frame then ends up mapped in
            # several VmSpaces (often at the same hot VA, i.e. the same tree path)
            # = a choice over sorted(handles' frames | mapped frames | {kernel root})
            mapped = self.mapped.update(state.vm_spaces.values())
            extra = sorted(p for p in {*state.frames.values(), self.layout.kernel_root} if p not in self.mapped)
            n = self.rng.randrange(len(mapped) + len(extra))
            return m.FrameFromInUse(paddr=_nth_of_merge(mapped, extra, n))
        if w < 0.88:
            return m.FrameFromUnused(paddr=self._choice(self.frames))
        return self._segment_or_unique_op(state)

    def _open_upstream(self, state: State) -> m.Op:
        """A cursor on any VmSpace: often a small range at a hot base, so that cursors on disjoint
        ranges of one VmSpace coexist (upstream locks the lowest covering node)."""
        vs = self._choice(sorted(state.vm_spaces))
        if self.rng.random() < 0.3:
            start, end = self._range()
        else:
            base = self._choice(HOT_BASES)
            pages = self._choice((1, 2, 4, HOT_PAGES))
            start, end = base, min(base + pages * PAGE_SIZE, USER_VA_END)
        cls = m.OpenCursorMut if self.rng.random() < 0.85 else m.OpenCursor
        return cls(vs=vs, start=start, end=end)

    def _map_upstream(self, state: State, c: int, frame: int) -> m.Op:
        """Map where nothing is mapped: at the cursor's VA if free, else jump to a free hot VA of
        its range first (or unmap the page when none is free)."""
        cur = state.cursors[c]
        view = state.vm_spaces.get(cur.vs)
        mapped = view.mappings() if view is not None else {}
        prop = PROPS[self.rng.randrange(len(PROPS))]
        if cur.va < cur.end and cur.va not in mapped:
            return m.Map(cursor=c, frame=frame, prop=prop)
        free = [v for v in self.hot_vas if cur.start <= v < cur.end and v not in mapped]
        if free:
            self.plan = [m.Map(cursor=c, frame=frame, prop=prop)]
            return m.Jump(cursor=c, va=self._choice(free))
        if cur.va < cur.end:
            return m.Unmap(cursor=c, len=PAGE_SIZE)
        return m.Jump(cursor=c, va=cur.start)

    def _nav_len(self, state: State, c: int) -> int:
        """A page-aligned length for find_next / unmap / protect_next that stays inside the
        cursor's barrier (past it exec panics, §5.5); 0 when the cursor is already past it."""
        cur = state.cursors[c]
        if cur.va >= cur.end:
            return 0
        length = min(self._choice(UNMAP_SIZES), cur.end - cur.va)
        return length - length % PAGE_SIZE

    def _subtree_unmap(self, state: State, c: int) -> m.Op | None:
        """Unmap a whole 2 MiB / 1 GiB / 512 GiB slot (§5.8): the cursor must stand at the slot's
        start one level above it, so first jump out of the slot (jump keeps the level and only
        pops, §5.6), then to its start, then unmap exactly its size."""
        cur = state.cursors[c]
        size = self._choice((2 * MIB, GIB, SLOT_512G))
        starts = [b - b % size for b in HOT_BASES]
        starts = [a for a in starts if cur.start <= a and a + size <= cur.end]
        if not starts:
            return None
        start = self._choice(starts)
        parent = min(size << 9, USER_VA_END)
        outside = [v for v in (start - parent, start + parent, cur.start) if cur.start <= v < cur.end]
        outside = [v for v in outside if not start <= v < start + size]
        self.plan = ([m.Jump(cursor=c, va=outside[0])] if outside else []) + [
            m.Jump(cursor=c, va=start), m.Unmap(cursor=c, len=size)
        ]
        return self.plan.pop(0)

    def _aimed_nav(self, state: State, cursors: list[int], mut: list[int]) -> m.Op | None:
        """find_next / protect_next over a few pages whose first mapped page is the last one
        (where an off-by-one at the range's end hides), or re-map the frame a VA maps already
        (query clones it, then map the clone at the same VA)."""
        c = self._choice(cursors)
        cur = state.cursors[c]
        view = state.vm_spaces.get(cur.vs)
        if view is None:
            return None
        mapped = list(view.mappings_in(cur.start, cur.end))  # VA ascending: a range query, not every leaf
        if not mapped:
            return None
        va = self._choice(mapped)
        k = 0
        while k < 3 and va - (k + 1) * PAGE_SIZE >= cur.start and va - (k + 1) * PAGE_SIZE not in mapped:
            k += 1
        start, length = va - k * PAGE_SIZE, (k + 1) * PAGE_SIZE
        r = self.rng.random()
        if self.upstream and r < 0.3:  # no clone to re-map (query borrows; map over mapped panics)
            r = 0.3 + 0.7 * r
        if c in mut and r < 0.3:
            fid = state.next_ids.get("frame", 1)  # the clone's id: ids are counters
            # the page turns supervisor first, so the re-map also sets U: the one change of U a
            # missing flush leaves stale where the MMU probes see it (SMAP, oracles.py)
            self.plan = [m.ProtectNext(cursor=c, len=PAGE_SIZE, transform=TRANSFORMS[5]), m.Jump(cursor=c, va=va),
                         m.Query(cursor=c), m.Jump(cursor=c, va=va), m.Map(cursor=c, frame=fid, prop=PROPS[1])]
        elif c in mut and r < 0.75:
            transform = TRANSFORMS[self.rng.randrange(len(TRANSFORMS))]
            self.plan = [m.ProtectNext(cursor=c, len=length, transform=transform)]
        else:
            self.plan = [m.FindNext(cursor=c, len=length)]
        return m.Jump(cursor=c, va=va if r < 0.3 else start)

    def _share(self, state: State, mut: list[int]) -> m.Op | None:
        """Map a frame that one VmSpace maps at VA X into another VmSpace at X too: the same
        frame then has the same root-relative tree path twice (`paths_in_pt` is a set)."""
        c = self._choice(mut)
        target = state.cursors[c]
        for vs, view in sorted(state.vm_spaces.items()):
            if vs == target.vs:
                continue
            for va, mp in view.mappings_in(target.start, target.end, 1).items():  # the lowest in range
                fid = state.next_ids.get("frame", 1)  # the clone's id: ids are counters
                self.plan = [m.Jump(cursor=c, va=va), m.Map(cursor=c, frame=fid, prop=PROPS[0])]
                return m.FrameFromInUse(paddr=mp.paddr)
        return None

    def _segment_or_unique_op(self, state: State) -> m.Op:
        rng = self.rng
        segs = sorted(state.segments)
        uniques = sorted(state.uniques)
        w = rng.random()
        if not segs or w < 0.2:
            i = rng.randrange(len(self.frames) - 4)
            n = rng.randrange(1, 4)
            return m.SegmentFromUnused(start=self.frames[i], end=self.frames[i] + n * PAGE_SIZE)
        s = self._choice(segs)
        start, end = state.segments[s]
        pages = (end - start) // PAGE_SIZE
        if w < 0.3:
            return m.SegmentDrop(segment=s)
        if w < 0.4 and pages > 1:
            return m.SegmentSplit(segment=s, offset=rng.randrange(1, pages) * PAGE_SIZE)
        if w < 0.5:
            return m.SegmentNext(segment=s)
        if w < 0.6:
            return m.SegmentClone(segment=s)
        if w < 0.7:
            a = rng.randrange(pages)
            b = rng.randrange(a + 1, pages + 1)
            if pages > 1 and rng.random() < 0.5:
                a, b = 0, pages  # more than one page: each must gain its reference
            return m.SegmentSlice(segment=s, start=a * PAGE_SIZE, end=b * PAGE_SIZE)
        if uniques and w < 0.8:
            return m.UniqueDrop(unique=self._choice(uniques)) if rng.random() < 0.4 else m.FromUnique(
                unique=self._choice(uniques))
        if state.frames and w < 0.9:
            return m.TryFromShared(frame=self._choice(sorted(state.frames)))
        free = [p for p in self.frames if state.slot_of(p).rc == REF_COUNT_UNUSED]
        return m.UniqueFromUnused(paddr=self._choice(free or self.frames))

    def _dead(self, live: list[int], next_id: int) -> int:
        return next_id + 5 if self.rng.random() < 0.5 or not live else 0

    def _error_op(self, state: State) -> m.Op:
        rng = self.rng
        pick = rng.randrange(13)
        ids = state.next_ids
        ro = [c for c, cur in state.cursors.items() if not cur.mutable]
        if pick == 0:
            return m.Query(cursor=ids.get("cursor", 1) + 7)
        if pick == 1:
            return m.FrameDrop(frame=ids.get("frame", 1) + 7)
        if pick == 2:
            return m.FrameFromUnused(paddr=self._choice(self.frames) + 8)  # NOT_ALIGNED
        if pick == 3:
            return m.FrameFromInUse(paddr=self.layout.ram_size + PAGE_SIZE * rng.randrange(1, 9))
        if pick == 4 and state.vm_spaces:
            busy = sorted(vs for vs, v in state.vm_spaces.items() if v.cursor)
            if busy and rng.random() < 0.7:  # CURSOR_BUSY alone: a valid range on a borrowed space
                return m.OpenCursorMut(vs=self._choice(busy), start=0, end=USER_VA_END)
            vs = self._choice(sorted(state.vm_spaces))
            return m.OpenCursorMut(vs=vs, start=PAGE_SIZE + 1, end=2 * PAGE_SIZE)  # CURSOR_BUSY or ACCESS_DENIED
        if pick == 5 and ro and state.frames:
            return m.Map(cursor=self._choice(sorted(ro)), frame=self._choice(sorted(state.frames)))
        if pick in (6, 12) and state.cursors:
            c = self._choice(sorted(state.cursors))
            # INVALID_VADDR; the barrier's end itself is the boundary an off-by-one lets through
            return m.Jump(cursor=c, va=state.cursors[c].end + (PAGE_SIZE if pick == 6 and rng.random() < 0.3 else 0))
        if pick == 7 and state.cursors and state.frames:
            c = self._choice(sorted(state.cursors))
            return m.Map(cursor=c, frame=self._choice(sorted(state.frames)), prop=PageProperty(0x20))  # BAD_ARG
        if pick == 9:  # UNUSED: nothing to take a reference on
            free = [p for p in self.frames if state.slot_of(p).rc == REF_COUNT_UNUSED]
            if free:
                return m.FrameFromInUse(paddr=self._choice(free))
        if pick == 10:  # VM_SPACE_BUSY: a live cursor borrows it
            busy = sorted(vs for vs, v in state.vm_spaces.items() if v.cursor)
            if busy:
                return m.DropVmSpace(vs=self._choice(busy))
        if pick == 11 and state.segments:  # BAD_ARG: a split at the end leaves an empty half
            s = self._choice(sorted(state.segments))
            start, end = state.segments[s]
            return m.SegmentSplit(segment=s, offset=end - start)
        return m.DropVmSpace(vs=ids.get("vm_space", 1) + 3)

    def _panic_op(self, state: State) -> m.Op:
        cursors = sorted(state.cursors)
        if not cursors:
            return self._error_op(state)
        c = self._choice(cursors)
        cur = state.cursors[c]
        if self.upstream and cur.mutable and state.frames and self.rng.random() < 0.3:
            view = state.vm_spaces.get(cur.vs)
            mapped = list(view.mappings_in(cur.start, cur.end)) if view else []
            if mapped:  # upstream: map over a mapped page panics (MAP_ALREADY_MAPPED)
                self.plan = [m.Map(cursor=c, frame=self._choice(sorted(state.frames)))]
                return m.Jump(cursor=c, va=self._choice(mapped))
        pick = self.rng.randrange(3)
        if pick == 0:
            return m.FindNext(cursor=c, len=PAGE_SIZE + 1)
        if pick == 1:
            return m.Jump(cursor=c, va=cur.start + 1)
        return m.FindNext(cursor=c, len=(cur.end - min(cur.va, cur.end)) + PAGE_SIZE)
