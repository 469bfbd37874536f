"""Metadata-slot decoding, registry decoding and read_state (paths / refs / ghost usage /
incremental diff) on hand-built guest memory in DictMemory."""

from __future__ import annotations

import struct

import pytest

from hil.observe.snapshot import (
    Anomaly,
    AnomalyKind,
    WalkError,
    decode_registry,
    decode_slot,
    read_state,
    slot_from_raw,
)
from hil.target import abi
from hil.target.memory import DictMemory
from model.state import CursorView, NodeMeta, Slot, State
from model.types import Usage

UNUSED = (1 << 64) - 1
UNIQUE = (1 << 64) - 2
P, RW, US, A, D, B7, NX = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80, 1 << 63
TABLE = P | RW | US
LEAF = P | RW | US | B7 | NX  # an OSTD 4 KiB leaf: read/write, user, no execute


def slot_bytes(rc: int, vt: int = 0, inl: int = 0, storage: bytes = b"") -> bytes:
    return storage.ljust(40, b"\0") + struct.pack("<QQQ", rc, vt, inl)


def pt_storage(level: int, nr_children: int, stray: int = 0, lock: int = 0) -> bytes:
    return bytes([3, level, stray, lock]) + nr_children.to_bytes(2, "little")


FREE = slot_bytes(UNUSED)


# --- decode_slot / slot_from_raw ----------------------------------------------------------
def test_decode_slot_offsets() -> None:
    raw = bytes(range(40)) + struct.pack("<QQQ", 0x1111, 0x2222, 0x3333)
    assert decode_slot(raw) == (0x1111, 0x2222, 0x3333, bytes(range(40)))


def test_unused_slot_is_uninit_and_inherits_usage() -> None:
    assert slot_from_raw(FREE) == Slot(UNUSED, Usage.UNUSED, 0, None, None)
    found: list[Anomaly] = []
    s = slot_from_raw(slot_bytes(UNUSED, vt=2, inl=5, storage=b"\x01"), prev_usage=Usage.PAGE_TABLE,
                      anomalies=found)  # fmt: skip
    assert (s.rc, s.usage, s.inl, s.vt, s.sto, s.node) == (UNUSED, Usage.PAGE_TABLE, 5, None, None, None)
    # exec's teardown zeroes the tag, the storage and the type word: left behind, they are reported
    assert [a.kind for a in found] == [AnomalyKind.SLOT_BYTES]
    with pytest.raises(WalkError):
        slot_from_raw(slot_bytes(UNUSED, storage=b"\0\0\x07"))
    with pytest.raises(WalkError):  # a Frame's storage past its tag byte
        slot_from_raw(slot_bytes(1, vt=2, storage=b"\x01\x00\x09"))
    with pytest.raises(WalkError):  # a PT node's storage past nr_children
        slot_from_raw(slot_bytes(1, vt=3, storage=pt_storage(1, 2) + b"\x01"))


def test_unique_and_shared_slots() -> None:
    u = slot_from_raw(slot_bytes(UNIQUE, vt=2, storage=b"\x01"))
    assert (u.rc, u.usage, u.vt, u.sto, u.node) == (UNIQUE, Usage.FRAME, 2, (1, 0), None)
    sh = slot_from_raw(slot_bytes(3, vt=5), prev_usage=Usage.FRAME)
    assert (sh.rc, sh.usage, sh.vt, sh.sto) == (3, Usage.KERNEL, 5, (0, 0))
    zero = slot_from_raw(slot_bytes(0, vt=2, storage=b"\x01"))  # under construction: init
    assert (zero.rc, zero.vt, zero.sto) == (0, 2, (1, 0))


def test_pt_node_slot() -> None:
    s = slot_from_raw(slot_bytes(1, vt=3, storage=pt_storage(2, 0x134, stray=1, lock=7)))
    assert (s.usage, s.sto) == (Usage.PAGE_TABLE, (3, 2))
    assert s.node == NodeMeta(level=2, nr_children=0x134, stray=True, lock=7)


