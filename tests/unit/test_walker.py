"""The SDM walker, the OSTD leaf view and the QEMU `info tlb` / `info mem` rendering, on
hand-built page tables in DictMemory. PTE values are spelled out bit by bit here (not taken
from hil.observe.snapshot or model.types) so the tests check the decoder, not restate it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.observe.snapshot import (
    AnomalyKind,
    NonCanonicalAddress,
    Outcome,
    TlbLine,
    WalkError,
    canonical,
    compare_info_mem,
    compare_info_tlb,
    decode_pte,
    format_hmp,
    is_canonical,
    leaf_mappings,
    ostd_leaves,
    parse_info_mem,
    parse_info_tlb,
    qemu_view,
    render_info_mem,
    render_info_tlb,
    translate,
    user_leaf_mappings,
    walk_tree,
    walk_user_half,
)
from hil.target.memory import DictMemory, PhysReadError
from model.state import VmSpaceView
from model.types import CachePolicy, PageFlags, PageProperty, PrivFlags, pte_new_page, pte_new_pt

P, RW, US, PWT, PCD, A, D, B7, G = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63
TABLE = P | RW | US  # what OSTD writes for a table pointer

RAM = 16 << 20
ROOT, L3, L2, L1 = 0x1000, 0x2000, 0x3000, 0x4000


def put(mem: DictMemory, table: int, index: int, value: int) -> None:
    mem.write_u64(table + 8 * index, value)


def va_of(i4: int, i3: int, i2: int, i1: int, off: int = 0) -> int:
    return (i4 << 39) | (i3 << 30) | (i2 << 21) | (i1 << 12) | off


def chain(mem: DictMemory, i4: int = 1, i3: int = 2, i2: int = 3) -> None:
    put(mem, ROOT, i4, L3 | TABLE)
    put(mem, L3, i3, L2 | TABLE)
    put(mem, L2, i2, L1 | TABLE)


@pytest.fixture
def mem() -> DictMemory:
    return DictMemory(RAM)


# --- memory fake --------------------------------------------------------------------------
def test_dict_memory_zero_fill_and_bounds() -> None:
    m = DictMemory(0x3000)
    m.write(0x0FFE, b"\x01\x02\x03\x04")  # crosses a page boundary
    assert m.read(0x0FFC, 8) == b"\0\0\x01\x02\x03\x04\0\0"
    assert m.read(0x2000, 16) == bytes(16)
    with pytest.raises(PhysReadError):
        m.read(0x2FFC, 8)
    with pytest.raises(PhysReadError):
        m.write(0x3000, b"x")
    with pytest.raises(PhysReadError):
        m.read(-8, 8)


# --- single entries -----------------------------------------------------------------------
def test_decode_l1_leaf_bit7_is_pat_not_huge() -> None:
    pte = decode_pte(0x0000_0000_0012_3000 | P | RW | US | B7 | NX, 1)
    assert pte.leaf and pte.p and pte.rw and pte.us and pte.nx
    assert pte.pat and not pte.ps
    assert (pte.addr, pte.size) == (0x123000, 4096)
    assert pte.reserved is None


def test_decode_flags_each_bit() -> None:
    raw = 0x5000 | P | PWT | PCD | A | D | G
    pte = decode_pte(raw, 1)
    assert (pte.pwt, pte.pcd, pte.a, pte.d, pte.g) == (True, True, True, True, True)
    assert (pte.rw, pte.us, pte.nx, pte.pat) == (False, False, False, False)
    assert pte.flags() == "P PWT PCD A D G"


def test_decode_address_mask_bits_12_to_51() -> None:
    raw = (0xFFFF_FFFF_FFFF_FFFF & ~(1 << 7)) | P  # every bit except 7
    pte = decode_pte(raw, 2)  # a table pointer at level 2
    assert not pte.leaf
    assert pte.addr == 0x000F_FFFF_FFFF_F000


def test_decode_large_leaves_align_frame_and_pat12() -> None:
    two = decode_pte(0x0060_0000 | (1 << 12) | P | B7, 2)
    assert two.leaf and two.ps and two.pat
    assert (two.addr, two.size, two.reserved) == (0x600000, 2 << 20, None)
    one = decode_pte(0x8000_0000 | P | B7, 3)
    assert one.leaf and one.ps and not one.pat
    assert (one.addr, one.size) == (0x8000_0000, 1 << 30)
    bad = decode_pte(0x0060_2000 | P | B7, 2)  # bit 13 set below 2 MiB alignment
    assert bad.reserved is not None


def test_decode_pml4e_bit7_reserved() -> None:
    pte = decode_pte(0x2000 | P | B7, 4)
    assert not pte.leaf and not pte.ps
    assert pte.reserved == "PS (bit 7) set in a PML4E"


def test_decode_not_present_is_not_leaf_even_with_bit7() -> None:
    pte = decode_pte(0x7000 | B7 | RW | US, 1)  # OSTD leaf with R cleared
    assert not pte.p and not pte.leaf


# --- translate ----------------------------------------------------------------------------
def test_translate_absent_root_entry(mem: DictMemory) -> None:
    t = translate(mem, ROOT, va_of(1, 2, 3, 4))
    assert t.outcome is Outcome.NOT_PRESENT
    assert t.level == 4
    assert [(s.level, s.entry_paddr, s.raw) for s in t.steps] == [(4, ROOT + 8, 0)]
    assert t.pa is None


def test_translate_4k_leaf_ostd_style(mem: DictMemory) -> None:
    chain(mem)
    put(mem, L1, 4, 0x0012_3000 | P | RW | US | B7 | NX)
    t = translate(mem, ROOT | PWT | PCD, va_of(1, 2, 3, 4, 0xABC))  # CR3 flag bits ignored
    assert t.outcome is Outcome.LEAF
    assert (t.pa, t.page_size, t.level) == (0x123ABC, 4096, 1)
    assert [s.entry_paddr for s in t.steps] == [ROOT + 8, L3 + 16, L2 + 24, L1 + 32]
    assert (t.writable, t.user, t.executable) == (True, True, False)
    assert "pa 0x123abc" in t.describe()


def test_translate_absent_l1_entry(mem: DictMemory) -> None:
    chain(mem)
    t = translate(mem, ROOT, va_of(1, 2, 3, 5))
    assert (t.outcome, t.level, len(t.steps)) == (Outcome.NOT_PRESENT, 1, 4)


def test_translate_2m_and_1g(mem: DictMemory) -> None:
    chain(mem)
    put(mem, L2, 7, 0x0040_0000 | P | RW | B7)
    put(mem, L3, 9, 0xC000_0000 | P | B7 | G)  # pa beyond RAM: the MMU translates it anyway
    t2 = translate(mem, ROOT, va_of(1, 2, 7, 0x12, 0x345))
    assert (t2.outcome, t2.pa, t2.page_size, t2.level) == (Outcome.LEAF, 0x412345, 2 << 20, 2)
    assert t2.user is False  # leaf lacks US
    t1 = translate(mem, ROOT, va_of(1, 9, 0x1FF, 0x1FF, 0xFFF))
    assert (t1.outcome, t1.pa, t1.page_size) == (Outcome.LEAF, 0xC000_0000 + (1 << 30) - 1, 1 << 30)
    assert t1.writable is False


def test_effective_permissions_combine_levels(mem: DictMemory) -> None:
    put(mem, ROOT, 1, L3 | P | US)  # no RW at level 4
    put(mem, L3, 2, L2 | P | RW | US | NX)  # NX at level 3
    put(mem, L2, 3, L1 | P | RW)  # no US at level 2
    put(mem, L1, 4, 0x9000 | P | RW | US | B7)
    t = translate(mem, ROOT, va_of(1, 2, 3, 4))
    assert (t.writable, t.user, t.executable) == (False, False, False)
    (leaf,) = leaf_mappings(mem, ROOT)
    assert (leaf.writable, leaf.user, leaf.executable) == (False, False, False)
    assert leaf.pte.rw and leaf.pte.us and not leaf.pte.nx


def test_canonical_edges(mem: DictMemory) -> None:
    assert is_canonical(0x7FFF_FFFF_F000)
    assert is_canonical(0xFFFF_8000_0000_0000)
    assert not is_canonical(0x0000_8000_0000_0000)
    assert not is_canonical(0xFFFF_7FFF_FFFF_F000)
    assert canonical(0x8000_0000_0000) == 0xFFFF_8000_0000_0000
    assert canonical(0x7FFF_FFFF_F000) == 0x7FFF_FFFF_F000
    put(mem, ROOT, 255, L3 | TABLE)
    put(mem, L3, 511, L2 | TABLE)
    put(mem, L2, 511, L1 | TABLE)
    put(mem, L1, 511, 0xA000 | P | US | B7)
    put(mem, ROOT, 256, 0x5000 | TABLE)
    put(mem, 0x5000, 0, 0x6000 | TABLE)
    put(mem, 0x6000, 0, 0x20_0000 | P | RW | B7 | G)
    top = translate(mem, ROOT, 0x7FFF_FFFF_F008)
    assert (top.outcome, top.pa, top.steps[0].entry_paddr) == (Outcome.LEAF, 0xA008, ROOT + 8 * 255)
    kern = translate(mem, ROOT, 0xFFFF_8000_0000_0010)
    assert (kern.outcome, kern.pa, kern.steps[0].entry_paddr) == (Outcome.LEAF, 0x20_0010, ROOT + 8 * 256)
    with pytest.raises(NonCanonicalAddress, match="0x800000000000"):
        translate(mem, ROOT, 0x0000_8000_0000_0000)
    with pytest.raises(NonCanonicalAddress):
        translate(mem, ROOT, 0xFFFF_7FFF_FFFF_F000)
    user = user_leaf_mappings(mem, ROOT)
    assert [lf.va for lf in user] == [0x7FFF_FFFF_F000]
    both = leaf_mappings(mem, ROOT)  # both halves unless the name says user
    assert [(lf.va, lf.pa, lf.size) for lf in both] == [
        (0x7FFF_FFFF_F000, 0xA000, 4096),
        (0xFFFF_8000_0000_0000, 0x20_0000, 2 << 20),
    ]


def test_translate_table_outside_ram(mem: DictMemory) -> None:
    put(mem, ROOT, 0, 0x10_0000_0000 | TABLE)
    t = translate(mem, ROOT, 0x1000)
    assert (t.outcome, t.level) == (Outcome.OUTSIDE_RAM, 3)
    assert len(t.steps) == 1


def test_translate_reserved(mem: DictMemory) -> None:
    put(mem, ROOT, 0, L3 | P | B7)
    assert translate(mem, ROOT, 0).outcome is Outcome.RESERVED


# --- whole trees --------------------------------------------------------------------------
def test_walk_tree_nodes_paths_and_ad_masking(mem: DictMemory) -> None:
    put(mem, ROOT, 1, L3 | TABLE | A)
    put(mem, L3, 2, L2 | TABLE | A)
    put(mem, L2, 3, L1 | TABLE)
    put(mem, L1, 4, 0x9000 | P | RW | US | B7 | A | D)
    put(mem, ROOT, 300, 0x7000 | TABLE)  # kernel half: not followed by walk_user_half
    w = walk_user_half(mem, ROOT)
    assert w.anomalies == []
    assert {p: (n.level, n.path) for p, n in w.nodes.items()} == {
        ROOT: (4, ()), L3: (3, (1,)), L2: (2, (1, 2)), L1: (1, (1, 2, 3)),
    }  # fmt: skip
    assert w.nodes[ROOT].entries[1] == L3 | TABLE
    assert w.nodes[L1].entries[4] == 0x9000 | P | RW | US | B7
    assert w.nodes[ROOT].entries[300] == 0x7000 | TABLE  # present in the root's entries
    assert w.raw_entries[L1][4] & (A | D) == A | D
    (leaf,) = user_leaf_mappings(mem, ROOT)
    assert leaf.pte.a and leaf.pte.d  # the MMU view keeps the raw bits
    full = walk_tree(mem, ROOT)  # both halves by default
    assert 0x7000 in full.nodes and full.nodes[0x7000].path == (300,)


def test_walk_tree_reports_pointer_outside_ram(mem: DictMemory) -> None:
    chain(mem)
    put(mem, L1, 0, 0x9000 | P | B7)
    put(mem, L3, 5, 0x4000_0000 | TABLE)  # 1 GiB: beyond the 16 MiB of RAM
    w = walk_tree(mem, ROOT)
    assert [(a.kind, a.path, a.level, a.paddr) for a in w.anomalies] == [
        (AnomalyKind.OUTSIDE_RAM, (1, 5), 3, L3 + 8 * 5)
    ]
    assert set(w.nodes) == {ROOT, L3, L2, L1}
    with pytest.raises(WalkError, match="outside_ram"):
        leaf_mappings(mem, ROOT)
    sink: list = []
    leaves = leaf_mappings(mem, ROOT, anomalies=sink)
    assert [lf.va for lf in leaves] == [va_of(1, 2, 3, 0)]
    assert [a.kind for a in sink] == [AnomalyKind.OUTSIDE_RAM]


def test_walk_tree_root_outside_ram(mem: DictMemory) -> None:
    w = walk_tree(mem, RAM)
    assert w.nodes == {}
    assert [a.kind for a in w.anomalies] == [AnomalyKind.OUTSIDE_RAM]


def test_walk_tree_reports_loop_and_shared_node(mem: DictMemory) -> None:
    chain(mem)
    put(mem, L3, 7, L2 | TABLE)  # a second parent for L2
    put(mem, L2, 9, ROOT | TABLE)  # a loop back to the root
    w = walk_tree(mem, ROOT)
    got = sorted((a.kind.value, a.path) for a in w.anomalies)
    assert got == [("shared_node", (1, 2, 9)), ("shared_node", (1, 7))]
    assert w.nodes[L2].path == (1, 2)  # first reached
    assert len(w.nodes) == 4


def test_reserved_root_bit7_reported(mem: DictMemory) -> None:
    put(mem, ROOT, 3, 0x4000_0000 | P | B7)
    sink: list = []
    assert leaf_mappings(mem, ROOT, anomalies=sink) == []
    assert [(a.kind, a.path) for a in sink] == [(AnomalyKind.RESERVED, (3,))]


def test_misaligned_2m_leaf_left_out_and_reported(mem: DictMemory) -> None:
    chain(mem)
    put(mem, L2, 8, 0x0040_2000 | P | B7)
    sink: list = []
    assert leaf_mappings(mem, ROOT, anomalies=sink) == []
    assert [(a.kind, a.path) for a in sink] == [(AnomalyKind.RESERVED, (1, 2, 8))]
    assert translate(mem, ROOT, va_of(1, 2, 8, 0)).outcome is Outcome.RESERVED


# --- OSTD view vs MMU view ------------------------------------------------------------------
def test_ostd_view_includes_leaf_with_r_cleared(mem: DictMemory) -> None:
    chain(mem)
    put(mem, L1, 1, 0x9000 | P | RW | US | B7)
    put(mem, L1, 2, 0xA000 | RW | US | B7)  # protect_next cleared R: bit 0 clear, bit 7 kept
    put(mem, L1, 3, 0xB000 | P | US)  # level 1 without bit 7: still a leaf for both
    put(mem, L1, 4, 0xC000 | RW)  # bit 0 and bit 7 clear: absent for both
    mmu = [(lf.va, lf.pa) for lf in leaf_mappings(mem, ROOT)]
    assert mmu == [(va_of(1, 2, 3, 1), 0x9000), (va_of(1, 2, 3, 3), 0xB000)]
    w = walk_tree(mem, ROOT)
    ostd = [(m.va, m.paddr, m.path) for m in ostd_leaves(w.nodes, ROOT)]
    assert ostd == [
        (va_of(1, 2, 3, 1), 0x9000, (1, 2, 3, 1)),
        (va_of(1, 2, 3, 2), 0xA000, (1, 2, 3, 2)),
        (va_of(1, 2, 3, 3), 0xB000, (1, 2, 3, 3)),
    ]
    assert translate(mem, ROOT, va_of(1, 2, 3, 2)).outcome is Outcome.NOT_PRESENT


def test_walker_agrees_with_ostd_encoder(mem: DictMemory) -> None:
    """The independent decoder against model.types' encoder, and ostd_leaves against the
    model's own VmSpaceView.mappings()."""
    put(mem, ROOT, 0, pte_new_pt(L3))
    put(mem, L3, 0, pte_new_pt(L2))
    put(mem, L2, 0, pte_new_pt(L1))
    rw_user = PageProperty(int(PageFlags.R | PageFlags.W), CachePolicy.WRITEBACK, int(PrivFlags.USER))
    rx_uc_global = PageProperty(
        int(PageFlags.R | PageFlags.X), CachePolicy.UNCACHEABLE, int(PrivFlags.USER | PrivFlags.GLOBAL)
    )
    wt_kernel = PageProperty(int(PageFlags.W), CachePolicy.WRITETHROUGH, 0)  # R cleared
    put(mem, L1, 1, pte_new_page(0x9000, rw_user))
    put(mem, L1, 2, pte_new_page(0xA000, rx_uc_global))
    put(mem, L1, 3, pte_new_page(0xB000, wt_kernel))
    leaves = {lf.va: lf for lf in leaf_mappings(mem, ROOT)}
    a, b = leaves[0x1000], leaves[0x2000]
    assert (a.pa, a.writable, a.user, a.executable, a.pte.pat, a.pte.pcd, a.pte.pwt) == (
        0x9000, True, True, False, True, False, False,
    )  # fmt: skip
    assert (b.pa, b.writable, b.user, b.executable, b.pte.g, b.pte.pcd, b.pte.pwt) == (
        0xA000, False, True, True, True, True, False,
    )  # fmt: skip
    assert 0x3000 not in leaves  # no R: not present to the MMU
    w = walk_tree(mem, ROOT)
    ours = {m.va: m for m in ostd_leaves(w.nodes, ROOT)}
    theirs = VmSpaceView(1, ROOT, w.nodes).mappings()
    assert ours == theirs
    assert set(ours) == {0x1000, 0x2000, 0x3000}
    assert decode_pte(ours[0x3000].pte, 1).pwt


