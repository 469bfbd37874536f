"""Guest memory -> `model.state.State`: page-table walker, metadata decoder, registry reader,
and QEMU `info tlb` / `info mem` parsers for the QEMU oracle.

The x86-64 walker is written from the Intel SDM (Vol. 3A §4.5, 4-level paging), *not* from
`model.types` (the OSTD encoder), so a mistake in one shows up against the other.

Virtual-address layout (4-level paging, 48-bit canonical addresses)::

     63        48 47     39 38     30 29     21 20     12 11          0
    +------------+---------+---------+---------+---------+-------------+
    | sign ext.  |  PML4   |  PDPT   |   PD    |   PT    |   offset    |
    | of bit 47  | level 4 | level 3 | level 2 | level 1 |             |
    +------------+---------+---------+---------+---------+-------------+

Two views of one entry (the difference matters for OSTD leaves with the R flag cleared):

* MMU view (`decode_pte`, `translate`, `leaf_mappings`, `info tlb`): an entry is present iff
  P (bit 0); it maps a page iff present and at level 1, or at level 2/3 with PS (bit 7).
  Bit 7 of a level-1 entry is PAT, not "huge"; bit 7 of a PML4E is reserved (fault).
* OSTD view (`ostd_present`, `ostd_leaf`, `ostd_leaves`; what the spec's paths_in_pt and the
  State speak about): present iff bit 0 or bit 7 (OSTD's `is_present`); a leaf iff present
  and (bit 7 or level 1). OSTD sets bit 7 on every leaf, so a leaf whose R (= P) was cleared by
  protect_next is present to OSTD but not to the MMU.

Both views descend into the same child tables (bit 0 set, bit 7 clear, level > 1), so the set
of page-table nodes (`walk_tree`) is view-independent.

Anomalies: the walker never drops a subtree silently. A table pointer outside RAM, a node
reached twice in one tree (a loop or two parents), reserved bits the MMU would fault on, a PTE
whose target has no metadata slot, a malformed registry entry or slot type word: each becomes
an `Anomaly` in the result (`TreeWalk.anomalies`, `State.anomalies`) so the checker can report
it as a finding. Functions that return a plain list take an `anomalies` list to append to;
without one they raise `WalkError` when there is something to report.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hil.errors import AbiError, HilError
from hil.target import abi
from hil.target.memory import PhysMemory
from model.state import CursorView, Mapping_, NodeMeta, PageTableNode, Slot, SlotTable, State, TreePath, VmSpaceView
from model.types import PAGE_SIZE, REF_COUNT_UNUSED, StorageTag, Usage

# --- x86-64 PTE bits (Intel SDM Vol. 3A, Tables 4-15 .. 4-20) ----------------------------
BIT_P = 1 << 0  # present
BIT_RW = 1 << 1  # read/write: writes allowed only if set at every level
BIT_US = 1 << 2  # user/supervisor: user access only if set at every level
BIT_PWT = 1 << 3  # page-level write-through
BIT_PCD = 1 << 4  # page-level cache disable
BIT_A = 1 << 5  # accessed (set by the MMU)
BIT_D = 1 << 6  # dirty (set by the MMU; leaves only, ignored in table entries)
BIT_7 = 1 << 7  # PS at PDPTE/PDE (1 GiB / 2 MiB page); PAT at PTE; reserved in a PML4E
BIT_G = 1 << 8  # global (leaves only, CR4.PGE)
BIT_PAT_LARGE = 1 << 12  # PAT of a 1 GiB / 2 MiB leaf
BIT_NX = 1 << 63  # execute-disable (EFER.NXE)
ADDR_MASK = ((1 << 52) - 1) & ~0xFFF  # bits 12..51 (MAXPHYADDR <= 52)
AD_BITS = BIT_A | BIT_D  # hardware-set bits masked in PageTableNode entries (spec §5.12)

LEVELS = 4
ENTRIES = 512
USER_ROOT_ENTRIES = range(0, 256)  # OSTD UserPtConfig::TOP_LEVEL_INDEX_RANGE
KERNEL_ROOT_ENTRIES = range(256, 512)
VA_BITS = 48
_U64 = (1 << 64) - 1
_NODE = struct.Struct(f"<{ENTRIES}Q")


def level_size(level: int) -> int:
    """Bytes covered by one entry of a level-`level` table: 4 KiB, 2 MiB, 1 GiB, 512 GiB."""
    return 1 << (12 + 9 * (level - 1))


def va_index(va: int, level: int) -> int:
    return (va >> (12 + 9 * (level - 1))) & (ENTRIES - 1)


def is_canonical(va: int) -> bool:
    """Bits 63..47 all equal (48-bit linear addresses)."""
    top = va >> (VA_BITS - 1)
    return 0 <= va <= _U64 and top in (0, (1 << (64 - VA_BITS + 1)) - 1)


def canonical(va48: int) -> int:
    """Sign-extend bit 47 of a 48-bit address into bits 63..48."""
    va48 &= (1 << VA_BITS) - 1
    return va48 | (_U64 & ~((1 << VA_BITS) - 1)) if va48 >> (VA_BITS - 1) else va48


class WalkError(HilError):
    """A walk found something it must not drop and the caller gave no anomaly list."""


class NonCanonicalAddress(ValueError):
    def __init__(self, va: int):
        self.va = va
        super().__init__(f"non-canonical virtual address {va:#x}: bits 63..47 must all equal bit 47")


# --- one entry --------------------------------------------------------------------------
@dataclass(frozen=True)
class Pte:
    """One entry decoded per the SDM for a table of `level` (MMU view)."""

    level: int
    raw: int
    p: bool
    rw: bool
    us: bool
    pwt: bool
    pcd: bool
    a: bool
    d: bool
    bit7: bool  # raw bit 7: PS at level 2/3, PAT at level 1, reserved at level 4
    g: bool
    nx: bool
    ps: bool  # page size: bit 7 at level 2 or 3
    pat: bool  # PAT bit of a leaf (bit 7 at level 1, bit 12 at level 2/3)
    leaf: bool  # maps a page for the MMU (present and level 1, or PS)
    addr: int  # leaf: the frame, aligned to the page size; table: the next table's paddr
    size: int  # leaf: page size in bytes; else 0
    reserved: str | None  # why the MMU raises a reserved-bit fault on this entry, if it does

    def flags(self) -> str:
        names = (
            ("P", self.p), ("RW", self.rw), ("US", self.us), ("PWT", self.pwt), ("PCD", self.pcd),
            ("A", self.a), ("D", self.d), ("PS", self.ps), ("PAT", self.pat), ("G", self.g),
            ("NX", self.nx),
        )  # fmt: skip
        return " ".join(n for n, on in names if on) or "-"

    def __str__(self) -> str:
        return f"L{self.level} {self.raw:#018x} [{self.flags()}] addr={self.addr:#x}"


def decode_pte(raw: int, level: int) -> Pte:
    if not 1 <= level <= LEVELS:
        raise ValueError(f"level {level} is not 1..{LEVELS}")
    p = bool(raw & BIT_P)
    bit7 = bool(raw & BIT_7)
    ps = bit7 and level in (2, 3)
    leaf = p and (level == 1 or ps)
    reserved: str | None = None
    if leaf and level > 1:
        size = level_size(level)
        addr = raw & ADDR_MASK & ~(size - 1)
        pat = bool(raw & BIT_PAT_LARGE)
        low = raw & ADDR_MASK & (size - 1) & ~BIT_PAT_LARGE  # bits 13..20 / 13..29 must be 0
        if p and low:
            reserved = f"{size >> 20} MiB page with address bits {low:#x} below its alignment"
    elif leaf:
        size = PAGE_SIZE
        addr = raw & ADDR_MASK
        pat = bit7
    else:
        size = 0
        addr = raw & ADDR_MASK
        pat = False
        if p and level == 4 and bit7:
            reserved = "PS (bit 7) set in a PML4E"
    return Pte(
        level, raw, p, bool(raw & BIT_RW), bool(raw & BIT_US), bool(raw & BIT_PWT),
        bool(raw & BIT_PCD), bool(raw & BIT_A), bool(raw & BIT_D), bit7, bool(raw & BIT_G),
        bool(raw & BIT_NX), ps, pat, leaf, addr, size, reserved,
    )  # fmt: skip


def descends(raw: int, level: int) -> bool:
    """The entry points to a next-level table, in both views: bit 0 set, bit 7 clear."""
    return level > 1 and bool(raw & BIT_P) and not raw & BIT_7


# --- OSTD view --------------------------------------------------------------------------
def ostd_present(raw: int) -> bool:
    """OSTD's `is_present`: bit 0 or bit 7 (a leaf with R cleared keeps bit 7)."""
    return bool(raw & (BIT_P | BIT_7))


