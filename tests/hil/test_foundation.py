"""The foundation against the real guest: boot, the mailbox drive, physical reads, the walker
against QEMU's own view, CPU exceptions reported (never a hang)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

from hil.observe.snapshot import (
    compare_info_mem,
    compare_info_tlb,
    parse_info_mem,
    parse_info_tlb,
    qemu_view,
    walk_tree,
)
from hil.run.session import DEFAULT_IMAGE, Session
from hil.target import abi
from hil.target.memory import GdbPhysMemory
from model import ops as m
from model.types import REF_COUNT_UNUSED, Usage


def _state_bytes(s: Session) -> dict[str, bytes]:
    """Every byte the harness treats as state: metadata region, registry, kernel PT pages."""
    assert s.memory is not None and s.layout is not None
    lay = s.layout
    out = {
        "meta": s.memory.read(lay.meta_base, lay.slot_count * lay.slot_size),
        "registry": s.memory.read(lay.registry_base, lay.registry_entries * lay.registry_entry_size),
    }
    for paddr in sorted(walk_tree(s.memory, lay.kernel_root).nodes):
        out[f"pt@{paddr:#x}"] = s.memory.read(paddr, 4096)
    return out


def test_boot_reaches_op_loop_and_layout_is_sane(session: Session) -> None:
    lay = session.layout
    assert lay is not None
    assert lay.magic == abi.LAYOUT_MAGIC and lay.abi_version == abi.ABI_VERSION
    assert (63 << 20) <= lay.ram_size <= 64 << 20
    assert lay.slot_size == 64 and lay.slot_count == lay.ram_size // 4096
    assert lay.meta_base % 4096 == 0 and lay.meta_base + lay.slot_count * 64 <= lay.ram_size
    assert lay.pt_pool_start < lay.pt_pool_end <= lay.data_pool_start < lay.data_pool_end <= lay.ram_size
    # the guest stopped at hil_op_done and runs on its kernel root
    assert session.cr3() & ~0xFFF == lay.kernel_root
    # slots as OSTD boots them: the metadata region's own frames are in use as META, the
    # data pool is UNUSED
    mem = session.memory
    assert mem is not None
    meta_slot = lay.meta_base + 64 * (lay.meta_base // 4096)
    rc, vt = struct.unpack("<QQ", mem.read(meta_slot + 40, 16))
    assert rc == 1 and vt == Usage.META
    free_slot = lay.meta_base + 64 * (lay.data_pool_start // 4096)
    assert struct.unpack("<Q", mem.read(free_slot + 40, 8))[0] == REF_COUNT_UNUSED


def _tb_flushes(s: Session) -> int:
    assert s.machine is not None
    found = re.search(r"TB flush count\s+(\d+)", s.machine.hmp("info jit"))
    assert found, "no TB flush count in QEMU's `info jit`"
    return int(found.group(1))


def test_each_op_stops_at_the_doorbell_and_qemu_keeps_its_translated_code(session: Session) -> None:
    """The drive's stop is the write watchpoint on hil_doorbell (guest/hil/op_done.S): one ring
    per op, the guest stopped right after it, and no TB flush (a breakpoint stop flushes every
    translated block in QEMU 7.2, and the next op ran retranslated)."""
    assert session.memory is not None and session.stub is not None
    doorbell = session.elf.vaddr_to_paddr(session.elf.symbol("hil_doorbell"))
    rings = struct.unpack("<Q", session.memory.read(doorbell, 8))[0]
    flushes = _tb_flushes(session)
    for value in range(5):
        session.apply(m.Nop(value=value))
    assert struct.unpack("<Q", session.memory.read(doorbell, 8))[0] == rings + 5
    assert session.stub.stop_pc() == session.elf.symbol("hil_op_done_rung")
    assert _tb_flushes(session) == flushes


def test_an_image_without_the_doorbell_is_driven_with_the_breakpoint(tmp_path: Path) -> None:
    """An image built before hil_doorbell (stripped here) still runs: the stub stops on the
    breakpoint at hil_op_done, resumes past its nop, and a fast reset comes back to it."""
    stripped = tmp_path / "kernel.elf"
    subprocess.run(["objcopy", "--strip-symbol=hil_doorbell", "--strip-symbol=hil_op_done_rung",
                    str(DEFAULT_IMAGE), str(stripped)], check=True)  # fmt: skip
    shutil.copy(DEFAULT_IMAGE.with_suffix(".bin"), tmp_path / "kernel.bin")
    s = Session(image=stripped)
    s.boot()
    try:
        assert s.stub is not None and s.stub.stop_pc() == s.elf.symbol("hil_op_done")
        for value in range(3):
            assert s.apply(m.Nop(value=value)).result == m.OpResult.ok(value=value)
        assert s.apply(m.RaiseFault(kind=0)).result.status == m.Status.EXCEPTION
        s.reset()
        assert s.resets == 1 and s.apply(m.Nop(value=7)).result == m.OpResult.ok(value=7)
        assert s.stub.stop_pc() == s.elf.symbol("hil_op_done")
    finally:
        s.close()


def test_kernel_root_upper_half_points_at_level3_nodes(session: Session) -> None:
    assert session.memory is not None and session.layout is not None
    root = session.memory.read(session.layout.kernel_root, 4096)
    entries = struct.unpack("<512Q", root)
    for i in range(256, 512):
        assert entries[i] & 1, f"kernel root entry {i} is absent"
        assert not entries[i] & 0x80, f"kernel root entry {i} is a leaf"


def test_nop_round_trips_with_seq_echoed(session: Session) -> None:
    seq_before = session.seq
    obs = session.apply(m.Nop(value=0xDEADBEEF))
    assert obs.seq == seq_before + 1
    assert obs.response.seq == obs.seq
    assert obs.result == m.OpResult.ok(value=0xDEADBEEF)


def test_unknown_op_is_an_error_and_changes_no_byte(session: Session) -> None:
    before = _state_bytes(session)
    resp = session.apply_raw(0x7777, [1, 2, 3])
    assert resp.status == m.Status.ERR and resp.code == m.ErrorCode.UNKNOWN_OP
    resp = session.apply_raw(0, [])
    assert resp.status == m.Status.ERR and resp.code == m.ErrorCode.UNKNOWN_OP
    after = _state_bytes(session)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key] == after[key], f"{key} changed"


def test_shared_ram_and_gdb_physical_reads_agree(session: Session) -> None:
    assert session.memory is not None and session.layout is not None and session.gdb is not None
    lay = session.layout
    session.apply(m.NewVmSpace())  # some user page table too
    gdb_mem = GdbPhysMemory(session.gdb, lay.ram_size)
    try:
        regions = [(lay.meta_base, lay.slot_count * 64), (lay.registry_base, 4096), (lay.mailbox, 4096)]
        regions += [(p, 4096) for p in sorted(walk_tree(session.memory, lay.kernel_root).nodes)[:40]]
        for paddr, size in regions:
            assert gdb_mem.read(paddr, size) == session.memory.read(paddr, size), f"{paddr:#x}+{size:#x}"
    finally:
        gdb_mem.close()


def test_cpu_exception_is_reported_with_disassembly(fresh: Session) -> None:
    obs = fresh.apply(m.RaiseFault(kind=0))
    assert obs.result.status == m.Status.EXCEPTION
    assert obs.response.exc_vector == 6  # #UD
    assert any(line.startswith("=>") and "ud2" in line for line in obs.disassembly), obs.disassembly
    func = fresh.elf.function_at(obs.response.exc_rip)
    assert func is not None
    obs = fresh.apply(m.RaiseFault(kind=1))
    assert obs.result.status == m.Status.EXCEPTION and obs.response.exc_vector == 13  # #GP
    obs = fresh.apply(m.RaiseFault(kind=2))
    assert obs.result.status == m.Status.EXCEPTION and obs.response.exc_vector == 14  # #PF
    assert obs.response.exc_cr2 != 0
    assert "CPU exception vector 14" in obs.describe_exception()
    # and the guest still answers
    assert fresh.apply(m.Nop(value=7)).result == m.OpResult.ok(value=7)


def test_walker_matches_qemu_info_tlb_and_info_mem(session: Session) -> None:
    """Our walker's view of the CR3 the CPU runs on equals QEMU's own, entry by entry."""
    assert session.machine is not None and session.memory is not None
    cr3 = session.cr3() & ~0xFFF
    qemu_tlb = parse_info_tlb(session.machine.hmp("info tlb"))
    qemu_mem = parse_info_mem(session.machine.hmp("info mem"))
    ours_tlb, ours_mem = qemu_view(session.memory, cr3)
    assert any(line.va == 0xFFFF_8000_0000_0000 for line in qemu_tlb)  # the linear map
    assert compare_info_tlb(qemu_tlb, ours_tlb) == []
    assert compare_info_mem(qemu_mem, ours_mem) == []
    # and a user root loaded into CR3 through `activate`, with a mapping in it
    s = session
    vs = s.apply(m.NewVmSpace()).result.get("vs")
    c = s.apply(m.OpenCursorMut(vs=vs, start=0x40_0000, end=0x80_0000)).result.get("cursor")
    f = s.apply(m.FrameFromUnused(paddr=s.layout.data_pool_start)).result.get("frame")  # type: ignore[union-attr]
    assert s.apply(m.Map(cursor=c, frame=f)).result.status == m.Status.OK
    s.apply(m.DropCursor(cursor=c))
    assert s.apply(m.Activate(vs=vs)).result.status == m.Status.OK
    try:
        user_cr3 = s.cr3() & ~0xFFF
        assert user_cr3 != cr3
        qemu_tlb = parse_info_tlb(s.machine.hmp("info tlb"))  # type: ignore[union-attr]
        ours_tlb, _ = qemu_view(s.memory, user_cr3)  # type: ignore[arg-type]
        assert any(line.va == 0x40_0000 and line.pa == s.layout.data_pool_start for line in ours_tlb)  # type: ignore[union-attr]
        assert compare_info_tlb(qemu_tlb, ours_tlb) == []
    finally:
        s.apply(m.Activate(vs=0))


def test_gdb_only_session_sees_the_same_state() -> None:
    """Without the shared RAM file (a remote QEMU), everything goes through the gdb stub."""
    ops = [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=1 << 40), m.FrameFromUnused(paddr=0x80_0000),
           m.Map(cursor=1, frame=1), m.Query(cursor=1)]  # fmt: skip
    states = []
    for shared in (True, False):
        s = Session(shared_ram=shared)
        try:
            s.boot()
            results = [s.apply(op).result for op in ops]
            states.append((results, s.snapshot()))
        finally:
            s.close()
    (r1, s1), (r2, s2) = states
    assert r1 == r2 and all(r.status == m.Status.OK for r in r1)
    assert s1.slots == s2.slots and s1.vm_spaces == s2.vm_spaces and s1.frames == s2.frames


def test_bench_prints_every_mode_and_writes_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from hil.workflows import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--ops", "15", "--gdb-only-ops", "3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["modes"]) == {"default", "no-check", "sequential", "gdb-only"}
    assert data["modes"]["default"]["ops"] == 15 and data["modes"]["default"]["ops_per_s"] > 0
    assert data["modes"]["no-check"]["us_per_op"]["check"] == 0