# --- QEMU info tlb / info mem -------------------------------------------------------------
# Hand-written in the exact format of QEMU 7.2 target/i386/monitor.c (print_pte / mem_print)
# for the tree built by `qemu_tree` below.
INFO_TLB_SAMPLE = """\
(qemu) info tlb
0000000000400000: 0000000000900000 X---A--UW
0000000000401000: 0000000000901000 X-------W
0000000000402000: 0000000000902000 -----C-U-
0000000000600000: 0000000000a00000 --P-----W
00007ffffffff000: 0000000000b00000 X--D---UW
ffff800000000000: 0000000000000000 XGPDA-T-W
"""
INFO_MEM_SAMPLE = """\
0000000000400000-0000000000401000 0000000000001000 urw
0000000000401000-0000000000402000 0000000000001000 -rw
0000000000402000-0000000000403000 0000000000001000 ur-
0000000000600000-0000000000800000 0000000000200000 -rw
00007ffffffff000-ffff800000000000 0000000000001000 urw
ffff800000000000-ffff800000200000 0000000000200000 -rw
"""


def qemu_tree(mem: DictMemory) -> None:
    put(mem, ROOT, 0, L3 | TABLE)
    put(mem, L3, 0, L2 | TABLE)
    put(mem, L2, 2, L1 | TABLE)  # va 0x400000
    put(mem, L1, 0, 0x90_0000 | P | RW | US | B7 | NX | A)
    put(mem, L1, 1, 0x90_1000 | P | RW | B7 | NX)
    put(mem, L1, 2, 0x90_2000 | P | US | B7 | PCD)
    put(mem, L1, 3, 0x90_3000 | RW | US | B7)  # OSTD leaf with R cleared: not shown by QEMU
    put(mem, L2, 3, 0xA0_0000 | P | RW | B7)  # 2 MiB at 0x600000
    put(mem, ROOT, 255, 0x5000 | TABLE)
    put(mem, 0x5000, 511, 0x6000 | TABLE)
    put(mem, 0x6000, 511, 0x7000 | TABLE)
    put(mem, 0x7000, 511, 0xB0_0000 | P | RW | US | B7 | NX | D)
    put(mem, ROOT, 256, 0x8000 | TABLE)
    put(mem, 0x8000, 0, 0xC000 | P | RW)  # no US in the kernel half
    put(mem, 0xC000, 0, 0x0 | P | RW | B7 | G | NX | A | D | PWT)