def ostd_leaf(raw: int, level: int) -> bool:
    """OSTD's leaf: present with bit 7 set, or any present entry at level 1."""
    return ostd_present(raw) and (bool(raw & BIT_7) or level == 1)


# --- anomalies --------------------------------------------------------------------------
class AnomalyKind(enum.Enum):
    OUTSIDE_RAM = "outside_ram"  # a table (or root) paddr beyond RAM: the subtree is unreadable
    SHARED_NODE = "shared_node"  # a node reached twice in one tree (a loop, or two parents)
    RESERVED = "reserved"  # reserved bits the MMU faults on (PS in a PML4E, misaligned huge leaf)
    NO_SLOT = "no_slot"  # a PTE targets a paddr without a metadata slot
    BAD_TYPE_WORD = "bad_type_word"  # an in-use slot's type word is no Usage value
    REGISTRY = "registry"  # a malformed handle-registry entry
    SLOT_BYTES = "slot_bytes"  # slot bytes exec leaves defined (zero) are not: UNUSED tag/storage, padding
    UNLOGGED = "unlogged"  # a full read found a change no op's footprint named (Footprint, Session.full_every)


@dataclass(frozen=True)
class Anomaly:
    kind: AnomalyKind
    detail: str
    root: int = 0  # the tree's root paddr (0: not about a tree)
    path: TreePath = ()  # path of the entry concerned
    level: int = 0  # level of the table holding the entry
    paddr: int = 0  # paddr of the entry (or slot / registry entry)
    raw: int = 0  # the raw entry / word

    def __str__(self) -> str:
        where = f" root {self.root:#x} path {list(self.path)} L{self.level}" if self.root else ""
        return f"{self.kind.value}:{where} @{self.paddr:#x} raw {self.raw:#x}: {self.detail}"


def _report(found: list[Anomaly], sink: list[Anomaly] | None, what: str) -> None:
    if sink is not None:
        sink.extend(found)
    elif found:
        raise WalkError(f"{what}: " + "; ".join(str(a) for a in found))


# --- translate one VA -------------------------------------------------------------------
class Outcome(enum.Enum):
    LEAF = "leaf"
    NOT_PRESENT = "not_present"  # page fault, P clear
    RESERVED = "reserved"  # page fault, reserved bit set
    OUTSIDE_RAM = "outside_ram"  # the table to read lies beyond RAM (QEMU would read zeros)


@dataclass(frozen=True)
class WalkStep:
    level: int
    entry_paddr: int
    raw: int
    pte: Pte


@dataclass(frozen=True)
class WalkTrace:
    va: int
    root: int
    steps: tuple[WalkStep, ...]
    outcome: Outcome
    level: int  # level of the last table consulted (the leaf's or the faulting one)
    pa: int | None = None  # translated address (va's offset included) when outcome is LEAF
    page_size: int | None = None
    writable: bool = False  # effective: RW at every level
    user: bool = False  # effective: US at every level
    executable: bool = False  # effective: NX at no level

    def describe(self) -> str:
        lines = [f"va {self.va:#x} root {self.root:#x}:"]
        for s in self.steps:
            lines.append(f"  L{s.level} entry @{s.entry_paddr:#x} = {s.raw:#018x} [{s.pte.flags()}]")
        if self.outcome is Outcome.LEAF:
            assert self.pa is not None and self.page_size is not None
            perms = ("u" if self.user else "s") + "r" + ("w" if self.writable else "-")
            perms += "x" if self.executable else "-"
            lines.append(f"  -> pa {self.pa:#x} ({self.page_size >> 10} KiB page, {perms})")
        else:
            lines.append(f"  -> {self.outcome.value} at L{self.level}")
        return "\n".join(lines)


def translate(mem: PhysMemory, root: int, va: int) -> WalkTrace:
    """The MMU's walk of `va` under CR3 = `root` (CR3's low flag bits are ignored)."""
    if not is_canonical(va):
        raise NonCanonicalAddress(va)
    table = root & ADDR_MASK
    steps: list[WalkStep] = []
    rw = us = True
    nx = False
    for level in range(LEVELS, 0, -1):
        if table + PAGE_SIZE > mem.ram_size:
            return WalkTrace(va, root, tuple(steps), Outcome.OUTSIDE_RAM, level)
        entry_paddr = table + 8 * va_index(va, level)
        raw = int.from_bytes(mem.read(entry_paddr, 8), "little")
        pte = decode_pte(raw, level)
        steps.append(WalkStep(level, entry_paddr, raw, pte))
        if not pte.p:
            return WalkTrace(va, root, tuple(steps), Outcome.NOT_PRESENT, level)
        if pte.reserved:
            return WalkTrace(va, root, tuple(steps), Outcome.RESERVED, level)
        rw, us, nx = rw and pte.rw, us and pte.us, nx or pte.nx
        if pte.leaf:
            pa = pte.addr | (va & (pte.size - 1))
            return WalkTrace(va, root, tuple(steps), Outcome.LEAF, level, pa, pte.size, rw, us, not nx)
        table = pte.addr
    raise AssertionError("unreachable: level 1 entries are leaves when present")


# --- whole trees ------------------------------------------------------------------------
@dataclass
class TreeWalk:
    """Every node reachable from `root` (OSTD and MMU agree on which, see the module doc).
    `nodes` entries have the A/D bits masked; `raw_entries` keeps them."""

    root: int
    user_half: bool
    nodes: dict[int, PageTableNode] = field(default_factory=dict)
    anomalies: list[Anomaly] = field(default_factory=list)
    raw_entries: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False)


def _root_indices(level: int, user_half: bool) -> Iterable[int]:
    return USER_ROOT_ENTRIES if level == LEVELS and user_half else range(ENTRIES)


def walk_tree(mem: PhysMemory, root: int, *, user_half: bool = False) -> TreeWalk:
    """Read every page-table node reachable from `root`, both halves (an image's kernel table).
    `user_half` follows only root entries 0..255: say so by calling `walk_user_half`. Nodes
    are read once each (one 4 KiB read per node); anomalies are collected, never dropped."""
    root &= ADDR_MASK
    out = TreeWalk(root, user_half)
    seen: dict[int, TreePath] = {}

    def note(kind: AnomalyKind, detail: str, path: TreePath, level: int, at: int, raw: int) -> None:
        out.anomalies.append(Anomaly(kind, detail, root, path, level, at, raw))

    def visit(paddr: int, level: int, path: TreePath) -> None:
        raw = _NODE.unpack(mem.read(paddr, PAGE_SIZE))
        seen[paddr] = path
        out.raw_entries[paddr] = raw
        out.nodes[paddr] = PageTableNode(paddr, level, path, tuple(e & ~AD_BITS for e in raw))
        for i in _root_indices(level, user_half):
            e = raw[i]
            if not e:
                continue
            here = path + (i,)
            if level == LEVELS and e & BIT_P and e & BIT_7:
                why = "bit 7 set in a root entry: the MMU faults, OSTD sees a 512 GiB leaf; not descended"
                note(AnomalyKind.RESERVED, why, here, level, paddr + 8 * i, e)
            if not descends(e, level):
                continue
            child = e & ADDR_MASK
            if child + PAGE_SIZE > mem.ram_size:
                why = f"table pointer to {child:#x} beyond RAM ({mem.ram_size:#x}); subtree unreadable"
                note(AnomalyKind.OUTSIDE_RAM, why, here, level, paddr + 8 * i, e)
                continue
            if child in seen:
                why = f"node {child:#x} already reached at path {list(seen[child])}; not descended again"
                note(AnomalyKind.SHARED_NODE, why, here, level, paddr + 8 * i, e)
                continue
            visit(child, level - 1, here)

    if root + PAGE_SIZE > mem.ram_size:
        note(AnomalyKind.OUTSIDE_RAM, f"root beyond RAM ({mem.ram_size:#x})", (), LEVELS, root, root)
        return out
    visit(root, LEVELS, ())
    return out


