"""The fast reset (no new QEMU) gives a machine byte-identical to a fresh boot; the footprint
snapshot is exactly the full one over a random workload (both modes)."""

from __future__ import annotations

import struct

import pytest

from hil.check import Kind
from hil.observe.snapshot import AnomalyKind, walk_tree
from hil.run.runner import Runner
from hil.run.session import KERNEL_LOAD_PADDR, Session
from hil.run.workload import Workload, WorkloadConfig
from hil.target.stub import Stub
from model import ops as m


def _ram_that_matters(s: Session) -> dict[str, bytes]:
    """Kernel image (boot tables, mailbox, .data, .bss with the stacks), registry, metadata,
    kernel tables: everything below the page-table pool; then the whole pool."""
    assert s.memory is not None and s.layout is not None
    lay = s.layout
    return {
        "kernel image": s.memory.read(KERNEL_LOAD_PADDR, lay.registry_base - KERNEL_LOAD_PADDR),
        "mailbox": s.memory.read(lay.mailbox, 4096),
        "registry": s.memory.read(lay.registry_base, lay.registry_entries * lay.registry_entry_size),
        "metadata": s.memory.read(lay.meta_base, lay.slot_count * lay.slot_size),
        "rest below the pool": s.memory.read(lay.meta_base + lay.slot_count * lay.slot_size,
                                             lay.pt_pool_start - lay.meta_base - lay.slot_count * lay.slot_size),
        "page-table pool": s.memory.read(lay.pt_pool_start, lay.pt_pool_end - lay.pt_pool_start),
    }  # fmt: skip


def _dirty(s: Session) -> None:
    """Ops that write every kind of state, an activated user root, then a panic and an
    exception; a snapshot after each op, as the checked run takes them."""
    state = s.snapshot()

    def do(op: m.Op) -> m.OpResult:
        nonlocal state
        res = s.apply(op).result
        state = s.snapshot(state)
        return res

    vs = do(m.NewVmSpace()).get("vs")
    assert s.layout is not None
    c = do(m.OpenCursorMut(vs=vs, start=0x40_0000, end=0x4000_0000)).get("cursor")
    for k in range(3):
        f = do(m.FrameFromUnused(paddr=s.layout.data_pool_start + 4096 * k)).get("frame")
        assert do(m.Map(cursor=c, frame=f)).status == m.Status.OK
    do(m.DropCursor(cursor=c))
    assert do(m.Activate(vs=vs)).status == m.Status.OK
    assert do(m.Probe(va=0x40_0000, write=True, value=0x1234)).status == m.Status.OK
    assert do(m.FrameFromUnused(paddr=1 << 50)).status in (m.Status.PANIC, m.Status.ERR)
    assert do(m.RaiseFault(kind=2)).status == m.Status.EXCEPTION


@pytest.mark.parametrize("shared", [True, False], ids=["default", "gdb-only"])
def test_fast_reset_is_byte_identical_to_a_fresh_boot(shared: bool) -> None:
    fresh = Session(shared_ram=shared)
    used = Session(shared_ram=shared)
    try:
        fresh.boot()
        want = _ram_that_matters(fresh)
        assert isinstance(fresh.gdb, Stub)
        want_regs = fresh.gdb.read_registers()
        used.boot()
        assert used.machine is not None
        qemu_pid = used.machine.pid
        _dirty(used)
        assert used.cr3() & ~0xFFF != used.layout.kernel_root  # type: ignore[union-attr]
        before = _ram_that_matters(used)
        assert before["registry"] != want["registry"] and before["metadata"] != want["metadata"]
        used.reset()
        assert used.resets == 1 and used.boots == 1 and used.machine.pid == qemu_pid  # same QEMU
        got = _ram_that_matters(used)
        for name in want:
            assert got[name] == want[name], f"{name} differs from a fresh boot's after the reset"
        assert isinstance(used.gdb, Stub)
        assert used.gdb.read_registers() == want_regs  # CR3 included: the kernel root again
        # and the machine runs on from there like a fresh one, its TLB flushed
        assert used.apply(m.Probe(va=0x40_0000, write=False, value=0)).result.get("faulted") == 1  # unmapped now
        assert used.apply(m.Nop(value=5)).result == m.OpResult.ok(value=5)
        assert used.seq == fresh.seq + 2
    finally:
        used.close()
        fresh.close()


@pytest.mark.parametrize("shared", [True, False], ids=["default", "gdb-only"])
def test_reset_state_reads_back_as_the_boot_state(shared: bool) -> None:
    s = Session(shared_ram=shared)
    try:
        s.boot()
        boot = s.snapshot()
        _dirty(s)
        s.reset()
        again = s.snapshot()
        assert again.slots == boot.slots and again.vm_spaces == boot.vm_spaces and again.frames == boot.frames
        assert again.next_ids == boot.next_ids and again.kernel_upper == boot.kernel_upper
        assert not again.anomalies
    finally:
        s.close()