def test_parse_info_tlb_sample() -> None:
    lines = parse_info_tlb(INFO_TLB_SAMPLE)
    assert len(lines) == 6
    assert (lines[0].va, lines[0].pa, lines[0].flags) == (0x400000, 0x900000, "X---A--UW")
    assert (lines[-1].va, lines[-1].pa, lines[-1].flags) == (0xFFFF_8000_0000_0000, 0, "XGPDA-T-W")
    assert format_hmp(lines) == INFO_TLB_SAMPLE.split("\n", 1)[1]


def test_parse_info_mem_sample() -> None:
    ranges = parse_info_mem(INFO_MEM_SAMPLE)
    assert [(r.start, r.end, r.size, r.prot) for r in ranges][3:5] == [
        (0x600000, 0x800000, 0x200000, "-rw"),
        (0x7FFF_FFFF_F000, 0xFFFF_8000_0000_0000, 0x1000, "urw"),  # QEMU's canonical end quirk
    ]
    assert format_hmp(ranges) == INFO_MEM_SAMPLE


def test_parse_rejects_other_output() -> None:
    with pytest.raises(ValueError, match="PG disabled"):
        parse_info_tlb("PG disabled\n")
    with pytest.raises(ValueError):
        parse_info_mem("0000000000400000: 0000000000900000 X---A--UW\n")


