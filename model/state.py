"""The observable state: the one shape both the reference model and a guest snapshot produce,
so the same axiom predicates and invariants run on either (spec §1, §3.9).

Immutable by convention (frozen dataclasses, Mappings never mutated after construction).
A State produced from another (by the model's `apply` or by a snapshot taken after an op)
records `parent` and the set of slot indices whose `Slot` object differs (`changed`), so the
"for every slot" clauses cost work proportional to what an op touched.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from model.types import (
    META_SLOT_SIZE,
    PAGE_SIZE,
    PHYS_ADDR_MASK,
    PTE_HUGE,
    PTE_PRESENT_BITS,
    REF_COUNT_UNUSED,
    TOP_LEVEL_USER_ENTRIES,
    Usage,
    frame_to_index,
    index_to_meta,
    page_size,
    pte_paddr,
)

# A TreePath is the root-relative list of entry indices, top level first: a level-1 leaf is
# (i4, i3, i2, i1); the level-3 node under root entry i4 is (i4,); a root is ().
TreePath = tuple[int, ...]


@dataclass(frozen=True)
class NodeMeta:
    """PageTablePageMeta (§4.5). Exec-only: not part of the ghost slot owner."""

    level: int
    nr_children: int
    stray: bool
    lock: int = 0


@dataclass(frozen=True)
class Slot:
    """One metadata slot. Ghost fields (compared by FULL(i)): rc, usage, inl, vt, sto, paths.

    - `vt`: the vtable/type word at offset 48, None when uninit (rc == UNUSED, M1).
    - `sto`: the immutable part of storage (storage tag, PT level), None when uninit.
    - `paths`: the spec's `paths_in_pt`, a set of root-relative tree paths over every live
      user page table; `refs`: the raw number of PTEs (over all VmSpaces) behind it.
    - `node`: PT-node meta (nr_children, stray, lock) when the slot holds a PT node; exec
      only, so excluded from FULL.
    """

    rc: int = REF_COUNT_UNUSED
    usage: Usage = Usage.UNUSED
    inl: int = 0
    vt: int | None = None
    sto: tuple[int, int] | None = None
    paths: frozenset[TreePath] = frozenset()
    refs: int = 0
    node: NodeMeta | None = None

    def ghost(self) -> tuple[object, ...]:
        return (self.rc, self.usage, self.inl, self.vt, self.sto, self.paths)


UNUSED_SLOT = Slot()


class SlotTable(Mapping[int, Slot]):
    """Every RAM slot, index 0..n-1, as a persistent chunked table.

    `updated` copies only the chunks it changes (and the list of chunk references), so a
    State derived from another costs what the op touched, not the size of RAM, and unchanged
    chunks are shared (equality short-circuits on them)."""

    CHUNK_BITS = 8
    CHUNK = 1 << CHUNK_BITS
    __slots__ = ("_chunks", "_len")

    def __init__(self, chunks: tuple[tuple[Slot, ...], ...], length: int):
        self._chunks = chunks
        self._len = length

    @classmethod
    def dense(cls, slots: Iterable[Slot]) -> SlotTable:
        items = list(slots)
        chunks = tuple(tuple(items[i : i + cls.CHUNK]) for i in range(0, len(items), cls.CHUNK))
        return cls(chunks, len(items))

    @classmethod
    def of(cls, slots: Mapping[int, Slot], length: int) -> SlotTable:
        """From any mapping over [0, length); missing indices are UNUSED."""
        if isinstance(slots, SlotTable) and len(slots) == length:
            return slots
        return cls.dense(slots.get(i, UNUSED_SLOT) for i in range(length))

    def __getitem__(self, index: int) -> Slot:
        if not isinstance(index, int) or not 0 <= index < self._len:
            raise KeyError(index)
        return self._chunks[index >> self.CHUNK_BITS][index & (self.CHUNK - 1)]

    def get(self, index: int, default: Slot | None = None) -> Slot | None:  # type: ignore[override]
        if isinstance(index, int) and 0 <= index < self._len:
            return self._chunks[index >> self.CHUNK_BITS][index & (self.CHUNK - 1)]
        return default

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and 0 <= index < self._len

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._len))

    def __len__(self) -> int:
        return self._len

    def values(self) -> Iterator[Slot]:  # type: ignore[override]
        for chunk in self._chunks:
            yield from chunk

    def updated(self, changes: Mapping[int, Slot]) -> SlotTable:
        if not changes:
            return self
        chunks = list(self._chunks)
        by_chunk: dict[int, list[tuple[int, Slot]]] = {}
        for index, slot in changes.items():
            if not 0 <= index < self._len:
                raise KeyError(index)
            by_chunk.setdefault(index >> self.CHUNK_BITS, []).append((index & (self.CHUNK - 1), slot))
        for c, edits in by_chunk.items():
            chunk = list(chunks[c])
            for offset, slot in edits:
                chunk[offset] = slot
            chunks[c] = tuple(chunk)
        return SlotTable(tuple(chunks), self._len)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SlotTable):
            return self._len == other._len and all(
                a is b or a == b for a, b in zip(self._chunks, other._chunks, strict=True)
            )
        if isinstance(other, Mapping):
            return len(other) == self._len and all(other.get(i) == s for i, s in enumerate(self.values()))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SlotTable(<{self._len} slots>)"


def slot_diff(a: Mapping[int, Slot], b: Mapping[int, Slot], max_chunks: int = 64) -> set[int] | None:
    """Indices whose Slot objects are not the same object in `a` and `b` (a superset of the
    slots that differ), from the chunks the two tables do not share; None when that is not
    cheap to tell (not both SlotTables, other sizes, more than `max_chunks` chunks differ)."""
    if not (isinstance(a, SlotTable) and isinstance(b, SlotTable)) or len(a) != len(b):
        return None
    if a is b:
        return set()
    out: set[int] = set()
    differing = 0
    for c, (ca, cb) in enumerate(zip(a._chunks, b._chunks, strict=True)):
        if ca is cb:
            continue
        differing += 1
        if differing > max_chunks:
            return None
        base = c << SlotTable.CHUNK_BITS
        out.update(base + j for j, (x, y) in enumerate(zip(ca, cb, strict=True)) if x is not y)
    return out


def with_slot_changes(slots: Mapping[int, Slot], changes: Mapping[int, Slot]) -> Mapping[int, Slot]:
    """`slots` with `changes` applied, without copying what did not change when it can."""
    if isinstance(slots, SlotTable):
        return slots.updated(changes)
    return {**slots, **changes}


@dataclass(frozen=True)
class PageTableNode:
    """One page-table page: its level, its path from the root, its 512 raw PTEs with the
    hardware-set A/D bits masked (spec §5.12)."""

    paddr: int
    level: int
    path: TreePath
    entries: tuple[int, ...]

    # Derived once per node object (nodes are immutable and shared by every view, and every
    # State, whose tree did not change them): what the walks need, so a check costs the nodes
    # an op changed, not the 512 entries of every node of every tree.

    @cached_property
    def present(self) -> tuple[tuple[int, int, int, bool], ...]:
        """(k, pte, target slot index, leaf) of each present entry a user-half walk visits, k
        ascending; `leaf`: a huge page or a level-1 entry (else the entry points at a node)."""
        # pte_is_present / pte_paddr / frame_to_index / pte_is_last inlined: a new node's 512
        # entries are scanned once, on the checked run's hot path
        entries = self.entries[: len(TOP_LEVEL_USER_ENTRIES)] if self.level == 4 else self.entries
        last_level = self.level == 1
        present, huge, mask = PTE_PRESENT_BITS, PTE_HUGE, PHYS_ADDR_MASK
        return tuple(
            (k, pte, (pte & mask) // PAGE_SIZE, bool(pte & huge) or last_level)
            for k, pte in enumerate(entries)
            if pte & present
        )

    @cached_property
    def by_target(self) -> dict[int, tuple[int, ...]]:
        """Target slot index -> positions in `present` of the entries pointing at it."""
        out: dict[int, list[int]] = {}
        for j, (_k, _pte, target, _leaf) in enumerate(self.present):
            out.setdefault(target, []).append(j)
        return {t: tuple(js) for t, js in out.items()}

    @cached_property
    def tables(self) -> tuple[tuple[int, int], ...]:
        """(k, child paddr) of each present entry that points at a next-level node, k ascending."""
        return tuple((k, pte_paddr(pte)) for k, pte, _target, leaf in self.present if not leaf)

    @cached_property
    def leaf_paddrs(self) -> frozenset[int]:
        """The frames this node's leaf entries map."""
        return frozenset(pte_paddr(pte) for _k, pte, _target, leaf in self.present if leaf)

    def leaf_dict_at(self, base: int) -> dict[int, Mapping_]:
        """`leaves_at` by VA (cached with it): a view's `mappings` merges these per node."""
        cached = self.__dict__.get("_leaf_dict")
        if cached is not None and cached[0] == base:
            return cached[1]
        out = {mp.va: mp for mp in self.leaves_at(base)}
        self.__dict__["_leaf_dict"] = (base, out)
        return out

    def leaves_at(self, base: int) -> tuple[Mapping_, ...]:
        """The Mapping_ of each leaf entry when the node maps the VA range starting at `base`
        (cached for the last base asked: a node is reached at one base)."""
        cached = self.__dict__.get("_leaves")
        if cached is not None and cached[0] == base:
            return cached[1]
        size = page_size(self.level)
        out = []
        for k, pte, _target, leaf in self.present:
            if not leaf:
                continue
            va = base + k * size
            if self.level == 4 and va >= 1 << 47:
                va |= 0xFFFF_0000_0000_0000
            out.append(Mapping_(va, pte_paddr(pte), self.level, pte, self.path + (k,)))
        leaves = tuple(out)
        self.__dict__["_leaves"] = (base, leaves)
        return leaves


