"""Each guest operation against the real guest, asserting on what the harness reads from guest
memory (page tables, metadata slots, registry), not on the guest's own report of them."""

from __future__ import annotations

import struct

import pytest

from hil.observe.snapshot import walk_user_half
from hil.run.session import Session
from model import ops as m
from model.state import State
from model.types import (
    PAGE_SIZE,
    REF_COUNT_UNIQUE,
    REF_COUNT_UNUSED,
    CachePolicy,
    PageFlags,
    PageProperty,
    PrivFlags,
    PropTransform,
    StorageTag,
    Usage,
    pte_index,
)

GIB = 1 << 30
E = m.ErrorCode
P = m.PanicCode


def ok(s: Session, op: m.Op) -> m.OpResult:
    res = s.apply(op).result
    assert res.status == m.Status.OK, f"{op!r} -> {res!r}"
    return res


def err(s: Session, op: m.Op, code: m.ErrorCode) -> None:
    """The op is rejected with `code` and no byte of state changes."""
    before = state_bytes(s)
    res = s.apply(op).result
    assert res == m.OpResult.err(code), f"{op!r} -> {res!r}, expected {code.name}"
    assert state_bytes(s) == before, f"{op!r} changed state"


def panic(s: Session, op: m.Op, code: m.PanicCode) -> None:
    res = s.apply(op).result
    assert res == m.OpResult.panic(code), f"{op!r} -> {res!r}, expected PANIC {code.name}"
    assert s.response().message, "a panic names its condition"
    s.reset()


def state_bytes(s: Session) -> tuple[bytes, ...]:
    assert s.memory is not None and s.layout is not None
    lay = s.layout
    parts = [
        s.memory.read(lay.meta_base, lay.slot_count * 64),
        s.memory.read(lay.registry_base, lay.registry_entries * lay.registry_entry_size),
    ]
    snap = s.snapshot()
    for view in list(snap.vm_spaces.values()) + list(snap.leaked.values()):
        for paddr in sorted(view.nodes):
            parts.append(s.memory.read(paddr, PAGE_SIZE))
    return tuple(parts)


def new_space(s: Session, start: int = 0, end: int = 1 << 47) -> tuple[int, int]:
    vs = ok(s, m.NewVmSpace()).get("vs")
    c = ok(s, m.OpenCursorMut(vs=vs, start=start, end=end)).get("cursor")
    return vs, c


def frame(s: Session, i: int) -> tuple[int, int]:
    assert s.layout is not None
    paddr = s.layout.data_pool_start + i * PAGE_SIZE
    return ok(s, m.FrameFromUnused(paddr=paddr)).get("frame"), paddr


def new_pt_slots(before: State, after: State) -> dict[int, int]:
    """index -> level of slots that became page-table nodes."""
    out = {}
    for i, a in after.slots.items():
        if before.slot(i).rc == REF_COUNT_UNUSED and a.rc != REF_COUNT_UNUSED and a.usage == Usage.PAGE_TABLE:
            assert a.sto is not None
            out[i] = a.sto[1]
    return out