def test_walker_renders_like_qemu(mem: DictMemory) -> None:
    qemu_tree(mem)
    tlb, mem_ranges = qemu_view(mem, ROOT)
    assert compare_info_tlb(parse_info_tlb(INFO_TLB_SAMPLE), tlb) == []
    assert compare_info_mem(parse_info_mem(INFO_MEM_SAMPLE), mem_ranges) == []
    assert format_hmp(mem_ranges) == INFO_MEM_SAMPLE


def test_compare_reports_entry_differences(mem: DictMemory) -> None:
    qemu_tree(mem)
    put(mem, L1, 1, 0x90_1000 | P | RW | US | B7 | NX)  # US now set: one tlb line, mem merges
    put(mem, L1, 4, 0x91_0000 | P | B7)  # one more page
    leaves = leaf_mappings(mem, ROOT, user_half=False)
    diffs = compare_info_tlb(parse_info_tlb(INFO_TLB_SAMPLE), render_info_tlb(leaves))
    assert [(d.key, d.qemu is None, d.ours is None) for d in diffs] == [
        (0x401000, False, False),
        (0x404000, True, False),
    ]
    ours = diffs[0].ours
    assert isinstance(ours, TlbLine) and ours.flags == "X------UW"
    mdiffs = compare_info_mem(parse_info_mem(INFO_MEM_SAMPLE), render_info_mem(leaves))
    assert [d.key for d in mdiffs] == [0x400000, 0x401000, 0x404000]
    merged = render_info_mem(leaves)[0]
    assert (merged.start, merged.end, merged.prot) == (0x400000, 0x402000, "urw")