@dataclass(frozen=True)
class Leaf:
    """One page the MMU translates (MMU view)."""

    va: int  # canonical
    pa: int  # frame base, aligned to size
    size: int
    level: int
    pte: Pte  # the leaf entry, raw (A/D included)
    path: TreePath
    writable: bool  # RW at every level
    user: bool  # US at every level
    executable: bool  # NX at no level


def _tree_leaves(walk: TreeWalk, sink: list[Anomaly]) -> list[Leaf]:
    leaves: list[Leaf] = []
    if walk.root not in walk.raw_entries:
        return leaves

    def visit(paddr: int, level: int, path: TreePath, base: int, rw: bool, us: bool, nx: bool) -> None:
        raw = walk.raw_entries[paddr]
        for i in _root_indices(level, walk.user_half):
            e = raw[i]
            if not e & BIT_P:
                continue
            pte = decode_pte(e, level)
            va = base + i * level_size(level)
            here = path + (i,)
            if pte.leaf:
                if pte.reserved:
                    sink.append(Anomaly(AnomalyKind.RESERVED, pte.reserved + "; the MMU faults",
                                        walk.root, here, level, paddr + 8 * i, e))  # fmt: skip
                    continue
                leaves.append(Leaf(canonical(va), pte.addr, pte.size, level, pte, here,
                                   rw and pte.rw, us and pte.us, not (nx or pte.nx)))  # fmt: skip
            elif descends(e, level):
                child = walk.nodes.get(pte.addr)
                if child is not None and child.path == here:  # else: reported by walk_tree
                    visit(pte.addr, level - 1, here, va, rw and pte.rw, us and pte.us, nx or pte.nx)

    visit(walk.root, LEVELS, (), 0, True, True, False)
    return leaves


def walk_user_half(mem: PhysMemory, root: int) -> TreeWalk:
    """`walk_tree` over root entries 0..255 only: an OSTD user page table (its kernel half is
    the kernel's shared tables, walked once from the kernel root)."""
    return walk_tree(mem, root, user_half=True)


def leaf_mappings(
    mem: PhysMemory, root: int, *, user_half: bool = False, anomalies: list[Anomaly] | None = None
) -> list[Leaf]:
    """Every page the MMU translates under `root`, in VA order (lower half first); both halves
    unless `user_half` (`user_leaf_mappings`).

    Anomalies (subtrees that could not be read, reserved-bit leaves left out) are appended to
    `anomalies`; without a list they raise WalkError."""
    walk = walk_tree(mem, root, user_half=user_half)
    found = list(walk.anomalies)
    leaves = _tree_leaves(walk, found)
    _report(found, anomalies, f"walk of root {root:#x}")
    return leaves


def user_leaf_mappings(mem: PhysMemory, root: int, *, anomalies: list[Anomaly] | None = None) -> list[Leaf]:
    """`leaf_mappings` of the user half (root entries 0..255) only."""
    return leaf_mappings(mem, root, user_half=True, anomalies=anomalies)


def ostd_user_leaves(nodes: Mapping[int, PageTableNode], root: int) -> list[Mapping_]:
    """`ostd_leaves` of the user half (root entries 0..255) only."""
    return ostd_leaves(nodes, root, user_half=True)


def ostd_leaves(nodes: Mapping[int, PageTableNode], root: int, *, user_half: bool = False) -> list[Mapping_]:
    """Every leaf in OSTD's terms (see the module doc) of a walked tree (`TreeWalk.nodes`), both
    halves unless `user_half` (`ostd_user_leaves`), in VA order: a leaf with R cleared (bit 0
    clear, bit 7 set) is included here although the MMU does not translate it. `pte` is the A/D-masked entry."""
    out: list[Mapping_] = []
    top = nodes.get(root & ADDR_MASK)
    if top is None:
        return out

    def visit(node: PageTableNode, base: int) -> None:
        for i in _root_indices(node.level, user_half):
            e = node.entries[i]
            if not ostd_present(e):
                continue
            va = base + i * level_size(node.level)
            if ostd_leaf(e, node.level):
                out.append(Mapping_(canonical(va), e & ADDR_MASK, node.level, e, node.path + (i,)))
            else:
                child = nodes.get(e & ADDR_MASK)
                if child is not None and child.path == node.path + (i,):
                    visit(child, va)

    visit(top, 0)
    return out


# --- metadata slots (spec §4.1, hil/target/abi.py SLOT_OFF_*) -----------------------------------
_SLOT = struct.Struct("<40sQQQ")
assert _SLOT.size == 64
assert (abi.SLOT_OFF_REF_COUNT, abi.SLOT_OFF_VTABLE, abi.SLOT_OFF_IN_LIST) == (40, 48, 56)
_USAGES = {int(u): u for u in Usage}


def decode_slot(raw64: bytes) -> tuple[int, int, int, bytes]:
    """(ref_count @40, vtable/type word @48, in_list @56, storage bytes 0..40)."""
    storage, rc, vt, inl = _SLOT.unpack(raw64)
    return rc, vt, inl, storage


def slot_from_raw(
    raw64: bytes,
    *,
    prev_usage: Usage = Usage.UNUSED,
    paths: frozenset[TreePath] = frozenset(),
    refs: int = 0,
    anomalies: list[Anomaly] | None = None,
    paddr: int = 0,
) -> Slot:
    """The `model.state.Slot` of one raw slot.

    - rc == UNUSED: `vt`, `sto`, `node` are None (uninit, M1); the ghost `usage` is the
      previous State's (it survives a free, §1.2): `prev_usage`.
    - otherwise: `vt` = the type word, `sto` = (storage tag, PT level or 0), `usage` =
      Usage(type word) (a word that is no Usage keeps `prev_usage` and is an anomaly), and
      `node` = NodeMeta for a PT_NODE storage tag.
    `inl` is the raw in_list word either way (M1/M3 say it must be 0)."""
    rc, vt, inl, storage = decode_slot(raw64)
    # Every byte is compared: what the Slot does not carry must be what exec leaves there
    # (docs/semantics.md "Bytes not compared"): an UNUSED slot is torn down (storage zero,
    # type word 0), and storage past the fields of its tag is zero.
    tag = storage[abi.SLOT_OFF_STORAGE]
    if rc == REF_COUNT_UNUSED:
        used = 0
    elif tag == StorageTag.PT_NODE:
        used = abi.SLOT_OFF_PT_NR_CHILDREN + 2
    else:
        used = 1
    if any(storage[used:]) or (rc == REF_COUNT_UNUSED and vt) or (tag == StorageTag.PT_NODE and rc != REF_COUNT_UNUSED
                                                                   and storage[abi.SLOT_OFF_PT_STRAY] > 1):
        what = "an UNUSED slot not torn down" if rc == REF_COUNT_UNUSED else f"storage bytes past byte {used}"
        _report([Anomaly(AnomalyKind.SLOT_BYTES, f"{what}: storage {storage.hex()} type word {vt:#x}",
                         paddr=paddr, raw=vt)], anomalies, "slot decode")  # fmt: skip
    if rc == REF_COUNT_UNUSED:
        return Slot(rc, prev_usage, inl, None, None, paths, refs, None)
    node = None
    level = 0
    if tag == StorageTag.PT_NODE:
        level = storage[abi.SLOT_OFF_PT_LEVEL]
        nr = int.from_bytes(storage[abi.SLOT_OFF_PT_NR_CHILDREN : abi.SLOT_OFF_PT_NR_CHILDREN + 2], "little")
        node = NodeMeta(level, nr, bool(storage[abi.SLOT_OFF_PT_STRAY]), storage[abi.SLOT_OFF_PT_LOCK])
    usage = _USAGES.get(vt)
    if usage is None:
        _report([Anomaly(AnomalyKind.BAD_TYPE_WORD, f"type word {vt:#x} is no Usage value",
                         paddr=paddr, raw=vt)], anomalies, "slot decode")  # fmt: skip
        usage = prev_usage
    return Slot(rc, usage, inl, vt, (tag, level), paths, refs, node)