def _leaf_va(mp: Mapping_) -> int:
    return mp.va


@dataclass(frozen=True)
class Mapping_:
    """One leaf: va -> paddr with level (1: 4 KiB) and the raw PTE (A/D masked)."""

    va: int
    paddr: int
    level: int
    pte: int
    path: TreePath


@dataclass(frozen=True)
class VmSpaceView:
    vs: int
    root: int
    nodes: Mapping[int, PageTableNode]  # paddr -> node, every node reachable from root
    cursor: int = 0  # live cursor id borrowing this VmSpace, 0 if none

    @cached_property
    def walk_nodes(self) -> tuple[PageTableNode, ...]:
        """The nodes in the order a user-half walk (a stack, root first) visits them; a node
        reached twice is listed twice, as the walk visits it twice. Cached per view: a view is
        immutable and the snapshot hands on the same object while its tree is unchanged."""
        root = self.nodes.get(self.root)
        if root is None:
            return ()
        out: list[PageTableNode] = []
        stack = [root]
        while stack:
            node = stack.pop()
            out.append(node)
            for _k, child_paddr in node.tables:
                child = self.nodes.get(child_paddr)
                if child is not None:
                    stack.append(child)
        return tuple(out)

    _TREE_CACHES = ("walk_nodes", "_mappings", "_mapped_paddrs", "_visited_nodes")

    def with_cursor(self, cursor: int) -> VmSpaceView:
        """This view with another borrowing cursor: the same tree, so its caches (walk order,
        mappings, mapped frames) carry over (a cursor opened on a 10,000-leaf VmSpace)."""
        out = VmSpaceView(self.vs, self.root, self.nodes, cursor)
        for name in self._TREE_CACHES:
            if name in self.__dict__:
                out.__dict__[name] = self.__dict__[name]
        return out

    def mappings_in(self, lo: int, hi: int, limit: int | None = None) -> dict[int, Mapping_]:
        """The first `limit` (default: all) leaves of `mappings` with lo <= va < hi, VA
        ascending. Only the nodes overlapping the range are visited, and a node of leaves is
        cut by bisection: the MMU probes' plan and the workload's aim cost the range, not the
        tree (a VmSpace of 10,000 mappings)."""
        out: dict[int, Mapping_] = {}
        root = self.nodes.get(self.root)
        if root is None:
            raise KeyError(self.root)
        cap = -1 if limit is None else limit

        def visit(node: PageTableNode, base: int) -> None:
            if not node.tables:  # leaves only (every level-1 node): VA ascending, bisected
                leaves = node.leaves_at(base)
                for mp in leaves[bisect_left(leaves, lo, key=_leaf_va) :]:
                    if mp.va >= hi or len(out) == cap:
                        return
                    out[mp.va] = mp
                return
            size = page_size(node.level)
            for k, pte, _target, leaf in node.present:
                va = base + k * size
                if va + size <= lo:
                    continue
                if va >= hi or len(out) == cap:
                    return
                if leaf:
                    if va >= lo:
                        out[va] = Mapping_(va, pte_paddr(pte), node.level, pte, node.path + (k,))
                    continue
                child = self.nodes.get(pte_paddr(pte))
                if child is not None and child.level < node.level:  # (a corrupt tree: no cycle)
                    visit(child, va)

        visit(root, 0)
        return out

    def first_mapping_outside(self, lo: int, hi: int) -> Mapping_ | None:
        """The leaf of lowest VA not in [lo, hi)."""
        for mp in self.mappings_in(0, lo, 1).values():
            return mp
        for mp in self.mappings_in(hi, 1 << 64, 1).values():
            return mp
        return None

    def mapped_paddrs(self) -> frozenset[int]:
        """The frames `mappings` maps (cached per view, as `mappings`), from the nodes' sets."""
        cached: frozenset[int] | None = self.__dict__.get("_mapped_paddrs")
        if cached is None:
            cached = frozenset().union(*(n.leaf_paddrs for n in self._mapping_nodes()))
            self.__dict__["_mapped_paddrs"] = cached
        return cached

    def _mapping_nodes(self) -> list[PageTableNode]:
        """The nodes `mappings` visits (a node reached at two VAs: twice)."""
        nodes = self.__dict__.get("_visited_nodes")
        if nodes is None:
            self.mappings()
            nodes = self.__dict__["_visited_nodes"]
        return nodes

    def mappings(self) -> dict[int, Mapping_]:
        """Every leaf reachable through the user half (root entries 0..255). Cached per view:
        the caller must not change the dict. Built from each node's cached leaves (a changed
        tree of 10,000 leaves costs its nodes, not 10,000 Python steps)."""
        cached: dict[int, Mapping_] | None = self.__dict__.get("_mappings")
        if cached is not None:
            return cached
        out: dict[int, Mapping_] = {}
        visited: list[PageTableNode] = []
        root = self.nodes.get(self.root)
        if root is None:
            raise KeyError(self.root)
        stack: list[tuple[PageTableNode, int]] = [(root, 0)]
        while stack:
            node, base = stack.pop()
            visited.append(node)
            size = page_size(node.level)
            out.update(node.leaf_dict_at(base))
            for k, child_paddr in node.tables:
                child = self.nodes.get(child_paddr)
                if child is not None:
                    va = base + k * size
                    if node.level == 4 and va >= 1 << 47:
                        va |= 0xFFFF_0000_0000_0000
                    stack.append((child, va))
        self.__dict__["_mappings"] = out
        self.__dict__["_visited_nodes"] = visited
        return out