def test_vm_space_new_copies_kernel_half_into_a_zeroed_root(fresh: Session) -> None:
    s = fresh
    before = s.snapshot()
    vs = ok(s, m.NewVmSpace()).get("vs")
    after = s.snapshot(before)
    view = after.vm_spaces[vs]
    root = after.slot_of(view.root)
    assert root.rc == 1 and root.usage == Usage.PAGE_TABLE and root.sto == (StorageTag.PT_NODE, 4)
    assert new_pt_slots(before, after) == {view.root // PAGE_SIZE: 4}
    entries = struct.unpack("<512Q", s.memory.read(view.root, PAGE_SIZE))  # type: ignore[union-attr]
    assert all(e == 0 for e in entries[:256])
    assert entries[256:] == after.kernel_upper
    # the kernel's level-3 nodes are shared, their ref counts untouched
    for e in set(after.kernel_upper):
        assert after.slot_of(e & 0x000F_FFFF_FFFF_F000).rc == before.slot_of(e & 0x000F_FFFF_FFFF_F000).rc


def test_first_map_allocates_exactly_three_nodes(fresh: Session) -> None:
    s = fresh
    vs, c = new_space(s)
    f, paddr = frame(s, 0)
    va = 0x1234_5000
    ok(s, m.Jump(cursor=c, va=va))
    before = s.snapshot()
    res = ok(s, m.Map(cursor=c, frame=f, prop=PageProperty.rw_user()))
    assert res.get("replaced") == 0
    after = s.snapshot(before)
    fresh_nodes = new_pt_slots(before, after)
    assert sorted(fresh_nodes.values()) == [1, 2, 3]
    for i in fresh_nodes:
        assert after.slots[i].rc == 1 and after.slots[i].refs == 1
    mapping = after.vm_spaces[vs].mappings()[va]
    assert mapping.paddr == paddr and mapping.level == 1
    assert mapping.path == (pte_index(va, 4), pte_index(va, 3), pte_index(va, 2), pte_index(va, 1))
    # the handle's reference moved into the PTE: rc unchanged, handle gone, one path
    slot = after.slot_of(paddr)
    assert slot.rc == 1 and f not in after.frames and slot.paths == {mapping.path}
    # every new node holds exactly one present entry (the rest zeroed)
    for i, level in fresh_nodes.items():
        node = after.vm_spaces[vs].nodes[i * PAGE_SIZE]
        assert sum(1 for e in node.entries if e) == 1, f"level {level}"
        assert after.slots[i].node is not None and after.slots[i].node.nr_children == 1
    cur = after.cursors[c]
    assert cur.va == va + PAGE_SIZE


def test_remap_releases_the_old_frame(fresh: Session) -> None:
    s = fresh
    vs, c = new_space(s)
    fa, pa = frame(s, 0)
    fb, pb = frame(s, 1)
    ok(s, m.Jump(cursor=c, va=0x40_0000))
    ok(s, m.Map(cursor=c, frame=fa))
    ok(s, m.Jump(cursor=c, va=0x40_0000))
    before = s.snapshot()
    res = ok(s, m.Map(cursor=c, frame=fb))
    assert res.get("replaced") == 1 and res.get("old_paddr") == pa
    after = s.snapshot(before)
    assert after.vm_spaces[vs].mappings()[0x40_0000].paddr == pb
    assert before.slot_of(pa).rc == 1 and after.slot_of(pa).rc == REF_COUNT_UNUSED
    assert after.slot_of(pa).usage == Usage.FRAME  # ghost usage survives the free
    assert after.slot_of(pb).rc == 1
    assert 0x40_0000 in s.response().flush_log


def test_query_bumps_rc_and_returns_a_handle(fresh: Session) -> None:
    s = fresh
    vs, c = new_space(s)
    f, paddr = frame(s, 0)
    ok(s, m.Jump(cursor=c, va=0x5000))
    ok(s, m.Map(cursor=c, frame=f, prop=PageProperty(int(PageFlags.R), CachePolicy.WRITETHROUGH, int(PrivFlags.USER))))
    ok(s, m.Jump(cursor=c, va=0x5000))
    before = s.snapshot()
    res = ok(s, m.Query(cursor=c))
    after = s.snapshot(before)
    assert res.get("present") == 1 and res.get("paddr") == paddr
    assert (res.get("start"), res.get("end")) == (0x5000, 0x6000)
    assert PageProperty.decode(res.get("prop")).cache == CachePolicy.WRITETHROUGH
    assert after.slot_of(paddr).rc == before.slot_of(paddr).rc + 1
    assert after.frames[res.get("frame")] == paddr
    # an absent VA: the whole slot at the level where the walk stopped (§5.4)
    ok(s, m.Jump(cursor=c, va=3 * GIB + 0x5000))  # root entry 0 present, level-3 entry 3 absent
    res = ok(s, m.Query(cursor=c))
    assert res.get("present") == 0 and (res.get("start"), res.get("end")) == (3 * GIB, 4 * GIB)
    ok(s, m.Jump(cursor=c, va=(5 << 39) + 0x5000))  # root entry 5 absent
    res = ok(s, m.Query(cursor=c))
    assert res.get("present") == 0 and (res.get("start"), res.get("end")) == (5 << 39, 6 << 39)


def test_unmap_of_a_1gib_range_frees_the_whole_subtree(fresh: Session) -> None:
    s = fresh
    vs, c = new_space(s)
    frames = [frame(s, i) for i in range(3)]
    for i, (f, _) in enumerate(frames):
        ok(s, m.Jump(cursor=c, va=GIB + i * 0x20_0000))  # three L1 nodes under one L2
        ok(s, m.Map(cursor=c, frame=f))
    mid = s.snapshot()
    nodes = set(mid.vm_spaces[vs].nodes) - {mid.vm_spaces[vs].root}
    assert len(nodes) == 1 + 1 + 3
    # jump keeps the level (§5.6): first leave the 1 GiB slot so the cursor pops to level 3,
    # then the unmap starts at the level-3 entry whose whole slot lies in the range (§5.8)
    ok(s, m.Jump(cursor=c, va=0))
    ok(s, m.Jump(cursor=c, va=GIB))
    assert s.snapshot().cursors[c].level == 3
    res = ok(s, m.Unmap(cursor=c, len=GIB))
    assert res.get("num") == 3
    after = s.snapshot(mid)
    remaining = set(after.vm_spaces[vs].nodes) - {after.vm_spaces[vs].root}
    # the L2 node under L3 entry 1 and its L1 children are freed; the L3 node stays
    assert len(remaining) == 1
    for paddr in nodes - remaining:
        slot = after.slot_of(paddr)
        assert slot.rc == REF_COUNT_UNUSED and slot.usage == Usage.PAGE_TABLE and slot.vt is None
    for _, paddr in frames:
        assert after.slot_of(paddr).rc == REF_COUNT_UNUSED and after.slot_of(paddr).paths == frozenset()
    assert after.vm_spaces[vs].mappings() == {}


def test_partial_unmap_leaves_empty_nodes_in_place(fresh: Session) -> None:
    s = fresh
    vs, c = new_space(s)
    f, paddr = frame(s, 0)
    ok(s, m.Jump(cursor=c, va=0x20_0000))
    ok(s, m.Map(cursor=c, frame=f))
    mid = s.snapshot()
    ok(s, m.Jump(cursor=c, va=0x20_0000))
    assert ok(s, m.Unmap(cursor=c, len=PAGE_SIZE)).get("num") == 1
    after = s.snapshot(mid)
    assert set(after.vm_spaces[vs].nodes) == set(mid.vm_spaces[vs].nodes)
    l1 = [n for n in after.vm_spaces[vs].nodes.values() if n.level == 1]
    assert len(l1) == 1 and all(e == 0 for e in l1[0].entries)
    assert after.slot_of(l1[0].paddr).node.nr_children == 0  # type: ignore[union-attr]
    assert after.slot_of(paddr).rc == REF_COUNT_UNUSED
    assert s.response().flush_log == (0x20_0000,)


def test_find_next_jump_virt_addr_protect_next(fresh: Session) -> None:
    s = fresh
    vs, c = new_space(s)
    f, paddr = frame(s, 0)
    ok(s, m.Jump(cursor=c, va=0x7000))
    ok(s, m.Map(cursor=c, frame=f))
    ok(s, m.Jump(cursor=c, va=0x1000))
    res = ok(s, m.FindNext(cursor=c, len=0x10000))
    assert (res.get("found"), res.get("va")) == (1, 0x7000)
    assert ok(s, m.VirtAddr(cursor=c)).get("va") == 0x7000
    assert s.snapshot().cursors[c].va == 0x7000  # the registry, not the guest's report
    before = s.snapshot()
    res = ok(s, m.ProtectNext(cursor=c, len=PAGE_SIZE, transform=PropTransform(clear_flags=int(PageFlags.W),
                                                                                cache=int(CachePolicy.UNCACHEABLE))))
    assert (res.get("found"), res.get("start"), res.get("end")) == (1, 0x7000, 0x8000)
    after = s.snapshot(before)
    pte = after.vm_spaces[vs].mappings()[0x7000].pte
    assert not pte & 0x2 and pte & 0x10 and pte & 0x000F_FFFF_FFFF_F000 == paddr  # RW clear, PCD set
    assert after.slot_of(paddr) == before.slot_of(paddr)


def test_frames_segments_unique(fresh: Session) -> None:
    s = fresh
    assert s.layout is not None
    base = s.layout.data_pool_start
    f = ok(s, m.FrameFromUnused(paddr=base)).get("frame")
    g = ok(s, m.FrameFromInUse(paddr=base)).get("frame")
    st = s.snapshot()
    assert st.slot_of(base).rc == 2 and st.frames[f] == base and st.frames[g] == base
    ok(s, m.FrameDrop(frame=g))
    ok(s, m.FrameDrop(frame=f))
    st = s.snapshot()
    assert st.slot_of(base).rc == REF_COUNT_UNUSED and st.slot_of(base).vt is None
    # frame_from_in_use on a page-table slot works (no usage check, §5.10)
    kr = s.layout.kernel_root
    h = ok(s, m.FrameFromInUse(paddr=kr)).get("frame")
    assert s.snapshot().slot_of(kr).rc == 2
    ok(s, m.FrameDrop(frame=h))
    seg = ok(s, m.SegmentFromUnused(start=base, end=base + 3 * PAGE_SIZE)).get("segment")
    st = s.snapshot()
    assert st.segments[seg] == (base, base + 3 * PAGE_SIZE)
    assert all(st.slot_of(base + i * PAGE_SIZE).rc == 1 for i in range(3))
    clone = ok(s, m.SegmentClone(segment=seg)).get("segment")
    assert s.snapshot().slot_of(base + PAGE_SIZE).rc == 2
    sl = ok(s, m.SegmentSlice(segment=seg, start=PAGE_SIZE, end=2 * PAGE_SIZE)).get("segment")
    st = s.snapshot()
    assert st.segments[sl] == (base + PAGE_SIZE, base + 2 * PAGE_SIZE) and st.slot_of(base + PAGE_SIZE).rc == 3
    assert st.slot_of(base).rc == 2 and st.slot_of(base + 2 * PAGE_SIZE).rc == 2
    err(s, m.SegmentSlice(segment=seg, start=0, end=4 * PAGE_SIZE), E.BAD_ARG)
    err(s, m.SegmentSplit(segment=seg, offset=3 * PAGE_SIZE), E.BAD_ARG)
    ok(s, m.SegmentDrop(segment=sl))
    res = ok(s, m.SegmentSplit(segment=seg, offset=PAGE_SIZE))
    st = s.snapshot()
    assert st.segments[res.get("left")] == (base, base + PAGE_SIZE) and seg not in st.segments
    nf = ok(s, m.SegmentNext(segment=res.get("left"))).get("frame")
    st = s.snapshot()
    assert st.frames[nf] == base and res.get("left") not in st.segments and st.slot_of(base).rc == 2
    ok(s, m.SegmentDrop(segment=clone))
    u = ok(s, m.UniqueFromUnused(paddr=base + 8 * PAGE_SIZE)).get("unique")
    assert s.snapshot().slot_of(base + 8 * PAGE_SIZE).rc == REF_COUNT_UNIQUE
    back = ok(s, m.FromUnique(unique=u)).get("frame")
    assert s.snapshot().slot_of(base + 8 * PAGE_SIZE).rc == 1
    res = ok(s, m.TryFromShared(frame=back))
    assert res.get("ok") == 1 and s.snapshot().uniques[res.get("unique")] == base + 8 * PAGE_SIZE
    ok(s, m.UniqueDrop(unique=res.get("unique")))
    assert s.snapshot().slot_of(base + 8 * PAGE_SIZE).rc == REF_COUNT_UNUSED


def test_every_error_code_and_no_state_change(fresh: Session) -> None:
    s = fresh
    assert s.layout is not None
    base = s.layout.data_pool_start
    vs, c = new_space(s, 0, 1 << 30)
    f, paddr = frame(s, 0)
    ro_vs = ok(s, m.NewVmSpace()).get("vs")
    ro = ok(s, m.OpenCursor(vs=ro_vs, start=0, end=1 << 30)).get("cursor")
    err(s, m.Query(cursor=99), E.BAD_ID)
    err(s, m.Map(cursor=c, frame=99), E.BAD_ID)
    err(s, m.Map(cursor=ro, frame=f), E.WRONG_KIND)
    err(s, m.Unmap(cursor=ro, len=PAGE_SIZE), E.WRONG_KIND)
    err(s, m.FrameFromUnused(paddr=base + 1), E.NOT_ALIGNED)
    err(s, m.FrameFromUnused(paddr=s.layout.ram_size + PAGE_SIZE), E.OUT_OF_BOUND)
    err(s, m.FrameFromInUse(paddr=1 << 40), E.OUT_OF_BOUND)
    err(s, m.OpenCursorMut(vs=vs, start=0, end=PAGE_SIZE), E.CURSOR_BUSY)
    vs2 = ok(s, m.NewVmSpace()).get("vs")
    err(s, m.OpenCursorMut(vs=vs2, start=PAGE_SIZE, end=PAGE_SIZE), E.ACCESS_DENIED)
    err(s, m.OpenCursorMut(vs=vs2, start=1, end=PAGE_SIZE), E.ACCESS_DENIED)
    err(s, m.OpenCursor(vs=vs2, start=0, end=(1 << 47) + PAGE_SIZE), E.ACCESS_DENIED)
    err(s, m.Jump(cursor=c, va=1 << 30), E.INVALID_VADDR)
    err(s, m.FrameFromInUse(paddr=base + PAGE_SIZE), E.UNUSED)
    err(s, m.FrameFromUnused(paddr=paddr), E.IN_USE)
    u = ok(s, m.UniqueFromUnused(paddr=base + 2 * PAGE_SIZE)).get("unique")
    err(s, m.FrameFromInUse(paddr=base + 2 * PAGE_SIZE), E.UNIQUE)
    err(s, m.FrameFromUnused(paddr=base + 2 * PAGE_SIZE), E.UNIQUE)
    err(s, m.DropVmSpace(vs=vs), E.VM_SPACE_BUSY)
    err(s, m.Map(cursor=c, frame=f, prop=PageProperty(int(PageFlags.W))), E.BAD_ARG)  # R missing
    err(s, m.Map(cursor=c, frame=f, prop=PageProperty(0x21)), E.BAD_ARG)  # unknown bit
    err(s, m.ProtectNext(cursor=c, len=PAGE_SIZE, transform=PropTransform(clear_flags=1)), E.BAD_ARG)
    assert u
    # the query above the barrier
    ok(s, m.Jump(cursor=c, va=(1 << 30) - PAGE_SIZE))
    ok(s, m.FindNext(cursor=c, len=PAGE_SIZE))  # runs the cursor to the barrier end
    err(s, m.Query(cursor=c), E.INVALID_VADDR)
    # the registry fills up: NO_SPACE, nothing changes
    res = None
    for _ in range(s.layout.registry_entries + 1):
        res = s.apply(m.FrameFromInUse(paddr=paddr)).result
        if res.status != m.Status.OK:
            break
    assert res == m.OpResult.err(E.NO_SPACE)
    err(s, m.FrameFromInUse(paddr=paddr), E.NO_SPACE)


@pytest.mark.parametrize(
    "make_op, code",
    [
        (lambda c: m.FindNext(cursor=c, len=PAGE_SIZE + 1), P.FIND_NEXT_LEN_UNALIGNED),
        (lambda c: m.FindNext(cursor=c, len=1 << 31), P.FIND_NEXT_PAST_BARRIER),
        (lambda c: m.Unmap(cursor=c, len=3), P.FIND_NEXT_LEN_UNALIGNED),
        (lambda c: m.Jump(cursor=c, va=PAGE_SIZE + 8), P.JUMP_UNALIGNED),
    ],
)
def test_panic_conditions(fresh: Session, make_op, code) -> None:  # type: ignore[no-untyped-def]
    vs, c = new_space(fresh, 0, 1 << 30)
    panic(fresh, make_op(c), code)


def test_map_panics_past_the_barrier_and_on_unsupported_cache(fresh: Session) -> None:
    s = fresh
    vs, c = new_space(s, 0, 2 * PAGE_SIZE)
    f, _ = frame(s, 0)
    ok(s, m.FindNext(cursor=c, len=2 * PAGE_SIZE))
    panic(s, m.Map(cursor=c, frame=f), P.MAP_OUT_OF_RANGE)
    vs, c = new_space(s, 0, 2 * PAGE_SIZE)
    f, paddr = frame(s, 0)
    before = s.snapshot()
    res = s.apply(m.Map(cursor=c, frame=f, prop=PageProperty(1, CachePolicy.WRITE_COMBINING, 1))).result
    assert res == m.OpResult.panic(P.UNSUPPORTED_CACHE)
    # as exec leaves it: set_prop panics in new_page, after map_loop allocated the nodes and
    # the handle was consumed; no leaf written
    after = s.snapshot(before)
    assert sorted(new_pt_slots(before, after).values()) == [1, 2, 3]
    assert f not in after.frames and after.slot_of(paddr).rc == 1 and after.slot_of(paddr).refs == 0
    assert after.cursors[c].level == 1
    s.reset()


def test_tlb_flusher_invalidates_each_page_then_flushes_all_past_the_threshold(fresh: Session) -> None:
    s = fresh
    vs, c = new_space(s)
    for i in range(40):
        f, _ = frame(s, i)
        ok(s, m.Map(cursor=c, frame=f))  # consecutive pages from va 0
    ok(s, m.Jump(cursor=c, va=0))
    ok(s, m.Unmap(cursor=c, len=4 * PAGE_SIZE))
    assert s.response().flush_log == tuple(i * PAGE_SIZE for i in range(4))
    r0 = s.response()
    ok(s, m.Unmap(cursor=c, len=36 * PAGE_SIZE))
    r1 = s.response()
    assert r1.flush_log[-1:] == (2**64 - 1,) and r1.flush_all_total == r0.flush_all_total + 1


def test_activate_and_probe_through_the_mmu(fresh: Session) -> None:
    s = fresh
    assert s.memory is not None
    vs, c = new_space(s)
    f, paddr = frame(s, 0)
    s.memory.write(paddr, (0x1122334455667788).to_bytes(8, "little"))
    ok(s, m.Jump(cursor=c, va=0x10_0000))
    ok(s, m.Map(cursor=c, frame=f, prop=PageProperty(int(PageFlags.R), CachePolicy.WRITEBACK, int(PrivFlags.USER))))
    ok(s, m.Activate(vs=vs))
    res = ok(s, m.Probe(va=0x10_0000, write=False, value=0))
    assert res.get("faulted") == 0 and res.get("value") == 0x1122334455667788
    res = ok(s, m.Probe(va=0x10_0000, write=True, value=5))  # read-only: faults, WP is on
    assert res.get("faulted") == 1 and res.get("cr2") == 0x10_0000 and res.get("error_code") & 0x3 == 0x3
    res = ok(s, m.Probe(va=0x20_0000, write=False, value=0))  # unmapped
    assert res.get("faulted") == 1 and res.get("cr2") == 0x20_0000 and res.get("error_code") & 1 == 0
    ok(s, m.Activate(vs=0))
    assert s.cr3() & ~0xFFF == s.layout.kernel_root  # type: ignore[union-attr]


def raw_rc(s: Session, paddr: int) -> int:
    """The ref_count word of `paddr`'s metadata slot, read from guest memory (storage is 40 bytes)."""
    assert s.memory is not None and s.layout is not None
    return int.from_bytes(s.memory.read(s.layout.meta_base + 64 * (paddr // PAGE_SIZE) + 40, 8), "little")


def test_dropped_vm_space_frees_its_tree_and_releases_each_pte(fresh: Session) -> None:
    s = fresh
    vs, c = new_space(s)
    f0, p0 = frame(s, 0)
    f1, p1 = frame(s, 1)
    ok(s, m.Map(cursor=c, frame=f0))
    ok(s, m.Map(cursor=c, frame=f1))
    ok(s, m.Jump(cursor=c, va=GIB))  # a second L2/L1 path, the same frame again
    ok(s, m.Map(cursor=c, frame=ok(s, m.FrameFromInUse(paddr=p0)).get("frame")))
    keep = ok(s, m.FrameFromInUse(paddr=p1)).get("frame")  # p1: one PTE and one handle
    ok(s, m.DropCursor(cursor=c))
    ok(s, m.Activate(vs=vs))  # dropping the active VmSpace must leave CR3 on a live root
    before = s.snapshot()
    nodes = sorted(walk_user_half(s.memory, before.vm_spaces[vs].root).nodes)  # type: ignore[arg-type]
    assert len(nodes) == 6  # root, L3, two L2 and two L1 nodes
    assert (raw_rc(s, p0), raw_rc(s, p1)) == (2, 2)
    ok(s, m.DropVmSpace(vs=vs))
    after = s.snapshot(before)
    assert vs not in after.vm_spaces and vs not in after.leaked
    for pa in nodes:  # every node of the user tree torn down (drop_last_in_place)
        assert raw_rc(s, pa) == REF_COUNT_UNUSED, hex(pa)
        assert s.memory.read(s.layout.meta_base + 64 * (pa // PAGE_SIZE), 64)[:40] == bytes(40)  # type: ignore[union-attr]
    assert raw_rc(s, p0) == REF_COUNT_UNUSED  # two PTEs: 2 -> 0
    assert raw_rc(s, p1) == 1  # one PTE: 2 -> 1, the handle keeps it
    assert after.frames[keep] == p1
    # the kernel's shared level-3 nodes are untouched
    for e in set(after.kernel_upper):
        assert after.slot_of(e & 0x000F_FFFF_FFFF_F000).rc == before.slot_of(e & 0x000F_FFFF_FFFF_F000).rc
    assert s.cr3() & ~0xFFF == s.layout.kernel_root  # type: ignore[union-attr]
    # the guest still runs: a new VmSpace reuses the freed nodes
    vs2, _ = new_space(s)
    assert s.snapshot().vm_spaces[vs2].root in nodes


def test_random_raw_requests_never_crash_or_hang(fresh: Session) -> None:
    """Arbitrary op codes and argument words: the guest answers every one (no hang, no triple
    fault); only probe / raise_fault may end in a CPU exception."""
    import random

    from hil.target import abi

    s = fresh
    assert s.layout is not None
    rng = random.Random(5)
    words = [0, 1, 2, 3, 7, 0xFFF, 0x1000, 0x20_0000, 1 << 30, 1 << 39, (1 << 47) - 0x1000, 1 << 47, 2**63,
             2**64 - 1, s.layout.data_pool_start, s.layout.kernel_root, s.layout.meta_base, 0x404]  # fmt: skip
    allowed_exception = {abi.SPEC_BY_CLASS[m.Probe].code, abi.SPEC_BY_CLASS[m.RaiseFault].code}
    statuses: dict[str, int] = {}
    for _ in range(400):
        code = rng.randrange(0, abi.OP_SPECS[-1].code + 4)
        resp = s.apply_raw(code, [rng.choice(words) for _ in range(abi.NR_ARGS)])
        statuses[resp.status.name] = statuses.get(resp.status.name, 0) + 1
        assert resp.status in (m.Status.OK, m.Status.ERR, m.Status.PANIC) or (
            resp.status == m.Status.EXCEPTION and code in allowed_exception
        ), (code, resp)
        if resp.status in (m.Status.PANIC, m.Status.EXCEPTION):
            s.reset()
    assert statuses.get("OK", 0) > 20 and statuses.get("ERR", 0) > 100, statuses


def test_map_of_a_page_table_node_handle_is_refused_and_changes_no_byte(fresh: Session) -> None:
    """map takes a UFrame; from_in_use on a page-table node gives a Frame<dyn AnyFrameMeta>
    (registry w1 = REG_FRAME_TYPE_OTHER) that exec's types cannot pass to map: ERR NOT_UFRAME,
    and no byte of guest RAM changes except the mailbox and the dead part of the op's stack."""
    from hil.target import abi

    s = fresh
    assert s.memory is not None and s.layout is not None
    vs, c = new_space(s)
    f, _ = frame(s, 0)
    ok(s, m.Map(cursor=c, frame=f))  # a tree with an L1 node
    snap = s.snapshot()
    l1 = next(n.paddr for n in snap.vm_spaces[vs].nodes.values() if n.level == 1)
    for target in (snap.vm_spaces[vs].root, l1, s.layout.meta_base, s.layout.kernel_root):
        h = ok(s, m.FrameFromInUse(paddr=target)).get("frame")
        typed = dict(ok(s, m.FrameFromInUse(paddr=target)).values)  # a second one, dropped below
        ram_before = s.memory.read(0, s.layout.ram_size)
        res = s.apply(m.Map(cursor=c, frame=h)).result
        ram_after = s.memory.read(0, s.layout.ram_size)
        assert res == m.OpResult.err(E.NOT_UFRAME), res
        allowed = [(s.layout.mailbox, s.layout.mailbox + abi.MAILBOX_SIZE)]
        bottom = s.elf.vaddr_to_paddr(s.elf.symbol("boot_stack_bottom"))
        allowed.append((bottom, bottom + s.elf.symbol("boot_stack_top") - s.elf.symbol("boot_stack_bottom")))
        rec = s.elf.symbols["op_recover"]
        allowed.append((s.elf.vaddr_to_paddr(rec[0]), s.elf.vaddr_to_paddr(rec[0]) + rec[1]))
        bell = s.elf.vaddr_to_paddr(s.elf.symbol("hil_doorbell"))  # rung once per op (op_done.S)
        allowed.append((bell, bell + 8))
        changed = [i for i in range(0, len(ram_before), 8) if ram_before[i : i + 8] != ram_after[i : i + 8]]
        stray = [hex(i) for i in changed if not any(lo <= i < hi for lo, hi in allowed)]
        assert not stray, f"map of a non-UFrame handle changed RAM at {stray[:8]}"
        # the handle's type as the guest recorded it, read from the registry in guest memory
        reg = s.memory.read(s.layout.registry_base, s.layout.registry_entries * abi.REGISTRY_ENTRY_SIZE)
        words = [struct.unpack_from("<8Q", reg, i * abi.REGISTRY_ENTRY_SIZE) for i in range(s.layout.registry_entries)]
        (entry,) = [w for w in words if w[0] == abi.REG_FRAME and w[1] == h]
        assert entry[2:4] == (target, abi.REG_FRAME_TYPE_OTHER)
        ok(s, m.FrameDrop(frame=h))
        ok(s, m.FrameDrop(frame=typed["frame"]))
    # a data frame's from_in_use handle is a UFrame and maps
    g = ok(s, m.FrameFromInUse(paddr=frame(s, 1)[1])).get("frame")
    ok(s, m.Map(cursor=c, frame=g))