# --- handle registry (hil/target/abi.py REG_*) --------------------------------------------------
_ENTRY = struct.Struct("<8Q")
COUNTER_KEYS = ("vm_space", "cursor", "frame", "segment", "unique")
_HANDLE_KINDS = (
    abi.REG_FRAME,
    abi.REG_SEGMENT,
    abi.REG_UNIQUE,
    abi.REG_VM_SPACE,
    abi.REG_CURSOR,
    abi.REG_LEAKED_ROOT,
)


@dataclass
class Registry:
    next_ids: dict[str, int] = field(default_factory=dict)
    frames: dict[int, int] = field(default_factory=dict)
    segments: dict[int, tuple[int, int]] = field(default_factory=dict)
    uniques: dict[int, int] = field(default_factory=dict)
    vm_spaces: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (root, cursor id)
    cursors: dict[int, CursorView] = field(default_factory=dict)
    leaked: dict[int, int] = field(default_factory=dict)  # old vs id -> root
    anomalies: list[Anomaly] = field(default_factory=list)
    active: int = 0  # counters w5: the active VmSpace of an EXEC=upstream guest (0: kernel; vostd: 0)


def decode_registry(raw: bytes | bytearray, *, base: int = 0, entry_size: int = abi.REGISTRY_ENTRY_SIZE,
                    indices: Iterable[int] | None = None) -> Registry:  # fmt: skip
    """Decode the registry bytes (`base` is its paddr, for anomaly reports only). Entry 0 must
    be REG_COUNTERS; other entries are FREE or one handle each (u64 kind, id, w[6]).
    `indices` (ascending, 0 included) limits the decode to those entries: an all-zero entry
    decodes to nothing, so the non-zero ones give the same Registry."""
    if entry_size != abi.REGISTRY_ENTRY_SIZE:
        raise AbiError(f"registry entry size {entry_size}, expected {abi.REGISTRY_ENTRY_SIZE}")
    reg = Registry()
    seen: set[tuple[int, int]] = set()

    def bad(i: int, kind: int, why: str) -> None:
        reg.anomalies.append(Anomaly(AnomalyKind.REGISTRY, f"entry {i}: {why}", paddr=base + i * entry_size,
                                     raw=kind))  # fmt: skip

    for i in range(len(raw) // entry_size) if indices is None else indices:
        kind, ident, *w = _ENTRY.unpack_from(raw, i * entry_size)
        if i == 0:
            if kind != abi.REG_COUNTERS:
                bad(i, kind, f"kind {kind}, expected the counters entry ({abi.REG_COUNTERS})")
            else:
                reg.next_ids = dict(zip(COUNTER_KEYS, w[: len(COUNTER_KEYS)], strict=False))
                reg.active = w[len(COUNTER_KEYS)]
            continue
        if kind == abi.REG_FREE:
            if ident or any(w):  # reg_free zeroes the whole entry: every byte is compared
                bad(i, kind, f"a free entry with id {ident} and words {[hex(x) for x in w]}")
            continue
        if kind not in _HANDLE_KINDS:
            bad(i, kind, f"unknown kind {kind}")
            continue
        if ident == 0 or (kind, ident) in seen:
            bad(i, kind, f"id {ident} is 0 or already registered for kind {kind}")
            continue
        seen.add((kind, ident))
        if kind == abi.REG_FRAME:
            reg.frames[ident] = w[0]
        elif kind == abi.REG_UNIQUE:
            reg.uniques[ident] = w[0]
        elif kind == abi.REG_LEAKED_ROOT:
            reg.leaked[ident] = w[0]
        elif kind == abi.REG_SEGMENT:
            reg.segments[ident] = (w[0], w[1])
        elif kind == abi.REG_VM_SPACE:
            reg.vm_spaces[ident] = (w[0], w[1])
        else:
            reg.cursors[ident] = CursorView(ident, w[0], bool(w[1]), w[2], w[3], w[4], w[5] & 0xFF, (w[5] >> 8) & 0xFF)
    return reg


# --- the whole State --------------------------------------------------------------------
# A snapshot costs what the op touched (issue 15): each page-table node is decoded once and
# its decoding (children, anomalies, the slot references it holds) kept in a `_NodeInfo`; the
# next snapshot reuses a node whose bytes did not change, and updates the per-slot reference
# sets by the difference of the nodes that did. Registry entries and slots are decoded only
# where their bytes changed. What is *read* is either everything (compared against the cached
# bytes: exact, the default) or a `Footprint` (Session, per op): the slots an op can have
# written (see `Footprint`), checked against a full read every N ops by the caller.


# A root is named by path () but no PTE points at it: refs counts PTEs only, so a root adds 0
# (model/store.py's convention: "a root: {()}, refs 0").
ROOT_REFS = 0


@dataclass(frozen=True)
class _NodeInfo:
    """One node's decoding, a function of its bytes, paddr, level and path only."""

    raw: bytes
    node: PageTableNode
    # in entry order: ("anomaly", Anomaly) or ("child", index, child paddr, entry)
    actions: tuple[tuple[object, ...], ...]
    contrib: tuple[tuple[int, TreePath, int], ...]  # (slot index, path, refs) it adds; root: ((), 0)
    no_slot: tuple[Anomaly, ...]


def _node_info(root: int, paddr: int, level: int, path: TreePath, data: bytes, user_half: bool, ram_size: int,
               slot_count: int) -> _NodeInfo:  # fmt: skip
    raw = _NODE.unpack(data)
    node = PageTableNode(paddr, level, path, tuple(e & ~AD_BITS for e in raw))
    actions: list[tuple[object, ...]] = []
    contrib: list[tuple[int, TreePath, int]] = []
    no_slot: list[Anomaly] = []

    def ref(target: int, here: TreePath, at: int, e: int, n: int) -> None:
        index = target // PAGE_SIZE
        if index >= slot_count:
            why = f"target {target:#x} has no metadata slot ({slot_count} slots)"
            no_slot.append(Anomaly(AnomalyKind.NO_SLOT, why, root, here, level if here else LEVELS, at, e))
        else:
            contrib.append((index, here, n))

    if path == ():
        ref(paddr, (), paddr, 0, ROOT_REFS)
    masked = node.entries
    for i in _root_indices(level, user_half):
        e = raw[i]
        if not e:
            continue
        here = path + (i,)
        m = masked[i]
        if ostd_leaf(m, level) or descends(m, level):
            ref(m & ADDR_MASK, here, paddr + 8 * i, m, 1)
        if level == LEVELS and e & BIT_P and e & BIT_7:
            why = "bit 7 set in a root entry: the MMU faults, OSTD sees a 512 GiB leaf; not descended"
            actions.append(("anomaly", Anomaly(AnomalyKind.RESERVED, why, root, here, level, paddr + 8 * i, e)))
        if not descends(e, level):
            continue
        child = e & ADDR_MASK
        if child + PAGE_SIZE > ram_size:
            why = f"table pointer to {child:#x} beyond RAM ({ram_size:#x}); subtree unreadable"
            actions.append(("anomaly", Anomaly(AnomalyKind.OUTSIDE_RAM, why, root, here, level, paddr + 8 * i, e)))
            continue
        actions.append(("child", i, child, e))
    return _NodeInfo(bytes(data), node, tuple(actions), tuple(contrib), tuple(no_slot))


@dataclass
class _Tree:
    root: int
    infos: dict[int, _NodeInfo]  # paddr -> info, in visit order
    anomalies: list[Anomaly]
    nodes: dict[int, PageTableNode]


def _walk_cached(
    mem: PhysMemory, root: int, slot_count: int, old: _Tree | None, fetch: Callable[[int, bool], bytes | None],
) -> _Tree:  # fmt: skip
    """walk_tree (user half) reusing `old`'s decoding of every node whose bytes are unchanged.
    `fetch(paddr, known)` returns the node's bytes, or None for "unchanged" (only when known)."""
    root &= ADDR_MASK
    tree = _Tree(root, {}, [], {})
    if root + PAGE_SIZE > mem.ram_size:
        why = f"root beyond RAM ({mem.ram_size:#x})"
        tree.anomalies.append(Anomaly(AnomalyKind.OUTSIDE_RAM, why, root, (), LEVELS, root, root))
        return tree
    old_infos = old.infos if old is not None and old.root == root else {}
    seen: dict[int, TreePath] = {}

    def visit(paddr: int, level: int, path: TreePath) -> None:
        prev_info = old_infos.get(paddr)
        if prev_info is not None and (prev_info.node.level != level or prev_info.node.path != path):
            prev_info = None
        data = fetch(paddr, prev_info is not None)
        if prev_info is not None and (data is None or data == prev_info.raw):
            info = prev_info
        else:
            assert data is not None
            info = _node_info(root, paddr, level, path, data, True, mem.ram_size, slot_count)
        seen[paddr] = path
        tree.infos[paddr] = info
        tree.nodes[paddr] = info.node
        for act in info.actions:
            if act[0] == "anomaly":
                assert isinstance(act[1], Anomaly)
                tree.anomalies.append(act[1])
                continue
            _, i, child, e = act
            assert isinstance(i, int) and isinstance(child, int) and isinstance(e, int)
            here = path + (i,)
            if child in seen:
                why = f"node {child:#x} already reached at path {list(seen[child])}; not descended again"
                tree.anomalies.append(Anomaly(AnomalyKind.SHARED_NODE, why, root, here, level, paddr + 8 * i, e))
                continue
            visit(child, level - 1, here)

    visit(root, LEVELS, ())
    return tree


@dataclass
class _RefAcc:
    """Per slot index: multiplicity of each tree path naming it, and the reference count.
    Owned by exactly one cache at a time (updated in place by the next snapshot)."""

    paths: dict[int, dict[TreePath, int]] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)
    # indices whose inner dict this one may change in place; the others are shared with a copy
    # (`copy`: copy-on-write, so forking 10,000 referenced slots costs two C-level dict copies)
    owned: set[int] = field(default_factory=set)

    def copy(self) -> _RefAcc:
        self.owned = set()  # from now on both share every inner dict
        return _RefAcc(dict(self.paths), dict(self.count))

    def add(self, contrib: Iterable[tuple[int, TreePath, int]], sign: int, touched: set[int]) -> None:
        for index, path, n in contrib:
            touched.add(index)
            per = self.paths.get(index)
            if per is None:
                per = self.paths[index] = {}
                self.owned.add(index)
            elif index not in self.owned:
                per = self.paths[index] = dict(per)
                self.owned.add(index)
            left = per.get(path, 0) + sign
            if left:
                per[path] = left
            else:
                del per[path]
            total = self.count.get(index, 0) + sign * n
            if per:
                self.count[index] = total
            else:
                del self.paths[index]
                self.count.pop(index, None)

    def get(self, index: int) -> tuple[frozenset[TreePath], int]:
        per = self.paths.get(index)
        if not per:
            return frozenset(), 0
        return frozenset(per), self.count[index]