def test_bad_type_word() -> None:
    raw = slot_bytes(1, vt=99, storage=b"\x01")
    with pytest.raises(WalkError, match="bad_type_word"):
        slot_from_raw(raw)
    sink: list = []
    s = slot_from_raw(raw, prev_usage=Usage.FRAME, anomalies=sink, paddr=0x1234)
    assert (s.usage, s.vt) == (Usage.FRAME, 99)
    assert [(a.kind, a.paddr, a.raw) for a in sink] == [(AnomalyKind.BAD_TYPE_WORD, 0x1234, 99)]


# --- registry -----------------------------------------------------------------------------
def entry(kind: int, ident: int = 0, *w: int) -> bytes:
    words = list(w) + [0] * (6 - len(w))
    return struct.pack("<8Q", kind, ident, *words)


def test_decode_registry_all_kinds() -> None:
    raw = b"".join([
        entry(abi.REG_COUNTERS, 0, 4, 2, 3, 2, 2),
        entry(abi.REG_VM_SPACE, 1, 0x10000, 1),
        entry(abi.REG_FREE),
        entry(abi.REG_FRAME, 1, 0x200000),
        entry(abi.REG_FRAME, 2, 0x200000),
        entry(abi.REG_SEGMENT, 1, 0x250000, 0x252000),
        entry(abi.REG_UNIQUE, 1, 0x260000),
        entry(abi.REG_CURSOR, 1, 1, 1, 0x1000, 0x9000, 0x3000, 1 | 4 << 8),
        entry(abi.REG_LEAKED_ROOT, 3, 0x30000),
    ])  # fmt: skip
    reg = decode_registry(raw, base=0x5000)
    assert reg.anomalies == []
    assert reg.next_ids == {"vm_space": 4, "cursor": 2, "frame": 3, "segment": 2, "unique": 2}
    assert reg.vm_spaces == {1: (0x10000, 1)}
    assert reg.frames == {1: 0x200000, 2: 0x200000}
    assert reg.segments == {1: (0x250000, 0x252000)}
    assert reg.uniques == {1: 0x260000}
    assert reg.cursors == {1: CursorView(1, 1, True, 0x1000, 0x9000, 0x3000, 1, 4)}
    assert reg.leaked == {3: 0x30000}


def test_decode_registry_anomalies() -> None:
    raw = b"".join([
        entry(abi.REG_FRAME, 1, 0x1000),  # entry 0 must be the counters
        entry(9, 1),  # unknown kind
        entry(abi.REG_FRAME, 5, 0x2000),
        entry(abi.REG_FRAME, 5, 0x3000),  # duplicate id
        entry(abi.REG_UNIQUE, 0, 0x4000),  # id 0
        entry(abi.REG_COUNTERS, 0, 1),  # counters outside entry 0
    ])  # fmt: skip
    reg = decode_registry(raw, base=0x5000)
    assert [(a.kind, a.paddr) for a in reg.anomalies] == [
        (AnomalyKind.REGISTRY, 0x5000 + 64 * i) for i in (0, 1, 3, 4, 5)
    ]
    assert reg.frames == {5: 0x2000}
    assert reg.next_ids == {}


# --- read_state ---------------------------------------------------------------------------
RAM = 4 << 20
META, REG, NR_REG = 0x30_0000, 0x31_0000, 16
SLOTS = RAM // 4096
KROOT, KL3_LOW, KL3_HIGH = 0x1000, 0x2000, 0x3000
R1, R1_L3, R1_L2, R1_L1 = 0x10000, 0x11000, 0x12000, 0x13000
R2, R2_L3, R2_L2, R2_L1 = 0x20000, 0x21000, 0x22000, 0x23000
R3, R3_L3, R3_L2, R3_L1 = 0x30000, 0x31000, 0x32000, 0x33000  # a leaked root
F, G, H = 0x200000, 0x201000, 0x202000  # F mapped 3x, G in the leaked tree, H a bare handle


