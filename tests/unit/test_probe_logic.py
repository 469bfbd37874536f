"""The MMU-probe verdicts on hand-built page tables and hand-written probe outcomes (no QEMU):
a probe must agree with the tables after the op; where exec issues no invalidation
(protect_next) the tables before the op are accepted too; markers tell frames apart."""

from __future__ import annotations

import struct

from hil.check import Kind, oracles
from hil.target import abi
from hil.target.memory import DictMemory
from model.state import State, VmSpaceView

RAM = 16 << 20
MAILBOX = 0x1000
ROOT, L3, L2, L1 = 0x10000, 0x11000, 0x12000, 0x13000
POOL = 0x100000
FRAME_A, FRAME_B = POOL, POOL + 0x1000
VA = 0x5000
P, RW, US, NX = 1, 2, 4, 1 << 63


def layout() -> abi.Layout:
    return abi.Layout(abi.LAYOUT_MAGIC, abi.ABI_VERSION, RAM, 0x200000, 64, RAM // 4096, ROOT, 0, 64, 16,
                      MAILBOX, 0x10000, 0x100000, POOL, RAM, 0, 0, 0)  # fmt: skip


def tables(leaf: int) -> DictMemory:
    mem = DictMemory(RAM)
    for table, child in ((ROOT, L3), (L3, L2), (L2, L1)):
        mem.write(table, struct.pack("<Q", child | P | RW | US))
    mem.write(L1 + 8 * (VA >> 12), struct.pack("<Q", leaf))
    for frame in (FRAME_A, FRAME_B):
        mem.write(frame, struct.pack("<Q", oracles.marker(frame)))
    return mem


def state() -> State:
    return State(slots={}, vm_spaces={1: VmSpaceView(1, ROOT, {})}, cursors={}, frames={}, segments={}, uniques={})


def outcome(mem: DictMemory, plan: oracles.ProbePlan, results: list[tuple[int, int]]) -> None:
    """What the guest writes back: (outcome word, value) per entry."""
    for i, (e, (word, value)) in enumerate(zip(plan.entries, results, strict=True)):
        mem.write(MAILBOX + abi.OFF_PROBES + abi.PROBE_ENTRY_SIZE * i, struct.pack("<4Q", e.va, e.mode, word, value))


def plan_for(probes: oracles.MmuProbes, coherent: bool, *modes: int) -> oracles.ProbePlan:
    entries = tuple(oracles.ProbeEntry(VA, mode) for mode in modes)
    return oracles.ProbePlan(1, ROOT, entries, coherent, ((VA, probes.expect(ROOT, VA)),))


FAULT = abi.PROBE_FAULT | 0x7 << 8
OK = abi.PROBE_OK


def test_an_access_the_new_tables_refuse_is_a_tlb_finding() -> None:
    mem = tables(FRAME_A | P | RW | US)
    probes = oracles.MmuProbes(mem, layout())
    plan = plan_for(probes, True, abi.PROBE_READ, abi.PROBE_WRITE)
    mem.write(L1 + 8 * (VA >> 12), struct.pack("<Q", 0))  # the op unmapped VA
    outcome(mem, plan, [(OK, oracles.marker(FRAME_A)), (OK, 0)])  # ... and the MMU still had it
    found = probes.check(5, plan, state())
    assert [(f.kind, f.op_index, f.clause, f.field, f.va) for f in found] == [
        (Kind.TLB, 5, "PROBE", "read", VA), (Kind.TLB, 5, "PROBE", "write", VA)
    ]  # fmt: skip
    outcome(mem, plan, [(FAULT, 0), (FAULT, 0)])
    assert probes.check(5, plan, state()) == []


def test_a_stale_frame_shows_in_the_marker() -> None:
    mem = tables(FRAME_A | P | RW | US)
    probes = oracles.MmuProbes(mem, layout())
    plan = plan_for(probes, True, abi.PROBE_READ)
    mem.write(L1 + 8 * (VA >> 12), struct.pack("<Q", FRAME_B | P | RW | US))  # re-mapped to B
    outcome(mem, plan, [(OK, oracles.marker(FRAME_A))])
    found = probes.check(0, plan, state())
    assert [(f.field, f.guest, f.model) for f in found] == [("value", oracles.marker(FRAME_A), oracles.marker(FRAME_B))]