@dataclass
class _Cache:
    """Kept on State.raw_cache for the next snapshot. Its mutable parts (raw bytes, reference
    sets) are handed to the next snapshot, which updates them in place: a second snapshot from
    the same `prev` finds it `consumed` and reads from scratch."""

    meta_base: int
    slot_count: int
    raw_meta: bytearray
    raw_registry: bytearray
    live_entries: set[int]  # registry entries with any non-zero byte
    trees: dict[tuple[str, int], _Tree]
    acc: _RefAcc
    slot_anomalies: dict[int, Anomaly]
    consumed: bool = False
    # what this snapshot found changed in raw bytes (None: read from scratch, everything)
    raw_changed_slots: tuple[int, ...] | None = None
    raw_changed_entries: tuple[int, ...] | None = None

    def copy(self, raw_meta: bytearray | None = None) -> _Cache:
        """An unconsumed copy (its own bytes and reference sets; node decodings are immutable)."""
        acc = self.acc.copy()
        trees = {k: _Tree(t.root, t.infos, t.anomalies, t.nodes) for k, t in self.trees.items()}
        meta = bytearray(self.raw_meta) if raw_meta is None else raw_meta
        return _Cache(self.meta_base, self.slot_count, meta, bytearray(self.raw_registry),
                      set(self.live_entries), trees, acc, dict(self.slot_anomalies), False,
                      self.raw_changed_slots, self.raw_changed_entries)  # fmt: skip


def raw_changes(state: State) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(slot indices, registry entry indices) whose bytes this snapshot found changed since its
    prev (None: it read from scratch, so any may have). For Session's reset bookkeeping."""
    cache = state.raw_cache
    if not isinstance(cache, _Cache):
        return None, None
    return cache.raw_changed_slots, cache.raw_changed_entries


def cached_bytes(state: State) -> tuple[bytes, bytes]:
    """The metadata region's and the registry's bytes as this snapshot read them."""
    cache = state.raw_cache
    if not isinstance(cache, _Cache):
        raise ValueError("this State carries no snapshot cache")
    return bytes(cache.raw_meta), bytes(cache.raw_registry)


def compare_states(partial: State, full: State) -> list[Anomaly]:
    """What a footprint read (`partial`) missed, by a full read of the same memory (`full`)."""
    out: list[Anomaly] = []
    slots_p, slots_f = partial.slots, full.slots
    if slots_p != slots_f:
        bad = [i for i in range(len(slots_f)) if slots_p.get(i) != slots_f.get(i)]
        for i in bad[:8]:
            why = f"slot {i} changed outside every op's footprint since the last full read"
            out.append(Anomaly(AnomalyKind.UNLOGGED, why, paddr=i * PAGE_SIZE))
        if len(bad) > 8:
            out.append(Anomaly(AnomalyKind.UNLOGGED, f"{len(bad) - 8} more slots changed outside every footprint"))
    for name in ("vm_spaces", "leaked", "cursors", "frames", "segments", "uniques", "next_ids", "kernel_upper"):
        if getattr(partial, name) != getattr(full, name):
            out.append(Anomaly(AnomalyKind.UNLOGGED, f"{name} changed outside every op's footprint"))
    return out


def fork_state(state: State, *, raw_meta: bytearray | None = None) -> State:
    """`state` with a private copy of its snapshot cache, so that it can be the `prev` of
    another snapshot later (e.g. the boot state after a reset) while the original's cache is
    handed on. Raises ValueError when its cache was already handed on. `raw_meta`: a buffer
    the caller vouches holds exactly `state`'s metadata bytes (saves copying it)."""
    cache = state.raw_cache
    if not isinstance(cache, _Cache) or cache.consumed:
        raise ValueError("this State's snapshot cache is gone (fork it before the next snapshot)")
    if raw_meta is not None and len(raw_meta) != len(cache.raw_meta):
        raise ValueError("raw_meta is not the size of the metadata region")
    copy = cache.copy(raw_meta)
    return dataclasses.replace(state, raw_cache=copy)


def take_raw_meta(state: State) -> bytearray | None:
    """The metadata bytes buffer of `state`'s cache, taken over by the caller (the cache is
    spent: a later snapshot from `state` reads from scratch). None if there is none."""
    cache = state.raw_cache
    if not isinstance(cache, _Cache) or cache.consumed:
        return None
    cache.consumed = True
    return cache.raw_meta


@dataclass(frozen=True)
class Footprint:
    """What a snapshot reads instead of everything (Session, per op; the caller checks it
    against a full read every N ops, so a write outside it is still found).

    Always read, whatever the op: the registry (or, with `registry_prefix`, its entries up to
    the highest live one plus a margin: the guest takes the lowest free entry), the slots of
    the page-table pool up to the highest node of this or the last snapshot, of every node that
    changed, appeared or went, of every target whose references changed, and of every handle
    whose registry entry changed (frames, uniques, segment ranges, roots). The kernel root's
    upper half is prev's unless `pages` names its page. `slots` adds the
    op's own arguments and poked bytes. `all_nodes` re-reads every live node (cheap through
    the shared RAM file); otherwise only nodes of new trees, poked pages, and the nodes whose VA
    span meets the barrier of a cursor in `cursors` (the op's, when it writes PTEs through it:
    map, unmap, protect; the caller sets `all_nodes` for an op that can write anywhere)."""

    slots: frozenset[int] = frozenset()
    all_nodes: bool = True
    registry_prefix: bool = False
    pt_pool: tuple[int, int] = (0, 0)  # [start, end) paddr of the page-table pool
    cursors: tuple[int, ...] = ()  # cursors the op wrote PTEs through (their barriers' nodes are read)
    pages: frozenset[int] = frozenset()  # page paddrs to re-read if they are nodes (poked bytes)
    merge_gap: int = 4  # slot runs closer than this are read as one (an exchange each through the stub)