def layout() -> abi.Layout:
    return abi.Layout(
        magic=abi.LAYOUT_MAGIC, abi_version=abi.ABI_VERSION, ram_size=RAM, meta_base=META,
        slot_size=64, slot_count=SLOTS, kernel_root=KROOT, registry_base=REG,
        registry_entry_size=64, registry_entries=NR_REG, mailbox=0x8000, pt_pool_start=0x10000,
        pt_pool_end=0x100000, data_pool_start=0x200000, data_pool_end=0x300000,
        kernel_virt_offset=0, linear_map_base=0xFFFF_8000_0000_0000, seeded_bug=0,
    )  # fmt: skip


def put(mem: DictMemory, table: int, index: int, value: int) -> None:
    mem.write_u64(table + 8 * index, value)


def set_slot(mem: DictMemory, paddr: int, raw: bytes) -> None:
    mem.write(META + 64 * (paddr // 4096), raw)


def set_reg(mem: DictMemory, index: int, raw: bytes) -> None:
    mem.write(REG + 64 * index, raw)


def idx(paddr: int) -> int:
    return paddr // 4096


def chain(mem: DictMemory, nodes: tuple[int, int, int, int], i4: int, i3: int, i2: int) -> None:
    root, l3, l2, l1 = nodes
    put(mem, root, i4, l3 | TABLE)
    put(mem, l3, i3, l2 | TABLE)
    put(mem, l2, i2, l1 | TABLE)
    for level, node in zip((4, 3, 2, 1), nodes, strict=True):
        set_slot(mem, node, slot_bytes(1, vt=3, storage=pt_storage(level, 0 if level == 1 else 1)))


@pytest.fixture
def mem() -> DictMemory:
    m = DictMemory(RAM)
    m.write(META, FREE * SLOTS)
    # kernel root: upper-half entries (A set by the MMU on the kernel's own root)
    put(m, KROOT, 256, KL3_LOW | TABLE | A)
    put(m, KROOT, 511, KL3_HIGH | TABLE)
    for vs_root in (R1, R2):  # NewVmSpace copied them (before A was set)
        put(m, vs_root, 256, KL3_LOW | TABLE)
        put(m, vs_root, 511, KL3_HIGH | TABLE)
    chain(m, (R1, R1_L3, R1_L2, R1_L1), 0, 0, 0)
    put(m, R1_L1, 1, F | LEAF)  # va 0x1000
    put(m, R1_L1, 2, F | LEAF | A | D)  # va 0x2000, same frame
    chain(m, (R2, R2_L3, R2_L2, R2_L1), 0, 1, 0)
    put(m, R2_L1, 0, F | LEAF)  # va 0x4000_0000
    chain(m, (R3, R3_L3, R3_L2, R3_L1), 2, 0, 0)
    put(m, R3_L1, 5, G | LEAF)
    set_slot(m, F, slot_bytes(4, vt=2, storage=b"\x01"))  # 3 PTEs + 1 handle
    set_slot(m, G, slot_bytes(1, vt=2, storage=b"\x01"))
    set_slot(m, H, slot_bytes(1, vt=2, storage=b"\x01"))
    set_reg(m, 0, entry(abi.REG_COUNTERS, 0, 4, 2, 3, 1, 1))
    set_reg(m, 1, entry(abi.REG_VM_SPACE, 1, R1, 1))
    set_reg(m, 2, entry(abi.REG_VM_SPACE, 2, R2, 0))
    set_reg(m, 3, entry(abi.REG_LEAKED_ROOT, 3, R3))
    set_reg(m, 4, entry(abi.REG_FRAME, 1, F))
    set_reg(m, 5, entry(abi.REG_FRAME, 2, H))
    set_reg(m, 6, entry(abi.REG_CURSOR, 1, 1, 1, 0, 0x10000, 0x3000, 1 | 4 << 8))
    return m


def test_read_state_paths_refs_and_views(mem: DictMemory) -> None:
    mem.reads = 0
    s = read_state(mem, layout())
    # one bulk read each for metadata, registry, kernel root upper half; one per PT node
    assert mem.reads == 3 + 12
    assert s.anomalies == ()
    f = s.slot_of(F)
    assert f.paths == frozenset({(0, 0, 0, 1), (0, 0, 0, 2), (0, 1, 0, 0)})
    assert (f.refs, f.rc, f.usage, f.vt, f.sto, f.node) == (3, 4, Usage.FRAME, 2, (1, 0), None)
    assert (s.slot_of(G).paths, s.slot_of(G).refs) == (frozenset({(2, 0, 0, 5)}), 1)
    assert (s.slot_of(H).paths, s.slot_of(H).refs) == (frozenset(), 0)
    assert (s.slot_of(R1).paths, s.slot_of(R1).refs) == (frozenset({()}), 0)  # no PTE names a root
    assert s.slot_of(R1).node == NodeMeta(4, 1, False, 0)
    assert s.slot_of(R1).sto == (3, 4)
    assert s.slot_of(R1_L3).paths == frozenset({(0,)})
    assert s.slot_of(R1_L2).paths == frozenset({(0, 0)})
    assert s.slot_of(R1_L1).paths == frozenset({(0, 0, 0)})
    assert s.slot_of(R2_L2).paths == frozenset({(0, 1)})
    assert s.slot_of(R3_L1).paths == frozenset({(2, 0, 0)})
    assert s.slot_of(KL3_LOW).refs == 0  # the kernel half is not walked
    assert s.slot(idx(0x100000)) == Slot(UNUSED, Usage.UNUSED)
    assert len(s.slots) == SLOTS and s.nr_slots == SLOTS
    assert (s.parent, s.changed) == (None, None)

    assert set(s.vm_spaces) == {1, 2}
    assert (s.vm_spaces[1].root, s.vm_spaces[1].cursor, len(s.vm_spaces[1].nodes)) == (R1, 1, 4)
    assert sorted(s.vm_spaces[1].mappings()) == [0x1000, 0x2000]
    assert s.vm_spaces[1].nodes[R1_L1].entries[2] == F | LEAF  # A/D masked
    assert sorted(s.vm_spaces[2].mappings()) == [0x4000_0000]
    assert (s.leaked[3].root, sorted(s.leaked[3].mappings())) == (R3, [(2 << 39) + 5 * 4096])
    assert s.cursors == {1: CursorView(1, 1, True, 0, 0x10000, 0x3000, 1, 4)}
    assert s.frames == {1: F, 2: H}
    assert (s.segments, s.uniques) == ({}, {})
    assert s.next_ids == {"vm_space": 4, "cursor": 2, "frame": 3, "segment": 1, "unique": 1}
    assert s.kernel_root == KROOT
    assert len(s.kernel_upper) == 256
    assert s.kernel_upper[0] == KL3_LOW | TABLE  # A masked
    assert s.kernel_upper[255] == KL3_HIGH | TABLE
    assert s.kernel_upper[1:255] == (0,) * 254
    assert s.vm_spaces[1].nodes[R1].entries[256:] == s.kernel_upper


def test_read_state_incremental(mem: DictMemory) -> None:
    lay = layout()
    s1 = read_state(mem, lay)
    put(mem, R1_L1, 2, 0)  # unmap va 0x2000: F loses a PTE reference
    set_slot(mem, F, slot_bytes(3, vt=2, storage=b"\x01"))
    set_slot(mem, H, FREE)  # FrameDrop of H's last handle: torn down
    set_reg(mem, 5, entry(abi.REG_FREE))
    s2 = read_state(mem, lay, s1)
    assert s2.parent is s1
    assert s2.changed == frozenset({idx(F), idx(H)})
    assert s2.slot_of(F).paths == frozenset({(0, 0, 0, 1), (0, 1, 0, 0)})
    assert (s2.slot_of(F).rc, s2.slot_of(F).refs) == (3, 2)
    h = s2.slot_of(H)
    assert (h.rc, h.usage, h.vt, h.sto) == (UNUSED, Usage.FRAME, None, None)  # ghost usage survives
    assert s2.slots[idx(R1)] is s1.slots[idx(R1)]
    assert s2.slots[idx(G)] is s1.slots[idx(G)]
    assert s2.frames == {1: F}

    s3 = read_state(mem, lay, s2)  # nothing changed
    assert s3.changed == frozenset()
    assert all(s3.slots[i] is s2.slots[i] for i in range(SLOTS))
    assert s3.slot_of(H).usage == Usage.FRAME

    put(mem, R2_L1, 1, F | LEAF)  # a new PTE to F, metadata untouched: paths/refs change only
    s4 = read_state(mem, lay, s3)
    assert s4.changed == frozenset({idx(F)})
    assert s4.slot_of(F).paths == frozenset({(0, 0, 0, 1), (0, 1, 0, 0), (0, 1, 0, 1)})
    assert (s4.slot_of(F).rc, s4.slot_of(F).refs) == (3, 3)

    set_slot(mem, R2_L1, slot_bytes(1, vt=3, storage=pt_storage(1, 2)))  # nr_children only
    s5 = read_state(mem, lay, s4)
    assert s5.changed == frozenset({idx(R2_L1)})
    assert s5.slot_of(R2_L1).node == NodeMeta(1, 2, False, 0)


def test_fresh_snapshot_of_freed_slot_has_unused_usage(mem: DictMemory) -> None:
    set_slot(mem, H, FREE)
    assert read_state(mem, layout()).slot_of(H).usage == Usage.UNUSED


def test_prev_without_cache_inherits_usage_and_computes_changed(mem: DictMemory) -> None:
    set_slot(mem, H, FREE)
    model = State(
        slots={idx(H): Slot(1, Usage.FRAME, 0, 2, (1, 0))}, vm_spaces={}, cursors={}, frames={},
        segments={}, uniques={},
    )  # fmt: skip
    s = read_state(mem, layout(), model)
    assert s.slot_of(H) == Slot(UNUSED, Usage.FRAME)
    assert s.parent is model
    assert s.changed is not None and idx(H) in s.changed and idx(F) in s.changed
    assert idx(0x100000) not in s.changed  # UNUSED in both


def test_read_state_reports_anomalies(mem: DictMemory) -> None:
    put(mem, R2_L1, 7, 0x80_0000 | LEAF)  # 8 MiB: no metadata slot in 4 MiB of RAM
    put(mem, R2_L3, 9, 0x4000_0000 | TABLE)  # a table beyond RAM
    set_slot(mem, G, slot_bytes(1, vt=77, storage=b"\x01"))
    s = read_state(mem, layout())
    kinds = sorted((a.kind.value, a.path) for a in s.anomalies)  # type: ignore[attr-defined]
    assert kinds == [
        ("bad_type_word", ()),
        ("no_slot", (0, 1, 0, 7)),
        ("no_slot", (0, 9)),
        ("outside_ram", (0, 9)),
    ]
    s2 = read_state(mem, layout(), s)  # the unchanged bad slot is still reported
    assert [a.kind for a in s2.anomalies].count(AnomalyKind.BAD_TYPE_WORD) == 1  # type: ignore[attr-defined]


def test_read_state_rejects_bad_slot_size(mem: DictMemory) -> None:
    from dataclasses import replace

    from hil.errors import AbiError

    with pytest.raises(AbiError):
        read_state(mem, replace(layout(), slot_size=32))