def _footprint_run(shared: bool, ops: int) -> None:
    s = Session(shared_ram=shared, full_every=1)  # every snapshot also read in full and compared
    runner = Runner(s, probes=False)
    try:
        runner.start()
        assert s.layout is not None
        runner.run(Workload(7, s.layout, WorkloadConfig(panic_rate=0.05)), count=ops)  # resets too
        assert s.full_reads >= ops - runner.stats.reboots
        assert s.unlogged == 0
        unlogged = [f for r in runner.records for f in r.findings if AnomalyKind.UNLOGGED.value in (f.message or "")]
        assert unlogged == []
        # and the resets in between gave the model a guest it agrees with
        impl = [f for r in runner.records for f in r.findings if f.kind == Kind.IMPL]
        assert impl == [], impl[:3]
        assert runner.stats.reboots > 0 and s.boots == 1
    finally:
        s.close()


def test_footprint_snapshot_equals_full_read_default_mode() -> None:
    _footprint_run(True, 250)


def test_footprint_snapshot_equals_full_read_gdb_only() -> None:
    _footprint_run(False, 60)


def test_a_write_outside_every_footprint_is_caught_by_the_full_read() -> None:
    """A byte changed behind the harness's back (not a poke: no footprint names it) is found
    by the next full read, as an UNLOGGED anomaly naming the slot."""
    s = Session(full_every=3)
    try:
        s.boot()
        assert s.memory is not None and s.layout is not None
        state = s.snapshot()
        victim = s.layout.data_pool_end // 4096 - 1
        s.memory.write(s.layout.meta_base + 64 * victim + 56, struct.pack("<Q", 1))  # in_list
        seen = []
        for _ in range(3):
            s.apply(m.Nop(value=1))
            state = s.snapshot(state)
            seen.append([a for a in state.anomalies if getattr(a, "kind", None) is AnomalyKind.UNLOGGED])
        assert seen[0] == [] and seen[1] == []  # the footprint reads did not look there
        assert any(f"slot {victim} " in str(a) for a in seen[2]), seen[2]
        assert state.slots[victim].inl == 1  # and the full read is the state
    finally:
        s.close()


def test_kernel_tables_unchanged_by_reset(fresh: Session) -> None:
    assert fresh.memory is not None and fresh.layout is not None
    nodes = walk_tree(fresh.memory, fresh.layout.kernel_root, user_half=False).nodes
    assert fresh.layout.kernel_root in nodes and len(nodes) > 2


def test_reset_returns_to_a_marked_reset_point() -> None:
    from hil.workflows.bench import prepare_mappings

    s = Session()
    try:
        s.boot()
        prepare_mappings(s, 20)
        marked = s.snapshot()
        s.mark_reset_point(marked)
        want = _ram_that_matters(s)
        state = s.snapshot(marked)
        for op in (m.NewVmSpace(), m.RaiseFault(kind=1)):
            s.apply(op)
            state = s.snapshot(state)
        s.reset()
        assert s.boots == 1 and s.resets == 1
        again = s.snapshot()
        assert sum(len(v.mappings()) for v in again.vm_spaces.values()) == 20
        assert again.slots == marked.slots and again.vm_spaces == marked.vm_spaces
        got = _ram_that_matters(s)
        assert all(got[k] == want[k] for k in want), [k for k in want if got[k] != want[k]]
    finally:
        s.close()


def test_gdb_mi_driver_is_interchangeable() -> None:
    """driver="gdb" runs the same session through gdb/MI (a Target too); its reset reboots."""
    s = Session(driver="gdb")
    try:
        s.boot()
        state = s.snapshot()
        assert not isinstance(s.gdb, Stub)
        assert s.apply(m.NewVmSpace()).result.status == m.Status.OK
        state = s.snapshot(state)
        assert list(state.vm_spaces) == [1]
        assert s.cr3() & ~0xFFF == s.layout.kernel_root  # type: ignore[union-attr]
        s.reset()
        assert s.boots == 2 and s.resets == 0 and s.snapshot().vm_spaces == {}
    finally:
        s.close()


def test_a_poke_the_reset_cannot_undo_makes_it_a_reboot() -> None:
    """The fast reset keeps kernel data, registry, metadata and pool bytes; a poke into the
    kernel's own tables is none of those: the next reset starts a new QEMU."""
    s = Session()
    try:
        s.boot()
        assert s.layout is not None and s.memory is not None
        state = s.snapshot()
        entry = s.layout.kernel_root + 8 * 384  # an upper-half entry the guest never uses
        s.poke(entry, struct.pack("<Q", s.read_u64(entry) ^ (1 << 63)))
        state = s.snapshot(state)
        assert not s.can_fast_reset()
        s.reset()
        assert s.boots == 2 and s.resets == 0
        state = s.snapshot()
        s.poke(s.layout.meta_base + 64 * 5000 + 56, struct.pack("<Q", 1))  # a slot: restorable
        s.apply(m.Nop(value=1))
        s.snapshot(state)
        assert s.can_fast_reset()
        s.reset()
        assert s.boots == 2 and s.resets == 1
        assert struct.unpack("<Q", s.memory.read(s.layout.meta_base + 64 * 5000 + 56, 8)) == (0,)
    finally:
        s.close()
