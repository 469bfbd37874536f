"""The reference model: exec semantics of every op (spec §2, §5; docs/semantics.md).

`apply(state, op, alloc) -> (result, state')` is pure: it never mutates `state`; the new State
records `parent=state` and `changed` (the slot indices whose Slot object it replaced). The
model predicts everything except allocator choices: a new page-table node's paddr comes from
`alloc(level)` (the harness reads it from the guest; tests use `PoolAllocator`). An allocator
signals exhaustion by raising `OutOfMemory` (-> PANIC OUT_OF_MEMORY).

Page-table shadow: every live VmSpace (and a leaked root of older images, see State.leaked) keeps its nodes
(paddr -> 512 raw PTEs). Slot `paths` / `refs` are kept exactly as a walk of the user half
(root entries 0..255) of every walked root would derive them: a leaf's slot holds the set of
root-relative paths (i4, i3, i2, i1) of the PTEs pointing at it and `refs` the raw PTE count;
a PT node holds {path of its parent entry} (a root: {()}), refs 1 (a root: 0).
Kernel page-table nodes are never walked.

A cursor's `path[]` is not stored: with root locking (guard level 4) the node of every level
between `level` and 4 is the one reached by walking `va` from the root (§5.3 keeps this true:
push/pop/move_forward/jump only move within the nodes of the walk), so it is derived.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from model import ops as o
from model.ops import ErrorCode, OpResult, PanicCode
from model.state import (
    UNUSED_SLOT,
    CursorView,
    NodeMeta,
    PageTableNode,
    Slot,
    SlotTable,
    State,
    TreePath,
    VmSpaceView,
    with_slot_changes,
)
from model.types import (
    MAX_PADDR,
    NR_ENTRIES,
    NR_LEVELS,
    PAGE_SIZE,
    PTE_PRESENT_BITS,
    REF_COUNT_MAX,
    REF_COUNT_UNIQUE,
    REF_COUNT_UNUSED,
    TOP_LEVEL_KERNEL_ENTRIES,
    TOP_LEVEL_USER_ENTRIES,
    USER_VA_END,
    CachePolicy,
    PageProperty,
    StorageTag,
    Usage,
    align_down,
    frame_to_index,
    page_size,
    pte_is_last,
    pte_is_present,
    pte_new_page,
    pte_new_pt,
    pte_paddr,
    pte_prop,
    pte_set_prop,
)

MiB = 1 << 20
ID_KINDS = ("vm_space", "cursor", "frame", "segment", "unique")
UNSUPPORTED_CACHES = (CachePolicy.WRITE_COMBINING, CachePolicy.WRITE_PROTECTED)


class OutOfMemory(Exception):
    """Raised by an allocator with no UNUSED slot left (exec: PANIC OUT_OF_MEMORY)."""


class Unpredictable(Exception):
    """The model cannot predict this harness-only op (Probe, RaiseFault)."""


class _Panic(Exception):
    def __init__(self, code: PanicCode) -> None:
        super().__init__(code.name)
        self.code = code


class _Err(Exception):
    def __init__(self, code: ErrorCode) -> None:
        super().__init__(code.name)
        self.code = code


# --- boot state -------------------------------------------------------------------------


@dataclass(frozen=True)
class BootLayout:
    """Where the synthetic boot state puts things (shaped like the guest's hil_layout)."""

    ram_size: int
    kernel_start: int
    kernel_end: int
    meta_start: int
    meta_end: int
    kernel_root: int
    kernel_l3_start: int  # 256 consecutive level-3 nodes (kernel half)
    pt_pool_start: int
    pt_pool_end: int
    data_pool_start: int
    data_pool_end: int


def boot_layout(ram_size: int = 64 * MiB) -> BootLayout:
    if ram_size < 16 * MiB or ram_size % (2 * MiB):
        raise ValueError("ram_size must be a multiple of 2 MiB and at least 16 MiB")
    nr_slots = ram_size // PAGE_SIZE
    meta_bytes = align_down(nr_slots * 64 + PAGE_SIZE - 1, PAGE_SIZE)
    meta_start = 4 * MiB
    meta_end = meta_start + meta_bytes
    kernel_root = meta_end
    l3 = kernel_root + PAGE_SIZE
    pt_start = align_down(l3 + 256 * PAGE_SIZE + MiB - 1, MiB)
    pt_end = pt_start + max(2 * MiB, ram_size // 8)
    return BootLayout(
        ram_size=ram_size, kernel_start=1 * MiB, kernel_end=meta_start, meta_start=meta_start,
        meta_end=meta_end, kernel_root=kernel_root, kernel_l3_start=l3, pt_pool_start=pt_start,
        pt_pool_end=pt_end, data_pool_start=pt_end, data_pool_end=ram_size,
    )  # fmt: skip


def _in_use(usage: Usage, tag: StorageTag = StorageTag.UNTYPED, level: int = 0) -> Slot:
    return Slot(rc=1, usage=usage, inl=0, vt=int(usage), sto=(int(tag), level))


def initial_state(ram_size: int = 64 * MiB, *, registry_capacity: int = 0) -> State:
    """A synthetic boot state shaped like the guest's: low 1 MiB reserved, kernel image, the
    metadata array, a kernel root whose entries 256..511 point at 256 level-3 nodes (all rc 1,
    usage Kernel resp. PageTable, never walked), everything else UNUSED."""
    lay = boot_layout(ram_size)
    nr = ram_size // PAGE_SIZE
    slots: dict[int, Slot] = dict.fromkeys(range(nr), UNUSED_SLOT)
    for i in range(0, lay.kernel_start // PAGE_SIZE):
        slots[i] = _in_use(Usage.RESERVED)
    for i in range(lay.kernel_start // PAGE_SIZE, lay.kernel_end // PAGE_SIZE):
        slots[i] = _in_use(Usage.KERNEL)
    for i in range(lay.meta_start // PAGE_SIZE, lay.meta_end // PAGE_SIZE):
        slots[i] = _in_use(Usage.META)
    root_meta = NodeMeta(level=4, nr_children=256, stray=False)
    slots[frame_to_index(lay.kernel_root)] = dataclasses.replace(
        _in_use(Usage.PAGE_TABLE, StorageTag.PT_NODE, 4), node=root_meta
    )
    upper = []
    for k in range(256):
        pa = lay.kernel_l3_start + k * PAGE_SIZE
        slots[frame_to_index(pa)] = dataclasses.replace(
            _in_use(Usage.PAGE_TABLE, StorageTag.PT_NODE, 3), node=NodeMeta(3, 0, False)
        )
        upper.append(pte_new_pt(pa))
    return State(
        slots=SlotTable.of(slots, nr), vm_spaces={}, cursors={}, frames={}, segments={}, uniques={}, leaked={},
        next_ids=dict.fromkeys(ID_KINDS, 1), kernel_root=lay.kernel_root,
        kernel_upper=tuple(upper), nr_slots=nr, registry_capacity=registry_capacity,
    )  # fmt: skip


class PoolAllocator:
    """Page-table node provider mirroring the guest: the lowest-addressed slot of
    [start, end) whose rc is UNUSED in `state` and not yet handed out by this allocator.
    Use one allocator per op (or call `rebase(new_state)` between ops)."""

    def __init__(self, start: int, end: int, state: State) -> None:
        self.start = start
        self.end = end
        self.state = state
        self.handed: list[int] = []

    def rebase(self, state: State) -> None:
        self.state = state
        self.handed = []

    def __call__(self, level: int) -> int:
        for pa in range(self.start, self.end, PAGE_SIZE):
            if pa in self.handed:
                continue
            if self.state.slot_of(pa).rc == REF_COUNT_UNUSED:
                self.handed.append(pa)
                return pa
        raise OutOfMemory(f"no UNUSED slot in [{self.start:#x}, {self.end:#x})")


def step(state: State, op: o.Op, pool: tuple[int, int] | None = None) -> tuple[OpResult, State]:
    """`apply` with a fresh PoolAllocator over `pool` (default: the boot layout's pool)."""
    if pool is None:
        lay = boot_layout(state.nr_slots * PAGE_SIZE)
        pool = (lay.pt_pool_start, lay.pt_pool_end)
    return apply(state, op, PoolAllocator(pool[0], pool[1], state))


# --- the transaction: copy-on-write view of a State -------------------------------------


@dataclass
class _Cur:
    id: int
    vs: int
    mutable: bool
    start: int
    end: int
    va: int
    level: int
    guard_level: int

    def view(self) -> CursorView:
        return CursorView(self.id, self.vs, self.mutable, self.start, self.end, self.va, self.level,
                          self.guard_level)  # fmt: skip


class _Tx:
    def __init__(self, state: State) -> None:
        self.base = state
        self.slot_changes: dict[int, Slot] = {}  # applied to the base's slots at build()
        self.vm_spaces: dict[int, VmSpaceView] = dict(state.vm_spaces)
        self.leaked: dict[int, VmSpaceView] = dict(state.leaked)
        self.nodes: dict[int, dict[int, PageTableNode]] = {}  # vs id -> copied node map
        self.cursors: dict[int, CursorView] = dict(state.cursors)
        self.frames: dict[int, int] = dict(state.frames)
        self.segments: dict[int, tuple[int, int]] = dict(state.segments)
        self.uniques: dict[int, int] = dict(state.uniques)
        self.next_ids: dict[str, int] = {k: state.next_ids.get(k, 1) for k in ID_KINDS}
        self.detached: dict[int, PageTableNode] = {}
        self.cursor_cls: type[_Cursor] = _Cursor  # another exec's cursor mechanics (model/upstream.py)

    def cursor(self, view: CursorView) -> _Cursor:
        return self.cursor_cls(self, view)

    # slots
    def slot(self, index: int) -> Slot:
        found = self.slot_changes.get(index)
        return found if found is not None else self.base.slot(index)

    def put_slot(self, index: int, slot: Slot) -> None:
        if not 0 <= index < self.base.nr_slots:
            raise ValueError(f"slot {index} outside RAM")
        self.slot_changes[index] = slot

    def fresh_id(self, kind: str) -> int:
        value = self.next_ids[kind]
        self.next_ids[kind] = value + 1
        return value

    # trees
    def tree(self, vs: int) -> VmSpaceView:
        return self.vm_spaces[vs] if vs in self.vm_spaces else self.leaked[vs]

    def trees(self) -> Iterable[tuple[int, VmSpaceView]]:
        yield from self.vm_spaces.items()
        yield from self.leaked.items()

    def node_map(self, vs: int) -> dict[int, PageTableNode]:
        if vs not in self.nodes:
            self.nodes[vs] = dict(self.tree(vs).nodes)
        return self.nodes[vs]

    def node(self, vs: int, paddr: int) -> PageTableNode:
        if vs in self.nodes:
            return self.nodes[vs][paddr]
        return self.tree(vs).nodes[paddr]

    def root(self, vs: int) -> PageTableNode:
        return self.node(vs, self.tree(vs).root)

    def set_entry(self, vs: int, node: PageTableNode, index: int, pte: int) -> PageTableNode:
        entries = list(node.entries)
        entries[index] = pte
        new = dataclasses.replace(node, entries=tuple(entries))
        self.node_map(vs)[node.paddr] = new
        return new

    def adjust_children(self, paddr: int, delta: int) -> None:
        s = self.slot(frame_to_index(paddr))
        assert s.node is not None, f"no PT meta at {paddr:#x}"
        meta = dataclasses.replace(s.node, nr_children=s.node.nr_children + delta)
        self.put_slot(frame_to_index(paddr), dataclasses.replace(s, node=meta))

    def leaf_in(self, tree: VmSpaceView, nodes: dict[int, PageTableNode] | None, path: TreePath) -> int | None:
        """The paddr a leaf PTE at `path` in `tree` points to, or None."""
        table = nodes if nodes is not None else tree.nodes
        node = table.get(tree.root)
        for depth, index in enumerate(path):
            if node is None:
                return None
            pte = node.entries[index]
            if not pte_is_present(pte):
                return None
            if depth == len(path) - 1:
                return pte_paddr(pte) if (pte_is_last(pte) or node.level == 1) else None
            if pte_is_last(pte):
                return None
            node = table.get(pte_paddr(pte))
        return None

    # references
    def add_ref(self, paddr: int, path: TreePath) -> None:
        i = frame_to_index(paddr)
        s = self.slot(i)
        self.put_slot(i, dataclasses.replace(s, paths=s.paths | {path}, refs=s.refs + 1))

    def drop_leaf_ref(self, vs: int, paddr: int, path: TreePath) -> None:
        """A leaf PTE at `path` of tree `vs` stopped being walked (already cleared/detached)."""
        i = frame_to_index(paddr)
        s = self.slot(i)
        still = any(other != vs and self.leaf_in(t, self.nodes.get(other), path) == paddr for other, t in self.trees())
        paths = s.paths if still else s.paths - {path}
        self.put_slot(i, dataclasses.replace(s, paths=paths, refs=s.refs - 1))

    def drop_node_ref(self, paddr: int, path: TreePath) -> None:
        i = frame_to_index(paddr)
        s = self.slot(i)
        self.put_slot(i, dataclasses.replace(s, paths=s.paths - {path}, refs=s.refs - 1))

    # frames
    def teardown(self, index: int) -> None:
        """drop_last_in_place: storage zeroed, vt 0, in_list 0, rc UNUSED; ghost usage stays."""
        s = self.slot(index)
        self.put_slot(index, Slot(rc=REF_COUNT_UNUSED, usage=s.usage, inl=0, vt=None, sto=None,
                                  paths=s.paths, refs=s.refs, node=None))  # fmt: skip

    def put_frame(self, paddr: int) -> None:
        """Drop one reference (Frame::drop). The last reference tears the slot down; a page-table
        node's on_drop then drops its children (level 4: user entries only)."""
        i = frame_to_index(paddr)
        s = self.slot(i)
        if s.rc == 1:
            node = self.detached.pop(paddr, None)
            self.teardown(i)
            if node is not None:
                indices = TOP_LEVEL_USER_ENTRIES if node.level == NR_LEVELS else range(NR_ENTRIES)
                for k in indices:
                    pte = node.entries[k]
                    if pte_is_present(pte):
                        self.put_frame(pte_paddr(pte))
        else:
            self.put_slot(i, dataclasses.replace(s, rc=s.rc - 1))

    def alloc_node(self, alloc: Callable[[int], int], vs: int, parent: PageTableNode, index: int) -> PageTableNode:
        level = parent.level - 1
        try:
            paddr = alloc(level)
        except OutOfMemory as exc:
            raise _Panic(PanicCode.OUT_OF_MEMORY) from exc
        i = frame_to_index(paddr)
        if paddr % PAGE_SIZE or not 0 <= i < self.base.nr_slots or self.slot(i).rc != REF_COUNT_UNUSED:
            raise ValueError(f"allocator returned {paddr:#x}, not an UNUSED RAM slot")
        path = parent.path + (index,)
        s = self.slot(i)
        self.put_slot(i, Slot(rc=1, usage=Usage.PAGE_TABLE, inl=0, vt=int(Usage.PAGE_TABLE),
                              sto=(int(StorageTag.PT_NODE), level), paths=s.paths | {path}, refs=s.refs + 1,
                              node=NodeMeta(level, 0, False)))  # fmt: skip
        child = PageTableNode(paddr, level, path, (0,) * NR_ENTRIES)
        self.node_map(vs)[paddr] = child
        self.set_entry(vs, parent, index, pte_new_pt(paddr))
        self.adjust_children(parent.paddr, +1)
        return child

    def build(self) -> State:
        vm_spaces = {
            k: (dataclasses.replace(v, nodes=self.nodes[k]) if k in self.nodes else v)
            for k, v in self.vm_spaces.items()
        }
        leaked = {
            k: (dataclasses.replace(v, nodes=self.nodes[k]) if k in self.nodes else v) for k, v in self.leaked.items()
        }
        return dataclasses.replace(
            self.base, slots=with_slot_changes(self.base.slots, self.slot_changes), vm_spaces=vm_spaces,
            leaked=leaked, cursors=self.cursors, frames=self.frames, segments=self.segments, uniques=self.uniques,
            next_ids=self.next_ids, parent=self.base, changed=frozenset(self.slot_changes),
        )  # fmt: skip


# --- cursor mechanics (§5.3) ---------------------------------------------------------------


class _Cursor:
    """A live cursor bound to a transaction: va, level and the derived path."""

    def __init__(self, tx: _Tx, view: CursorView) -> None:
        self.tx = tx
        self.c = _Cur(view.id, view.vs, view.mutable, view.start, view.end, view.va, view.level,
                      view.guard_level)  # fmt: skip

    def save(self) -> None:
        self.tx.cursors[self.c.id] = self.c.view()
        vs = self.tx.vm_spaces[self.c.vs]
        if vs.cursor != self.c.id:
            self.tx.vm_spaces[self.c.vs] = vs.with_cursor(self.c.id)

    def node(self, level: int | None = None) -> PageTableNode:
        """path[level-1]: the node of `level` on the walk of va."""
        want = self.c.level if level is None else level
        node = self.tx.root(self.c.vs)
        for lv in range(NR_LEVELS, want, -1):
            pte = node.entries[_index(self.c.va, lv)]
            assert pte_is_present(pte) and not pte_is_last(pte), "cursor path broken"
            node = self.tx.node(self.c.vs, pte_paddr(pte))
        return node

    def entry(self) -> int:
        return self.node().entries[_index(self.c.va, self.c.level)]

    def va_range(self) -> tuple[int, int]:
        start = align_down(self.c.va, page_size(self.c.level))
        return start, start + page_size(self.c.level)

    def move_forward(self) -> None:
        nxt = self.va_range()[1]
        while self.c.level < self.c.guard_level and _index(nxt, self.c.level) == 0:
            self.c.level += 1
        self.c.va = nxt

    def skip_absent(self, entries: tuple[int, ...], end: int) -> None:
        """`move_forward` from the absent entry at va, repeated while the entry reached is absent,
        in this node and below `end`: what find_next_impl's loop does one entry at a time (each
        step a walk from the root: a sparse 512-entry node cost ~1 ms of the checked run's model).
        The steps before the last stay inside the node, so only the last can pop a level."""
        level = self.c.level
        size = page_size(level)
        start = align_down(self.c.va, size)
        i = _index(self.c.va, level)
        nxt = next((j for j in range(i + 1, NR_ENTRIES) if entries[j] & PTE_PRESENT_BITS), NR_ENTRIES)
        steps = min(nxt - i, -(-(end - start) // size))
        self.c.va = start + (steps - 1) * size
        self.move_forward()

    def find_next_impl(self, length: int, unmap_subtree: bool, split_huge: bool) -> int | None:
        end = self.c.va + length
        while self.c.va < end:
            level = self.c.level
            entries = self.node().entries
            pte = entries[_index(self.c.va, level)]
            if not pte_is_present(pte):
                self.skip_absent(entries, end)
                continue
            if pte_is_last(pte) or level == 1:
                start, stop = self.va_range()
                if (self.c.va == start and stop <= end) or not split_huge:
                    return self.c.va
                raise AssertionError("huge leaf in a user page table (split unreachable)")
            start, stop = self.va_range()
            if unmap_subtree and self.c.va == start and stop <= end:  # TOP_LEVEL_CAN_UNMAP
                return self.c.va
            child = self.tx.slot(frame_to_index(pte_paddr(pte)))
            if child.node is not None and child.node.nr_children != 0:
                self.c.level -= 1  # push_level
            else:
                self.move_forward()
        return None


def _index(va: int, level: int) -> int:
    return (va >> (12 + 9 * (level - 1))) & (NR_ENTRIES - 1)


# --- validation helpers -------------------------------------------------------------------


def _registry_room(state: State, needed: int) -> None:
    if state.registry_capacity <= 0:
        return
    used = 1 + len(state.frames) + len(state.segments) + len(state.uniques) + len(state.vm_spaces)
    used += len(state.cursors) + len(state.leaked)
    if used + needed > state.registry_capacity:
        raise _Err(ErrorCode.NO_SPACE)


def _get_slot(state: State, paddr: int) -> int:
    if paddr % PAGE_SIZE:
        raise _Err(ErrorCode.NOT_ALIGNED)
    if paddr >= min(MAX_PADDR, state.nr_slots * PAGE_SIZE):
        raise _Err(ErrorCode.OUT_OF_BOUND)
    return frame_to_index(paddr)


def prop_ok(prop: PageProperty) -> bool:
    """docs/semantics.md validation 3: known bits, R set, cache code <= 4."""
    return prop.inv() and bool(prop.flags & 0x01) and int(prop.cache) <= 4


def _cursor(state: State, cid: int, *, mutable: bool = False) -> CursorView:
    c = state.cursors.get(cid)
    if c is None or cid == 0:
        raise _Err(ErrorCode.BAD_ID)
    if mutable and not c.mutable:
        raise _Err(ErrorCode.WRONG_KIND)
    return c


def _live(mapping: Mapping[int, object], key: int) -> None:
    if key == 0 or key not in mapping:
        raise _Err(ErrorCode.BAD_ID)


def _is_uframe(tx: _Tx, paddr: int) -> bool:
    """A frame handle is a UFrame iff its slot's metadata is untyped (a data frame, vt Frame).
    The guest types the handle when it is made (registry w1); a live handle holds a reference,
    so the slot cannot be torn down and retyped meanwhile: the two agree."""
    return tx.slot(frame_to_index(paddr)).vt == int(Usage.FRAME)


def _nav_panics(c: CursorView, length: int) -> None:
    if length % PAGE_SIZE:
        raise _Panic(PanicCode.FIND_NEXT_LEN_UNALIGNED)
    if c.va + length > c.end:
        raise _Panic(PanicCode.FIND_NEXT_PAST_BARRIER)


def _fresh_slot(usage: Usage, rc: int, old: Slot) -> Slot:
    return Slot(rc=rc, usage=usage, inl=0, vt=int(usage), sto=(int(StorageTag.UNTYPED), 0),
                paths=old.paths, refs=old.refs, node=None)  # fmt: skip


def _from_unused_error(rc: int) -> ErrorCode:
    if rc == REF_COUNT_UNIQUE:
        return ErrorCode.UNIQUE
    if rc == 0:
        return ErrorCode.BUSY
    return ErrorCode.IN_USE


# --- apply ----------------------------------------------------------------------------------


def apply(
    state: State, op: o.Op, alloc: Callable[[int], int], handlers: Mapping[type[o.Op], Handler] | None = None,
    cursor_cls: type[_Cursor] | None = None,
) -> tuple[OpResult, State]:
    """Run `op` on `state` with the exec semantics; pure. ERR: nothing changes (a copy with
    `changed` empty). PANIC: the state as exec leaves it at the panic point. `handlers`: another
    exec's handler table and cursor mechanics (model/upstream.py); default vostd's."""
    tx = _Tx(state)
    if cursor_cls is not None:
        tx.cursor_cls = cursor_cls
    handler = (_HANDLERS if handlers is None else handlers).get(type(op))
    if handler is None:
        if isinstance(op, (o.Probe, o.RaiseFault)):
            raise Unpredictable(f"{type(op).__name__} is not predicted by the model")
        return OpResult.err(ErrorCode.UNKNOWN_OP), _unchanged(state)
    try:
        result = handler(tx, op, alloc)
    except _Err as err:
        return OpResult.err(err.code), _unchanged(state)
    except _Panic as panic:
        return OpResult.panic(panic.code), tx.build()
    return result, tx.build()


def _unchanged(state: State) -> State:
    return dataclasses.replace(state, parent=state, changed=frozenset())


def _ok(op: o.Op, **values: int) -> OpResult:
    """OK with every result word of the op, in RESULTS order (absent words are 0)."""
    return OpResult(o.Status.OK, 0, tuple((name, int(values.get(name, 0))) for name in op.RESULTS))


Handler = Callable[[_Tx, o.Op, Callable[[int], int]], OpResult]
_HANDLERS: dict[type[o.Op], Handler] = {}


def _handles(cls: type[o.Op]) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        _HANDLERS[cls] = fn
        return fn

    return deco


@_handles(o.Nop)
def _nop(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.Nop)
    return _ok(op, value=op.value)


@_handles(o.Activate)
def _activate(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.Activate)
    if op.vs != 0:
        _live(tx.vm_spaces, op.vs)
    return _ok(op)


@_handles(o.NewVmSpace)
def _new_vm_space(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    _registry_room(tx.base, 1)
    try:
        root = alloc(NR_LEVELS)
    except OutOfMemory as exc:
        raise _Panic(PanicCode.OUT_OF_MEMORY) from exc
    i = frame_to_index(root)
    if root % PAGE_SIZE or not 0 <= i < tx.base.nr_slots or tx.slot(i).rc != REF_COUNT_UNUSED:
        raise ValueError(f"allocator returned {root:#x}, not an UNUSED RAM slot")
    s = tx.slot(i)
    root_slot = Slot(rc=1, usage=Usage.PAGE_TABLE, inl=0, vt=int(Usage.PAGE_TABLE),
                     sto=(int(StorageTag.PT_NODE), NR_LEVELS), paths=s.paths, refs=s.refs,
                     node=NodeMeta(NR_LEVELS, 0, False))  # fmt: skip
    tx.put_slot(i, root_slot)
    entries = [0] * NR_ENTRIES
    upper = tuple(tx.base.kernel_upper) + (0,) * (256 - len(tx.base.kernel_upper))
    for k, pte in zip(TOP_LEVEL_KERNEL_ENTRIES, upper, strict=True):
        if not pte_is_present(pte) or pte_is_last(pte):
            raise _Panic(PanicCode.KERNEL_ROOT_ENTRY)  # the root stays allocated, no VmSpace
        entries[k] = pte
    tx.put_slot(i, dataclasses.replace(root_slot, paths=root_slot.paths | {()}))
    vs = tx.fresh_id("vm_space")
    tx.vm_spaces[vs] = VmSpaceView(vs, root, {root: PageTableNode(root, NR_LEVELS, (), tuple(entries))}, 0)
    return _ok(op, vs=vs, root=root)


@_handles(o.DropVmSpace)
def _drop_vm_space(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.DropVmSpace)
    _live(tx.vm_spaces, op.vs)
    view = tx.vm_spaces[op.vs]
    if view.cursor:
        raise _Err(ErrorCode.VM_SPACE_BUSY)
    # Dropping the VmSpace drops its root PageTableNode (a Frame): the tree stops being
    # walked (every path of its nodes and leaves goes), then the root loses its reference;
    # at the last one PageTablePageMeta::on_drop drops the children of entries 0..255
    # recursively (put_frame over the detached nodes): each node's slot to UNUSED, each mapped
    # frame rc - 1 per PTE (docs/semantics.md "VmSpace").
    root = tx.root(op.vs)
    i = frame_to_index(root.paddr)
    s = tx.slot(i)
    tx.put_slot(i, dataclasses.replace(s, paths=s.paths - {()}))
    tx.detached[root.paddr] = root
    for k in TOP_LEVEL_USER_ENTRIES:
        pte = root.entries[k]
        if pte_is_present(pte):
            _detach(tx, op.vs, pte_paddr(pte), stray=False)
    del tx.vm_spaces[op.vs]
    tx.nodes.pop(op.vs, None)
    tx.put_frame(root.paddr)
    return _ok(op)


@_handles(o.OpenCursor)
@_handles(o.OpenCursorMut)
def _open_cursor(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, (o.OpenCursor, o.OpenCursorMut))
    _live(tx.vm_spaces, op.vs)
    view = tx.vm_spaces[op.vs]
    if view.cursor:
        raise _Err(ErrorCode.CURSOR_BUSY)
    _registry_room(tx.base, 1)
    if not (op.start < op.end and op.start % PAGE_SIZE == 0 and op.end % PAGE_SIZE == 0 and op.end <= USER_VA_END):
        raise _Err(ErrorCode.ACCESS_DENIED)
    cid = tx.fresh_id("cursor")
    tx.cursors[cid] = CursorView(cid, op.vs, isinstance(op, o.OpenCursorMut), op.start, op.end, op.start,
                                 NR_LEVELS, NR_LEVELS)  # fmt: skip
    tx.vm_spaces[op.vs] = view.with_cursor(cid)
    return _ok(op, cursor=cid)


@_handles(o.DropCursor)
def _drop_cursor(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.DropCursor)
    c = _cursor(tx.base, op.cursor)
    del tx.cursors[op.cursor]
    view = tx.vm_spaces.get(c.vs)
    if view is not None and view.cursor == op.cursor:
        tx.vm_spaces[c.vs] = view.with_cursor(0)
    return _ok(op)


@_handles(o.VirtAddr)
def _virt_addr(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.VirtAddr)
    return _ok(op, va=_cursor(tx.base, op.cursor).va)


@_handles(o.Query)
def _query(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.Query)
    view = _cursor(tx.base, op.cursor)
    _registry_room(tx.base, 1)
    if view.va >= view.end:
        raise _Err(ErrorCode.INVALID_VADDR)
    cur = tx.cursor(view)
    try:
        while True:
            pte = cur.entry()
            if not pte_is_present(pte):
                start, end = cur.va_range()
                return _ok(op, present=0, start=start, end=end)
            if pte_is_last(pte) or cur.c.level == 1:
                paddr = pte_paddr(pte)
                i = frame_to_index(paddr)
                s = tx.slot(i)
                if s.rc >= REF_COUNT_MAX:
                    raise _Panic(PanicCode.REF_COUNT_OVERFLOW)
                tx.put_slot(i, dataclasses.replace(s, rc=s.rc + 1))
                fid = tx.fresh_id("frame")
                tx.frames[fid] = paddr
                start, end = cur.va_range()
                prop = pte_prop(pte)
                return _ok(op, present=1, start=start, end=end, paddr=paddr, prop=prop.encode(), frame=fid)
            cur.c.level -= 1
    finally:
        cur.save()


@_handles(o.FindNext)
def _find_next(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.FindNext)
    view = _cursor(tx.base, op.cursor)
    _nav_panics(view, op.len)
    cur = tx.cursor(view)
    found = cur.find_next_impl(op.len, False, False)
    cur.save()
    if found is None:
        return _ok(op, found=0, va=0)
    return _ok(op, found=1, va=found)


@_handles(o.Jump)
def _jump(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.Jump)
    view = _cursor(tx.base, op.cursor)
    if op.va % PAGE_SIZE:
        raise _Panic(PanicCode.JUMP_UNALIGNED)
    if not view.start <= op.va < view.end:
        raise _Err(ErrorCode.INVALID_VADDR)
    cur = tx.cursor(view)
    while True:
        span = page_size(cur.c.level + 1)
        node_start = align_down(cur.c.va, span)
        if cur.c.level <= cur.c.guard_level and node_start <= op.va < node_start + span:
            cur.c.va = op.va
            break
        cur.c.level += 1
    cur.save()
    return _ok(op)


@_handles(o.Map)
def _map(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.Map)
    view = _cursor(tx.base, op.cursor)
    _live(tx.frames, op.frame)
    view = _cursor(tx.base, op.cursor, mutable=True)
    if not _is_uframe(tx, tx.frames[op.frame]):
        raise _Err(ErrorCode.NOT_UFRAME)
    if not prop_ok(op.prop):
        raise _Err(ErrorCode.BAD_ARG)
    if view.va >= view.end or view.va + PAGE_SIZE > view.end:
        raise _Panic(PanicCode.MAP_OUT_OF_RANGE)
    paddr = tx.frames.pop(op.frame)  # item_into_raw: the handle's reference moves to the PTE
    cur = tx.cursor(view)
    try:
        while cur.c.level != 1:  # map_loop(1)
            node = cur.node()
            pte = node.entries[_index(cur.c.va, cur.c.level)]
            if not pte_is_present(pte):
                tx.alloc_node(alloc, view.vs, node, _index(cur.c.va, cur.c.level))
            elif pte_is_last(pte):
                raise AssertionError("huge leaf in a user page table (split unreachable)")
            cur.c.level -= 1
        if op.prop.cache in UNSUPPORTED_CACHES:  # new_page -> set_prop, after map_loop
            raise _Panic(PanicCode.UNSUPPORTED_CACHE)
        node = cur.node()
        k = _index(cur.c.va, 1)
        old = node.entries[k]
        path = node.path + (k,)
        tx.set_entry(view.vs, node, k, pte_new_page(paddr, op.prop))
        replaced = 0
        old_paddr = 0
        if pte_is_present(old):
            replaced = 1
            old_paddr = pte_paddr(old)
            tx.drop_leaf_ref(view.vs, old_paddr, path)
        else:
            tx.adjust_children(node.paddr, +1)
        tx.add_ref(paddr, path)
        cur.move_forward()
        if replaced:  # dispatch_tlb_flush drops the old frame
            tx.put_frame(old_paddr)
        return _ok(op, replaced=replaced, old_paddr=old_paddr)
    finally:
        cur.save()


@_handles(o.Unmap)
def _unmap(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.Unmap)
    view = _cursor(tx.base, op.cursor, mutable=True)
    _nav_panics(view, op.len)
    cur = tx.cursor(view)
    end = view.va + op.len
    num = 0
    deferred: list[int] = []
    while cur.c.va < end:
        found = cur.find_next_impl(end - cur.c.va, True, True)
        if found is None:
            break
        node = cur.node()
        k = _index(cur.c.va, cur.c.level)
        pte = node.entries[k]
        tx.set_entry(view.vs, node, k, 0)
        tx.adjust_children(node.paddr, -1)
        target = pte_paddr(pte)
        if pte_is_last(pte) or node.level == 1:
            tx.drop_leaf_ref(view.vs, target, node.path + (k,))
            num += 1
        else:
            num += _detach(tx, view.vs, target)
        deferred.append(target)
        cur.move_forward()
    cur.save()
    for paddr in deferred:  # dispatch_tlb_flush: drop the kept frames and stray page tables
        tx.put_frame(paddr)
    return _ok(op, num=num)


def _detach(tx: _Tx, vs: int, paddr: int, *, stray: bool = True) -> int:
    """Take the subtree rooted at node `paddr` out of tree `vs`: mark it stray (unmap's
    dfs_mark_stray; not on a VmSpace drop), stop walking it (paths of its nodes and leaves go).
    Returns the number of mapped frames in it."""
    nodes = tx.node_map(vs)
    node = nodes.pop(paddr)
    tx.detached[paddr] = node
    i = frame_to_index(paddr)
    s = tx.slot(i)
    if stray:
        meta = dataclasses.replace(s.node, stray=True) if s.node is not None else None
        tx.put_slot(i, dataclasses.replace(s, node=meta))
    tx.drop_node_ref(paddr, node.path)
    count = 0
    for k, pte in enumerate(node.entries):
        if not pte_is_present(pte):
            continue
        if pte_is_last(pte) or node.level == 1:
            tx.drop_leaf_ref(vs, pte_paddr(pte), node.path + (k,))
            count += 1
        else:
            count += _detach(tx, vs, pte_paddr(pte), stray=stray)
    return count


@_handles(o.ProtectNext)
def _protect_next(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.ProtectNext)
    view = _cursor(tx.base, op.cursor, mutable=True)
    if not op.transform.valid():
        raise _Err(ErrorCode.BAD_ARG)
    _nav_panics(view, op.len)
    cur = tx.cursor(view)
    try:
        found = cur.find_next_impl(op.len, False, True)
        if found is None:
            return _ok(op, found=0)
        node = cur.node()
        k = _index(cur.c.va, cur.c.level)
        pte = node.entries[k]
        new = op.transform.apply(pte_prop(pte))
        if new.cache in UNSUPPORTED_CACHES:
            raise _Panic(PanicCode.UNSUPPORTED_CACHE)
        tx.set_entry(view.vs, node, k, pte_set_prop(pte, new))
        start, end = cur.va_range()
        cur.move_forward()
        return _ok(op, found=1, start=start, end=end)
    finally:
        cur.save()


# --- frames, segments, unique frames ------------------------------------------------------


@_handles(o.FrameFromUnused)
def _frame_from_unused(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.FrameFromUnused)
    _registry_room(tx.base, 1)
    i = _get_slot(tx.base, op.paddr)
    s = tx.slot(i)
    if s.rc != REF_COUNT_UNUSED:
        raise _Err(_from_unused_error(s.rc))
    tx.put_slot(i, _fresh_slot(Usage.FRAME, 1, s))
    fid = tx.fresh_id("frame")
    tx.frames[fid] = op.paddr
    return _ok(op, frame=fid)


@_handles(o.FrameFromInUse)
def _frame_from_in_use(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.FrameFromInUse)
    _registry_room(tx.base, 1)
    i = _get_slot(tx.base, op.paddr)
    s = tx.slot(i)
    if s.rc == REF_COUNT_UNUSED:
        raise _Err(ErrorCode.UNUSED)
    if s.rc == REF_COUNT_UNIQUE:
        raise _Err(ErrorCode.UNIQUE)
    if s.rc == 0:
        raise _Err(ErrorCode.BUSY)
    if s.rc >= REF_COUNT_MAX:
        raise _Panic(PanicCode.REF_COUNT_OVERFLOW)
    tx.put_slot(i, dataclasses.replace(s, rc=s.rc + 1))
    fid = tx.fresh_id("frame")
    tx.frames[fid] = op.paddr
    return _ok(op, frame=fid)


@_handles(o.FrameDrop)
def _frame_drop(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.FrameDrop)
    _live(tx.frames, op.frame)
    paddr = tx.frames.pop(op.frame)
    _drop_ref(tx, paddr)
    return _ok(op)


def _drop_ref(tx: _Tx, paddr: int) -> None:
    """A handle's reference goes (Frame/Segment drop): rc - 1, tear down at 1. A page-table
    node's children are not dropped by a handle drop (the guest's FrameDrop does not know the
    slot's type), only by the unmap path."""
    i = frame_to_index(paddr)
    s = tx.slot(i)
    if s.rc == 1:
        tx.teardown(i)
    else:
        tx.put_slot(i, dataclasses.replace(s, rc=s.rc - 1))


@_handles(o.SegmentFromUnused)
def _segment_from_unused(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.SegmentFromUnused)
    if op.start >= op.end:
        raise _Err(ErrorCode.BAD_ARG)
    _registry_room(tx.base, 1)
    if op.start % PAGE_SIZE or op.end % PAGE_SIZE:
        raise _Err(ErrorCode.NOT_ALIGNED)
    if op.end > min(MAX_PADDR, tx.base.nr_slots * PAGE_SIZE):
        raise _Err(ErrorCode.OUT_OF_BOUND)
    for pa in range(op.start, op.end, PAGE_SIZE):
        s = tx.slot(frame_to_index(pa))
        if s.rc != REF_COUNT_UNUSED:
            raise _Err(_from_unused_error(s.rc))  # pages taken so far are released: net no change
    for pa in range(op.start, op.end, PAGE_SIZE):
        i = frame_to_index(pa)
        tx.put_slot(i, _fresh_slot(Usage.FRAME, 1, tx.slot(i)))
    sid = tx.fresh_id("segment")
    tx.segments[sid] = (op.start, op.end)
    return _ok(op, segment=sid)


@_handles(o.SegmentDrop)
def _segment_drop(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.SegmentDrop)
    _live(tx.segments, op.segment)
    start, end = tx.segments.pop(op.segment)
    for pa in range(start, end, PAGE_SIZE):
        _drop_ref(tx, pa)
    return _ok(op)


@_handles(o.SegmentSplit)
def _segment_split(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.SegmentSplit)
    _live(tx.segments, op.segment)
    start, end = tx.segments[op.segment]
    if op.offset % PAGE_SIZE or not 0 < op.offset < end - start:
        raise _Err(ErrorCode.BAD_ARG)
    _registry_room(tx.base, 2)
    del tx.segments[op.segment]
    left = tx.fresh_id("segment")
    right = tx.fresh_id("segment")
    tx.segments[left] = (start, start + op.offset)
    tx.segments[right] = (start + op.offset, end)
    return _ok(op, left=left, right=right)


@_handles(o.SegmentNext)
def _segment_next(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.SegmentNext)
    _live(tx.segments, op.segment)
    _registry_room(tx.base, 1)
    start, end = tx.segments[op.segment]
    if start + PAGE_SIZE >= end:
        del tx.segments[op.segment]
    else:
        tx.segments[op.segment] = (start + PAGE_SIZE, end)
    fid = tx.fresh_id("frame")
    tx.frames[fid] = start
    return _ok(op, frame=fid)


def _clone_range(tx: _Tx, start: int, end: int) -> None:
    for pa in range(start, end, PAGE_SIZE):
        if tx.slot(frame_to_index(pa)).rc >= REF_COUNT_MAX:
            raise _Panic(PanicCode.REF_COUNT_OVERFLOW)
    for pa in range(start, end, PAGE_SIZE):
        i = frame_to_index(pa)
        s = tx.slot(i)
        tx.put_slot(i, dataclasses.replace(s, rc=s.rc + 1))


@_handles(o.SegmentClone)
def _segment_clone(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.SegmentClone)
    _live(tx.segments, op.segment)
    _registry_room(tx.base, 1)
    start, end = tx.segments[op.segment]
    _clone_range(tx, start, end)
    sid = tx.fresh_id("segment")
    tx.segments[sid] = (start, end)
    return _ok(op, segment=sid)


@_handles(o.SegmentSlice)
def _segment_slice(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.SegmentSlice)
    _live(tx.segments, op.segment)
    start, end = tx.segments[op.segment]
    if op.start % PAGE_SIZE or op.end % PAGE_SIZE or op.start >= op.end or op.end > end - start:
        raise _Err(ErrorCode.BAD_ARG)
    _registry_room(tx.base, 1)
    _clone_range(tx, start + op.start, start + op.end)
    sid = tx.fresh_id("segment")
    tx.segments[sid] = (start + op.start, start + op.end)
    return _ok(op, segment=sid)


@_handles(o.UniqueFromUnused)
def _unique_from_unused(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.UniqueFromUnused)
    _registry_room(tx.base, 1)
    i = _get_slot(tx.base, op.paddr)
    s = tx.slot(i)
    if s.rc != REF_COUNT_UNUSED:
        raise _Err(_from_unused_error(s.rc))
    tx.put_slot(i, _fresh_slot(Usage.FRAME, REF_COUNT_UNIQUE, s))
    uid = tx.fresh_id("unique")
    tx.uniques[uid] = op.paddr
    return _ok(op, unique=uid)


@_handles(o.UniqueDrop)
def _unique_drop(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.UniqueDrop)
    _live(tx.uniques, op.unique)
    paddr = tx.uniques.pop(op.unique)
    tx.teardown(frame_to_index(paddr))
    return _ok(op)


@_handles(o.FromUnique)
def _from_unique(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.FromUnique)
    _live(tx.uniques, op.unique)
    _registry_room(tx.base, 1)
    paddr = tx.uniques.pop(op.unique)
    i = frame_to_index(paddr)
    tx.put_slot(i, dataclasses.replace(tx.slot(i), rc=1))
    fid = tx.fresh_id("frame")
    tx.frames[fid] = paddr
    return _ok(op, frame=fid)


@_handles(o.TryFromShared)
def _try_from_shared(tx: _Tx, op: o.Op, alloc: Callable[[int], int]) -> OpResult:
    assert isinstance(op, o.TryFromShared)
    _live(tx.frames, op.frame)
    _registry_room(tx.base, 1)
    paddr = tx.frames[op.frame]
    i = frame_to_index(paddr)
    s = tx.slot(i)
    if s.rc != 1:
        return _ok(op, ok=0)
    tx.put_slot(i, dataclasses.replace(s, rc=REF_COUNT_UNIQUE))
    del tx.frames[op.frame]
    uid = tx.fresh_id("unique")
    tx.uniques[uid] = paddr
    return _ok(op, ok=1, unique=uid)