REGISTRY_MARGIN = 16  # entries past the highest live one read under `registry_prefix`


def _node_span(path: TreePath, level: int) -> tuple[int, int]:
    """[start, end) of the 48-bit VA range a node at `path` (a level-`level` table) covers."""
    base = 0
    for depth, i in enumerate(path):
        base += i * level_size(LEVELS - depth)
    return base, base + ENTRIES * level_size(level)


def _handle_slots(kind: int, w: Sequence[int], slot_count: int) -> Iterable[int]:
    if kind in (abi.REG_FRAME, abi.REG_UNIQUE, abi.REG_VM_SPACE, abi.REG_LEAKED_ROOT):
        return (w[0] // PAGE_SIZE,) if w[0] // PAGE_SIZE < slot_count else ()
    if kind == abi.REG_SEGMENT and w[0] <= w[1]:
        return range(w[0] // PAGE_SIZE, min(-(-w[1] // PAGE_SIZE), slot_count))
    return ()


def _runs(indices: Iterable[int], gap: int = 4) -> list[tuple[int, int]]:
    """Sorted indices as [start, end) runs, merging runs closer than `gap` (fewer reads)."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if out and i - out[-1][1] < gap:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


runs = _runs


def _changed_entries(old: bytes | bytearray, new: bytes, base: int, size: int) -> list[int]:
    """Indices (relative to `base`) of the `size`-byte records that differ between `new` and
    `old[base*size : ...]`; compares 64-record chunks first (memcmp speed)."""
    out: list[int] = []
    chunk = 64 * size
    off0 = base * size
    for off in range(0, len(new), chunk):
        a = old[off0 + off : off0 + off + chunk]
        if a != new[off : off + chunk]:
            for s in range(off, min(off + chunk, len(new)), size):
                if a[s - off : s - off + size] != new[s : s + size]:
                    out.append(base + s // size)
    return out


def read_kernel_upper(mem: PhysMemory, kernel_root: int) -> tuple[int, ...]:
    """Kernel root entries 256..511, A/D masked like PageTableNode entries (the MMU sets A on
    the kernel root's entries while the guest runs; the copies in user roots keep their old
    A bit)."""
    raw = mem.read((kernel_root & ADDR_MASK) + 8 * KERNEL_ROOT_ENTRIES.start, 8 * len(KERNEL_ROOT_ENTRIES))
    return tuple(e & ~AD_BITS for e in struct.unpack(f"<{len(KERNEL_ROOT_ENTRIES)}Q", raw))


def _held_stray_nodes(mem: PhysMemory, layout: abi.Layout, table: SlotTable, *trees: Mapping[int, VmSpaceView]
                      ) -> dict[int, PageTableNode]:  # fmt: skip
    """EXEC=upstream: live page-table nodes of the pool that no walked tree reaches (taken out of
    their tree while a FrameFromInUse handle held them), with their entries: the handle's last
    drop runs on_drop over them (docs/semantics.md "Upstream exec")."""
    reached = {p for views in trees for v in views.values() for p in v.nodes}
    out: dict[int, PageTableNode] = {}
    for i in range(layout.pt_pool_start // PAGE_SIZE, min(layout.pt_pool_end // PAGE_SIZE, layout.slot_count)):
        s = table[i]
        paddr = i * PAGE_SIZE
        if s.rc == REF_COUNT_UNUSED or s.node is None or paddr in reached:
            continue
        raw = struct.unpack("<512Q", mem.read(paddr, PAGE_SIZE))
        out[paddr] = PageTableNode(paddr, s.node.level, (), tuple(e & ~AD_BITS for e in raw))
    return out


def read_state(mem: PhysMemory, layout: abi.Layout, prev: State | None = None, *,
               footprint: Footprint | None = None) -> State:  # fmt: skip
    """One snapshot: registry, every live VmSpace root and every leaked root (user half), the
    metadata slots, the kernel root's upper half.

    With `prev` (normally the previous snapshot) the State records `parent=prev` and
    `changed` = the slot indices whose Slot differs, and only what changed is decoded again
    (the rest is shared with prev). A freed slot (rc UNUSED) keeps prev's ghost usage.
    Without `footprint` every byte is read and compared (exact); with one, only what it
    names (see `Footprint`)."""
    if layout.slot_size != 64:
        raise AbiError(f"slot size {layout.slot_size}, expected 64")
    es = layout.registry_entry_size
    if es != abi.REGISTRY_ENTRY_SIZE:
        raise AbiError(f"registry entry size {es}, expected {abi.REGISTRY_ENTRY_SIZE}")
    cache = prev.raw_cache if prev is not None else None
    usable = (
        isinstance(cache, _Cache)
        and not cache.consumed
        and cache.meta_base == layout.meta_base
        and cache.slot_count == layout.slot_count
        and len(cache.raw_registry) == es * layout.registry_entries
        and prev is not None
        and len(prev.slots) == layout.slot_count
    )
    if not usable:
        cache = None
        footprint = None  # from scratch: read everything
    else:
        assert isinstance(cache, _Cache)
        cache.consumed = True
    anomalies: list[Anomaly] = []

    # registry: the changed entries, then the live ones decoded (free zero entries add nothing)
    if cache is None:
        raw_reg = bytearray(mem.read(layout.registry_base, es * layout.registry_entries))
        changed_entries = [i for i in range(layout.registry_entries) if any(raw_reg[i * es : (i + 1) * es])]
        live = set(changed_entries)
        old_reg: bytes | bytearray = bytes(len(raw_reg))
    else:
        raw_reg = cache.raw_registry
        live = cache.live_entries
        n_read = layout.registry_entries
        if footprint is not None and footprint.registry_prefix:
            n_read = min(layout.registry_entries, max(live, default=0) + 1 + REGISTRY_MARGIN)
        new = mem.read(layout.registry_base, es * n_read)
        changed_entries = _changed_entries(raw_reg, new, 0, es)
        old_reg = bytes(b for i in changed_entries for b in raw_reg[i * es : (i + 1) * es])
        old_reg_at = {i: k for k, i in enumerate(changed_entries)}
        for i in changed_entries:
            raw_reg[i * es : (i + 1) * es] = new[i * es : (i + 1) * es]
            if any(new[i * es : (i + 1) * es]):
                live.add(i)
            else:
                live.discard(i)
    reg = decode_registry(raw_reg, base=layout.registry_base, entry_size=es, indices=sorted(live | {0}))
    anomalies += reg.anomalies

    # page tables
    trees_before = cache.trees if cache is not None else {}
    roots: dict[tuple[str, int], int] = {("vs", vs): root for vs, (root, _c) in reg.vm_spaces.items()}
    roots.update({("leaked", vs): root for vs, root in reg.leaked.items()})
    slow_nodes = footprint is not None and not footprint.all_nodes
    pages = footprint.pages if footprint is not None else frozenset()
    spans: list[tuple[int, int, int]] = []  # (vs, start, end): barriers of the cursors the op wrote through
    if slow_nodes and prev is not None and footprint is not None:
        for cid in footprint.cursors:
            cur = prev.cursors.get(cid)
            if cur is not None:
                spans.append((cur.vs, cur.start & ((1 << VA_BITS) - 1), cur.end & ((1 << VA_BITS) - 1)))

    def fetcher(key: tuple[str, int]) -> Callable[[int, bool], bytes | None]:
        if not slow_nodes or key not in trees_before:
            return lambda paddr, known: mem.read(paddr, PAGE_SIZE)
        mine = [(s, e) for vs, s, e in spans if key[0] == "vs" and vs == key[1]]
        old = trees_before[key].infos

        def fetch(paddr: int, known: bool) -> bytes | None:
            info = old.get(paddr)
            if known and info is not None and paddr not in pages:
                lo, hi = _node_span(info.node.path, info.node.level)
                if not any(s < hi and lo < e for s, e in mine):
                    return None
            return mem.read(paddr, PAGE_SIZE)

        return fetch

    trees: dict[tuple[str, int], _Tree] = {}
    spanned = {("vs", vs) for vs, _s, _e in spans}
    for key, root in roots.items():
        kept = trees_before.get(key)
        if (slow_nodes and kept is not None and key not in spanned and kept.root == root & ADDR_MASK
                and pages.isdisjoint(kept.infos)):  # fmt: skip
            # no op wrote into this tree and no poke hit it: the walk would re-use every node's
            # decoding as it is, so the tree is the same (a 10,000-leaf VmSpace costs nothing)
            trees[key] = _Tree(kept.root, kept.infos, kept.anomalies, kept.nodes)
            continue
        trees[key] = _walk_cached(mem, root, layout.slot_count, kept, fetcher(key))

    # references: the difference of the nodes that changed
    touched: set[int] = set()
    node_slots: set[int] = set()
    acc = cache.acc if cache is not None else _RefAcc()
    for key in trees_before.keys() | trees.keys():
        old_t, new_t = trees_before.get(key), trees.get(key)
        old_infos = old_t.infos if old_t is not None else {}
        new_infos = new_t.infos if new_t is not None else {}
        for paddr, info in old_infos.items():
            if new_infos.get(paddr) is not info:
                acc.add(info.contrib, -1, touched)
                node_slots.add(paddr // PAGE_SIZE)
        for paddr, info in new_infos.items():
            if old_infos.get(paddr) is not info:
                acc.add(info.contrib, +1, touched)
                node_slots.add(paddr // PAGE_SIZE)
    for key in trees:
        t = trees[key]
        anomalies += t.anomalies
        for info in t.infos.values():
            anomalies += info.no_slot

    # slots: which to read
    bulk: dict[int, Slot] = {}  # from scratch: runs of identical unreferenced slots, decoded once
    changed_slots: list[int] = []
    if cache is None:
        raw_meta = bytearray(mem.read(layout.meta_base, layout.slot_size * layout.slot_count))
        rebuild: Iterable[int] = range(layout.slot_count)
        slot_anoms: dict[int, Anomaly] = {}
        if prev is None and layout.slot_count >= 64:
            # boot: most of RAM is free frames whose slots are byte-identical (~100 ms -> a few)
            pattern = bytes(raw_meta[64 * (layout.slot_count - 1) :]) * 64
            bad: list[Anomaly] = []
            free = slot_from_raw(pattern[:64], anomalies=bad)
            if not bad:
                todo: list[int] = []
                for lo in range(0, layout.slot_count, 64):
                    hi = min(lo + 64, layout.slot_count)
                    if raw_meta[64 * lo : 64 * hi] == pattern[: 64 * (hi - lo)] and not any(
                        i in acc.paths for i in range(lo, hi)
                    ):
                        bulk.update(dict.fromkeys(range(lo, hi), free))
                    else:
                        todo.extend(range(lo, hi))
                rebuild = todo
    else:
        raw_meta = cache.raw_meta
        if footprint is None:
            new_meta = mem.read(layout.meta_base, layout.slot_size * layout.slot_count)
            changed_slots = _changed_entries(raw_meta, new_meta, 0, 64)
            for i in changed_slots:
                raw_meta[64 * i : 64 * i + 64] = new_meta[64 * i : 64 * i + 64]
        else:
            want = set(footprint.slots) | touched | node_slots
            pool_lo, pool_hi = footprint.pt_pool
            top = max((p for t in (*trees.values(), *trees_before.values()) for p in t.infos
                       if pool_lo <= p < pool_hi), default=pool_lo - PAGE_SIZE) + PAGE_SIZE  # fmt: skip
            if pool_hi > pool_lo:
                want.update(range(pool_lo // PAGE_SIZE, top // PAGE_SIZE))
            for i in changed_entries:
                for words in (old_reg[old_reg_at[i] * es : (old_reg_at[i] + 1) * es], raw_reg[i * es : (i + 1) * es]):
                    kind, _ident, *w = _ENTRY.unpack(words)
                    want.update(_handle_slots(kind, w, layout.slot_count))
            for lo, hi in _runs((i for i in want if 0 <= i < layout.slot_count), footprint.merge_gap):
                new_meta = mem.read(layout.meta_base + 64 * lo, 64 * (hi - lo))
                found = _changed_entries(raw_meta, new_meta, lo, 64)
                for i in found:
                    raw_meta[64 * i : 64 * i + 64] = new_meta[64 * (i - lo) : 64 * (i - lo) + 64]
                changed_slots += found
        rebuild_set = set(changed_slots) | touched
        rebuild = sorted(rebuild_set)
        slot_anoms = {i: a for i, a in cache.slot_anomalies.items() if i not in rebuild_set}
    changed: set[int] | None = set() if prev is not None else None
    slots: dict[int, Slot] = {}  # the rebuilt slots; the rest are shared with prev
    no_refs: tuple[frozenset[TreePath], int] = (frozenset(), 0)
    plain: dict[tuple[bytes, Usage], Slot] = {}  # share identical unreferenced slots
    for i in rebuild:
        raw64 = bytes(raw_meta[64 * i : 64 * i + 64])
        old = prev.slot(i) if prev is not None else None
        prev_usage = old.usage if old is not None else Usage.UNUSED
        paths, n = acc.get(i) if i in acc.paths else no_refs
        if n == 0 and not paths and (raw64, prev_usage) in plain:
            slot = plain[raw64, prev_usage]
        else:
            one: list[Anomaly] = []
            slot = slot_from_raw(raw64, prev_usage=prev_usage, paths=paths, refs=n, anomalies=one,
                                 paddr=layout.meta_base + 64 * i)  # fmt: skip
            if one:
                slot_anoms[i] = one[0]
            elif n == 0 and not paths:
                plain[raw64, prev_usage] = slot
        if old is not None and slot == old:
            slot = old
        elif changed is not None:
            changed.add(i)
        slots[i] = slot
    anomalies += [slot_anoms[i] for i in sorted(slot_anoms)]
    if cache is not None and prev is not None:
        table = SlotTable.of(prev.slots, layout.slot_count).updated(
            {i: slot for i, slot in slots.items() if slot is not prev.slot(i)}
        )
    else:
        slots.update(bulk)
        table = SlotTable.dense(slots[i] for i in range(layout.slot_count))

    # the kernel root's upper half: no op writes it (a poke names its page; a full read re-reads)
    kroot_page = layout.kernel_root & ADDR_MASK
    if footprint is not None and prev is not None and prev.kernel_upper and kroot_page not in footprint.pages:
        kernel_upper = prev.kernel_upper
    else:
        kernel_upper = read_kernel_upper(mem, layout.kernel_root)

    def view(key: tuple[str, int], vs: int, root: int, cursor: int = 0) -> VmSpaceView:
        nodes = trees[key].nodes
        old_t = trees_before.get(key)
        old_view = (prev.vm_spaces if key[0] == "vs" else prev.leaked).get(vs) if prev is not None else None
        if (old_t is not None and old_view is not None and old_t.infos.keys() == trees[key].infos.keys()
                and all(old_t.infos[p] is i for p, i in trees[key].infos.items())):  # fmt: skip
            if old_view.root == root & ADDR_MASK and old_view.cursor == cursor:
                return old_view  # unchanged: the same object (cheap equality, caches keep)
            if old_view.root == root & ADDR_MASK:
                return old_view.with_cursor(cursor)  # the same tree: its caches carry over
            nodes = old_view.nodes  # type: ignore[assignment]  # unchanged tree: share prev's dict
        return VmSpaceView(vs, root & ADDR_MASK, nodes, cursor)

    vm_spaces = {vs: view(("vs", vs), vs, root, cursor) for vs, (root, cursor) in sorted(reg.vm_spaces.items())}
    leaked = {vs: view(("leaked", vs), vs, root) for vs, root in sorted(reg.leaked.items())}
    held = _held_stray_nodes(mem, layout, table, vm_spaces, leaked) if layout.exec_name == "upstream" else {}
    return State(
        slots=table,
        vm_spaces=vm_spaces,
        cursors=dict(sorted(reg.cursors.items())),
        frames=dict(sorted(reg.frames.items())),
        segments=dict(sorted(reg.segments.items())),
        uniques=dict(sorted(reg.uniques.items())),
        leaked=leaked,
        next_ids=reg.next_ids,
        active=reg.active,
        held_nodes=held,
        kernel_root=layout.kernel_root,
        kernel_upper=kernel_upper,
        nr_slots=layout.slot_count,
        registry_capacity=layout.registry_entries,
        parent=prev,
        changed=frozenset(changed) if changed is not None else None,
        anomalies=tuple(anomalies),
        raw_cache=_Cache(layout.meta_base, layout.slot_count, raw_meta, raw_reg, live, trees, acc, slot_anoms, False,
                         None if cache is None else tuple(changed_slots),
                         None if cache is None else tuple(changed_entries)),  # fmt: skip
    )


# --- QEMU HMP `info tlb` / `info mem` (target/i386/monitor.c, QEMU 7.2, 4-level paging) ----
# `info tlb`: one line per present leaf under the CPU's current CR3, whole tree (both halves):
#   "%016lx: %016lx %c%c%c%c%c%c%c%c%c" = canonical va, pte & mask, then the leaf entry's own
#   bits (not combined with its parents): X(NX) G P(PS) D A C(PCD) T(PWT) U W. Level-1
#   entries are printed with bit 7 cleared (so P never shows for 4 KiB pages); mask keeps
#   bits 12..49 (2 MiB: 21..49, 1 GiB: 30..49).
# `info mem`: "%016lx-%016lx %016lx %c%c%c" = start, end, size, then u/- r w/-: runs of
#   consecutive leaves with equal (US, RW, P) ANDed over all levels (NX ignored), physical
#   contiguity not required; addresses computed in 48 bits, then sign-extended on print.
QEMU_PHYS_MASK = 0x3_FFFF_FFFF_F000
TLB_FLAGS = "XGPDACTUW"
TLB_BITS = (BIT_NX, BIT_G, BIT_7, BIT_D, BIT_A, BIT_PCD, BIT_PWT, BIT_US, BIT_RW)
_TLB_RE = re.compile(r"^([0-9a-f]{16}): ([0-9a-f]{16}) ([-X][-G][-P][-D][-A][-C][-T][-U][-W])$")
_MEM_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16}) ([0-9a-f]{16}) ([-u]r[-w])$")


@dataclass(frozen=True)
class TlbLine:
    va: int
    pa: int
    flags: str  # 9 letters, TLB_FLAGS order, '-' when clear

    def __str__(self) -> str:
        return f"{self.va:016x}: {self.pa:016x} {self.flags}"


@dataclass(frozen=True)
class MemRange:
    start: int
    end: int
    size: int
    prot: str  # "urw" / "-r-" ...

    def __str__(self) -> str:
        return f"{self.start:016x}-{self.end:016x} {self.size:016x} {self.prot}"


def _hmp_lines(text: str) -> Iterable[str]:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("(qemu)"):
            yield line


def parse_info_tlb(text: str) -> list[TlbLine]:
    out = []
    for line in _hmp_lines(text):
        m = _TLB_RE.match(line)
        if m is None:
            raise ValueError(f"not an `info tlb` line (x86-64): {line!r}")
        out.append(TlbLine(int(m[1], 16), int(m[2], 16), m[3]))
    return out


def parse_info_mem(text: str) -> list[MemRange]:
    out = []
    for line in _hmp_lines(text):
        m = _MEM_RE.match(line)
        if m is None:
            raise ValueError(f"not an `info mem` line (x86-64): {line!r}")
        out.append(MemRange(int(m[1], 16), int(m[2], 16), int(m[3], 16), m[4]))
    return out


def render_info_tlb(leaves: Iterable[Leaf]) -> list[TlbLine]:
    """Our MMU-view leaves (walked with user_half=False) as QEMU prints them."""
    out = []
    for leaf in sorted(leaves, key=lambda lf: lf.va & ((1 << VA_BITS) - 1)):
        raw = leaf.pte.raw & ~BIT_7 if leaf.level == 1 else leaf.pte.raw
        flags = "".join(ch if raw & bit else "-" for ch, bit in zip(TLB_FLAGS, TLB_BITS, strict=True))
        out.append(TlbLine(leaf.va, leaf.pa & QEMU_PHYS_MASK, flags))
    return out


def render_info_mem(leaves: Iterable[Leaf]) -> list[MemRange]:
    """Our MMU-view leaves merged the way QEMU's `info mem` merges them."""
    out: list[MemRange] = []
    cur: tuple[int, int, str] | None = None  # start48, end48, prot

    def flush() -> None:
        if cur is not None:
            s, e, p = cur
            out.append(MemRange(_hmp_canonical(s), _hmp_canonical(e), _hmp_canonical(e - s), p))

    for leaf in sorted(leaves, key=lambda lf: lf.va & ((1 << VA_BITS) - 1)):
        start = leaf.va & ((1 << VA_BITS) - 1)
        prot = ("u" if leaf.user else "-") + "r" + ("w" if leaf.writable else "-")
        if cur is not None and cur[1] == start and cur[2] == prot:
            cur = (cur[0], start + leaf.size, prot)
        else:
            flush()
            cur = (start, start + leaf.size, prot)
    flush()
    return out


def _hmp_canonical(addr: int) -> int:
    """QEMU's addr_canonical: sign-extend bit 47, leave higher bits as they are."""
    return addr | (_U64 & ~((1 << VA_BITS) - 1)) if addr & (1 << (VA_BITS - 1)) else addr


def format_hmp(lines: Iterable[TlbLine | MemRange]) -> str:
    return "".join(f"{line}\n" for line in lines)


@dataclass(frozen=True)
class LineDiff:
    key: int  # va (info tlb) / start (info mem)
    qemu: TlbLine | MemRange | None
    ours: TlbLine | MemRange | None

    def __str__(self) -> str:
        return f"{self.key:#x}: qemu {self.qemu or 'absent'} / walker {self.ours or 'absent'}"


def _compare(qemu: Sequence[TlbLine | MemRange], ours: Sequence[TlbLine | MemRange]) -> list[LineDiff]:
    def key(x: TlbLine | MemRange) -> int:
        return x.va if isinstance(x, TlbLine) else x.start

    q = {key(x): x for x in qemu}
    o = {key(x): x for x in ours}
    return [LineDiff(k, q.get(k), o.get(k)) for k in sorted(q.keys() | o.keys()) if q.get(k) != o.get(k)]


def compare_info_tlb(qemu: Sequence[TlbLine], ours: Sequence[TlbLine], *, ignore_ad: bool = False) -> list[LineDiff]:
    """Entry-by-entry differences keyed by VA (empty: they agree). `ignore_ad` blanks the
    D and A letters on both sides (when the guest ran between the two reads)."""
    if ignore_ad:
        qemu = [_blank_ad(x) for x in qemu]
        ours = [_blank_ad(x) for x in ours]
    return _compare(qemu, ours)


def _blank_ad(line: TlbLine) -> TlbLine:
    f = line.flags
    return TlbLine(line.va, line.pa, f[:3] + "--" + f[5:])


def compare_info_mem(qemu: Sequence[MemRange], ours: Sequence[MemRange]) -> list[LineDiff]:
    return _compare(qemu, ours)


def qemu_view(
    mem: PhysMemory, cr3: int, anomalies: list[Anomaly] | None = None
) -> tuple[list[TlbLine], list[MemRange]]:
    """Our walker's rendering of `info tlb` and `info mem` for CR3 = `cr3` (whole tree)."""
    leaves = leaf_mappings(mem, cr3, user_half=False, anomalies=anomalies)
    return render_info_tlb(leaves), render_info_mem(leaves)