def test_without_an_invalidation_the_old_translation_is_accepted_but_not_a_third() -> None:
    mem = tables(FRAME_A | P | RW | US)
    probes = oracles.MmuProbes(mem, layout())
    plan = plan_for(probes, False, abi.PROBE_WRITE, abi.PROBE_EXEC)
    mem.write(L1 + 8 * (VA >> 12), struct.pack("<Q", FRAME_A | P | US | NX))  # protect: read-only, NX
    outcome(mem, plan, [(OK, 0), (OK, 0)])  # the TLB kept W and X: allowed, no flush was due
    assert probes.check(0, plan, state()) == []
    outcome(mem, plan, [(FAULT, 0), (FAULT, 0)])  # it followed the new tables: right too
    assert probes.check(0, plan, state()) == []
    coherent = plan_for(probes, True, abi.PROBE_WRITE)
    outcome(mem, coherent, [(OK, 0)])  # where exec flushes, the old translation is a finding
    assert [f.field for f in probes.check(0, coherent, state())] == ["write"]


def test_a_probe_the_guest_did_not_run_is_reported() -> None:
    mem = tables(FRAME_A | P | RW | US)
    probes = oracles.MmuProbes(mem, layout())
    plan = plan_for(probes, True, abi.PROBE_READ)
    outcome(mem, plan, [(0, 0)])
    assert [f.field for f in probes.check(0, plan, state())] == ["not_run"]


def test_expect_carries_u_from_every_level_and_smap_refuses_a_user_page() -> None:
    probes = oracles.MmuProbes(tables(FRAME_A | P | RW | US), layout())
    user = probes.expect(ROOT, VA)
    assert user.user and user.allows(abi.PROBE_READ) and not user.allows(abi.PROBE_SMAP | abi.PROBE_READ)
    sup = oracles.MmuProbes(tables(FRAME_A | P | RW), layout()).expect(ROOT, VA)
    assert not sup.user and sup.allows(abi.PROBE_SMAP | abi.PROBE_READ)
    mem = tables(FRAME_A | P | RW | US)
    mem.write(L2, struct.pack("<Q", L1 | P | RW))  # U clear one level up: the page is supervisor
    assert not oracles.MmuProbes(mem, layout()).expect(ROOT, VA).user
    unmapped = oracles.MmuProbes(tables(0), layout()).expect(ROOT, VA)
    assert not unmapped.allows(abi.PROBE_SMAP | abi.PROBE_READ) and not unmapped.user


def test_a_stale_u_bit_is_a_tlb_finding_where_exec_flushes() -> None:
    mem = tables(FRAME_A | P | RW)  # supervisor before the op
    probes = oracles.MmuProbes(mem, layout())
    smap = abi.PROBE_SMAP | abi.PROBE_READ
    plan = plan_for(probes, True, abi.PROBE_READ, smap)
    loose = plan_for(probes, False, smap)  # no flush due (protect_next): the old U is right too
    mem.write(L1 + 8 * (VA >> 12), struct.pack("<Q", FRAME_A | P | RW | US))  # re-map: now user
    mark = oracles.marker(FRAME_A)
    outcome(mem, plan, [(OK, mark), (OK, mark)])  # the AC-clear read still passed: old U
    found = probes.check(3, plan, state())
    assert [(f.kind, f.op_index, f.field, f.guest, f.model) for f in found] == [
        (Kind.TLB, 3, "user", "supervisor (no fault)", "user (fault)")
    ]  # fmt: skip
    assert "SMAP" in found[0].message
    outcome(mem, plan, [(OK, mark), (FAULT, 0)])  # SMAP refused it: the MMU follows the new U
    assert probes.check(3, plan, state()) == []
    outcome(mem, loose, [(OK, mark)])
    assert probes.check(3, loose, state()) == []
    outcome(mem, loose, [(OK, oracles.marker(FRAME_B))])  # but not another frame's bytes
    assert [f.kind for f in probes.check(3, loose, state())] == [Kind.TLB]


def test_a_u_probe_the_guest_could_not_run_is_reported() -> None:
    mem = tables(FRAME_A | P | RW | US)
    probes = oracles.MmuProbes(mem, layout())
    assert not probes.user_probed  # the layout says no SMAP: plan() adds no U read
    plan = plan_for(probes, True, abi.PROBE_SMAP | abi.PROBE_READ)
    outcome(mem, plan, [(0, 0)])  # what a guest without SMAP leaves
    assert [f.field for f in probes.check(0, plan, state())] == ["not_run"]