@dataclass(frozen=True)
class CursorView:
    id: int
    vs: int
    mutable: bool
    start: int  # barrier_va (the requested, locked range)
    end: int
    va: int
    level: int
    guard_level: int = 4


@dataclass(frozen=True)
class State:
    slots: Mapping[int, Slot]  # every RAM slot, index -> Slot
    vm_spaces: Mapping[int, VmSpaceView]  # live VmSpaces
    cursors: Mapping[int, CursorView]
    frames: Mapping[int, int]  # FrameEntry: id -> paddr
    segments: Mapping[int, tuple[int, int]]  # SegmentEntry: id -> [start, end)
    uniques: Mapping[int, int]  # UniqueEntry: id -> paddr
    # page tables of dropped VmSpaces still walked (REG_LEAKED_ROOT of older guest images; the
    # guest now frees a dropped VmSpace's tree as exec does, so this stays empty)
    leaked: Mapping[int, VmSpaceView] = field(default_factory=dict)
    # next id per kind ("vm_space", "cursor", "frame", "segment", "unique")
    next_ids: Mapping[str, int] = field(default_factory=dict)
    # EXEC=upstream: the VmSpace whose root the CPU holds a reference on (0: the kernel's); the
    # harness reads it from registry counters w5 (vostd builds: always 0)
    active: int = 0
    # EXEC=upstream: live page-table nodes no walked tree reaches (a handle holds them), with their
    # entries, for on_drop at the handle's last drop (paddr -> node; the snapshot reads them)
    held_nodes: Mapping[int, PageTableNode] = field(default_factory=dict, compare=False, repr=False)
    kernel_root: int = 0
    kernel_upper: tuple[int, ...] = ()  # kernel root entries 256..511 (raw)
    nr_slots: int = 0
    # handle-registry entries the guest has (entry 0 = counters); 0: unlimited (model tests)
    registry_capacity: int = 0
    # provenance for cheap "for every slot" clauses; not part of equality
    parent: State | None = field(default=None, compare=False, repr=False)
    changed: frozenset[int] | None = field(default=None, compare=False, repr=False)
    # snapshot-only, never compared: what the walker / decoder could not express in the fields
    # above (hil.snapshot.Anomaly: a PTE outside RAM, a node reached twice, a bad type word...)
    anomalies: tuple[object, ...] = field(default=(), compare=False, repr=False)
    # snapshot-only, never compared: raw metadata etc. kept by hil.snapshot for a cheap next read
    raw_cache: object = field(default=None, compare=False, repr=False)

    def slot(self, index: int) -> Slot:
        return self.slots.get(index, UNUSED_SLOT)

    def slot_of(self, paddr: int) -> Slot:
        return self.slot(frame_to_index(paddr))

    def slot_vaddr(self, index: int) -> int:
        return index_to_meta(index)

    def handle_count(self, index: int) -> int:
        """H(i): live FrameEntry handles on slot i (plus none for uniques: they are not
        FrameEntries)."""
        return sum(1 for p in self.frames.values() if frame_to_index(p) == index)

    def segment_cover_count(self, index: int) -> int:
        """C(i): live segments covering index_to_frame(i)."""
        paddr = index * PAGE_SIZE
        return sum(1 for (s, e) in self.segments.values() if s <= paddr < e)

    def handle_counts(self) -> dict[int, int]:
        """Live FrameEntry handles per slot (cached: do not change the dict)."""
        cache = memo(self)
        if "handle_counts" in cache:
            return cache["handle_counts"]
        out: dict[int, int] = {}
        for p in self.frames.values():
            out[frame_to_index(p)] = out.get(frame_to_index(p), 0) + 1
        cache["handle_counts"] = out
        return out

    def cover_counts(self) -> dict[int, int]:
        """Live segments covering each slot (cached: do not change the dict)."""
        cache = memo(self)
        if "cover_counts" in cache:
            return cache["cover_counts"]
        out: dict[int, int] = {}
        for s, e in self.segments.values():
            for p in range(s, e, PAGE_SIZE):
                out[frame_to_index(p)] = out.get(frame_to_index(p), 0) + 1
        cache["cover_counts"] = out
        return out