def test_compare_ignore_ad() -> None:
    q = parse_info_tlb("0000000000400000: 0000000000900000 X--DA--UW\n")
    o = parse_info_tlb("0000000000400000: 0000000000900000 X------UW\n")
    assert len(compare_info_tlb(q, o)) == 1
    assert compare_info_tlb(q, o, ignore_ad=True) == []


# Captured from QEMU 7.2 (`hmp info tlb` / `info mem` at the guest's op loop, kernel root):
# the linear map and the kernel image, both as 32 2 MiB pages.
DATA = Path(__file__).resolve().parents[1] / "data"


def test_captured_qemu72_output_parses_and_is_reproduced(mem: DictMemory) -> None:
    tlb_text = (DATA / "qemu72_info_tlb.txt").read_text()
    mem_text = (DATA / "qemu72_info_mem.txt").read_text()
    tlb = parse_info_tlb(tlb_text)
    assert len(tlb) == 64
    assert tlb[0] == TlbLine(0xFFFF_8000_0000_0000, 0, "X-PDA---W")
    assert tlb[32] == TlbLine(0xFFFF_FFFF_8000_0000, 0, "--PDA---W")
    assert tlb[63] == TlbLine(0xFFFF_FFFF_83E0_0000, 0x3E0_0000, "--P-----W")
    ranges = parse_info_mem(mem_text)
    assert [str(r) for r in ranges] == [
        "ffff800000000000-ffff800004000000 0000000004000000 -rw",
        "ffffffff80000000-ffffffff84000000 0000000004000000 -rw",
    ]
    # the same tree by hand: root[256] -> linear map, root[511] -> L3[510] -> kernel image
    put(mem, ROOT, 256, L3 | P | RW)
    put(mem, L3, 0, L2 | P | RW)
    put(mem, ROOT, 511, 0x5000 | P | RW)
    put(mem, 0x5000, 510, 0x6000 | P | RW)
    for i in range(32):
        put(mem, L2, i, (i << 21) | P | RW | B7 | NX | (A | D if i < 2 else 0))
        put(mem, 0x6000, i, (i << 21) | P | RW | B7 | (A | D if i == 0 else 0))
    ours_tlb, ours_mem = qemu_view(mem, ROOT)
    assert format_hmp(ours_tlb) == tlb_text
    assert format_hmp(ours_mem) == mem_text