def memo(obj: object) -> dict[Any, Any]:
    """A per-object cache of results derived from an immutable State / view (by convention
    never mutated after construction): kept in the instance dict, outside the dataclass fields,
    so it takes no part in equality and a `dataclasses.replace` copy starts without it."""
    d = obj.__dict__
    cache: dict[Any, Any] | None = d.get("_memo")
    if cache is None:
        cache = d["_memo"] = {}
    return cache


def changed_slots(before: State, after: State) -> set[int]:
    """Indices i with before.slot(i) != after.slot(i) (ghost fields or node meta).

    Fast when `after` was derived from `before`; otherwise compares every slot."""
    if after.parent is before and after.changed is not None:
        return {i for i in after.changed if before.slot(i) != after.slot(i)}
    keys = set(before.slots) | set(after.slots)
    return {i for i in keys if before.slot(i) != after.slot(i)}


def ghost_changed_slots(before: State, after: State) -> set[int]:
    """Indices where FULL(i) fails: some ghost field differs."""
    return {i for i in changed_slots(before, after) if before.slot(i).ghost() != after.slot(i).ghost()}


assert META_SLOT_SIZE == 64
assert TOP_LEVEL_USER_ENTRIES.start == 0 and TOP_LEVEL_USER_ENTRIES.step == 1  # PageTableNode.present slices
