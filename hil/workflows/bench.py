"""Throughput of the checked run, mode beside mode in one run, plus scaling rows (scripts/bench).

Never a timed assertion: this prints (and optionally writes as JSON) what it measured.

Modes: `default` (stub drive, shared RAM file, every check), `no-check` (the same loop with the
model and the checks off), `gdb-only` (no shared RAM file: memory through the stub's `m`/`M`
packets), `sequential` (default without the overlap: op k checked before op k+1 is sent; see
hil/run/runner.py Runner.run). Per op: drive (request, resume, stop, response), snapshot, model, check, reset (the
way back to a booted guest after a panic / exception, amortised over all ops); with the overlap,
model and check run while the guest runs the next op, so the parts add up to more than the
wall time per op (1 / ops/s), which is what the ratios and the scaling rows compare. Ratios: to the
no-check loop, and to the ~2,300 stops/s a remote-protocol client gets out of QEMU's stub
(NOTES: ~0.43 ms per continue->stop).

Scaling rows: the same op mix (the default workload, same seed) run from a guest prepared with
10 / 1,000 / 10,000 live 4 KiB mappings (one VmSpace, far from the workload's hot regions; the
prepared state is the reset target), and at 64 MiB and 1 GiB of guest RAM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hil.run.runner import Runner
from hil.run.session import Session
from hil.run.workload import Workload
from hil.target.machine import Profile
from model import ops as m

STUB_LIMIT_STOPS_PER_S = 2300
MODES = {
    # name: (shared RAM file, checks on, op k checked while the guest runs op k+1)
    "default": (True, True, True),
    "no-check": (True, False, True),
    "sequential": (True, True, False),
    "gdb-only": (False, True, True),  # overlap needs the shared RAM file: one at a time
}
SCALING_ROWS = "default:10,default:1000,default:10000,big:10,big:1000"
PREPARED_VA = 0x1000_0000_0000  # root entry 32: no workload hot region (hil/run/workload.py HOT_BASES)


def _per_op(runner: Runner, n: int) -> dict[str, float]:
    st = runner.stats
    n = max(n, 1)
    return {"drive": 1e6 * st.drive_s / n, "snapshot": 1e6 * st.snapshot_s / n, "model": 1e6 * st.model_s / n,
            "check": 1e6 * st.check_s / n, "reset": 1e6 * st.reset_s / n}  # fmt: skip


def measure(mode: str, ops: int, seed: int) -> dict[str, Any]:
    shared, checked, overlap = MODES[mode]
    session = Session(shared_ram=shared)
    runner = Runner(session, check_enabled=checked, overlap=overlap)
    try:
        t0 = time.perf_counter()
        runner.start()
        boot = time.perf_counter() - t0
        assert session.layout is not None
        t1 = time.perf_counter()
        runner.run(Workload(seed, session.layout), count=ops)
        elapsed = time.perf_counter() - t1
    finally:
        session.close()
    st = runner.stats
    return {
        "ops": st.total_ops, "ops_per_s": st.total_ops / elapsed if elapsed else 0.0, "boot_s": boot,
        "us_per_op": _per_op(runner, st.total_ops), "reboots": st.reboots, "fast_resets": session.resets,
        "boots": session.boots, "full_reads": session.full_reads, "unlogged": session.unlogged,
    }  # fmt: skip


def measure_reset(count: int = 20) -> dict[str, float]:
    """The way back after a CPU exception, alone: restore (RAM + registers) and the snapshot
    that follows it, median over `count` exceptions (default mode)."""
    session = Session()
    restore: list[float] = []
    total: list[float] = []
    try:
        session.boot()
        state = session.snapshot()
        for _ in range(count):
            assert session.apply(m.RaiseFault(kind=0)).result.status == m.Status.EXCEPTION
            session.snapshot(state)  # as the checked run does after every op
            t0 = time.perf_counter()
            session.reset()
            t1 = time.perf_counter()
            state = session.snapshot()
            t2 = time.perf_counter()
            restore.append(t1 - t0)
            total.append(t2 - t0)
        assert session.boots == 1, "the reset started a new QEMU"
    finally:
        session.close()
    return {"restore_ms": 1e3 * statistics.median(restore), "reset_ms": 1e3 * statistics.median(total)}


def prepare_mappings(session: Session, count: int) -> None:
    """`count` live 4 KiB mappings in a new VmSpace at PREPARED_VA, frames from the top of the
    data pool, handles dropped (the registry holds 2,048 entries); made the reset target."""
    assert session.layout is not None
    lay = session.layout
    if count > (lay.data_pool_end - lay.data_pool_start) // 4096 - 1024:
        raise ValueError(f"{count} mappings do not fit in the data pool (the workload keeps its first 1,024 frames)")
    vs = session.apply(m.NewVmSpace()).result.get("vs")
    cur = session.apply(m.OpenCursorMut(vs=vs, start=PREPARED_VA, end=PREPARED_VA + 4096 * count)).result.get("cursor")
    for k in range(count):
        frame = session.apply(m.FrameFromUnused(paddr=lay.data_pool_end - 4096 * (k + 1))).result.get("frame")
        if session.apply(m.Map(cursor=cur, frame=frame)).result.status != m.Status.OK:
            raise RuntimeError(f"preparing mapping {k} failed")
        session.apply(m.FrameDrop(frame=frame))
    session.apply(m.DropCursor(cursor=cur))


def measure_scaling(profile: str, mappings: int, ops: int, seed: int) -> dict[str, Any]:
    session = Session(profile=Profile.load(profile))
    runner = Runner(session)
    try:
        t0 = time.perf_counter()
        runner.start()
        boot = time.perf_counter() - t0
        t1 = time.perf_counter()
        prepare_mappings(session, mappings)
        runner.state = session.snapshot()
        session.mark_reset_point(runner.state)
        prep = time.perf_counter() - t1
        leaves = sum(len(v.mappings()) for v in runner.state.vm_spaces.values())
        assert session.layout is not None
        t2 = time.perf_counter()
        runner.run(Workload(seed, session.layout), count=ops)
        elapsed = time.perf_counter() - t2
    finally:
        session.close()
    st = runner.stats
    return {
        "profile": profile, "ram_mib": session.profile.memory_mib, "mappings": leaves, "ops": st.total_ops,
        "ops_per_s": st.total_ops / elapsed if elapsed else 0.0, "us_per_op": _per_op(runner, st.total_ops),
        "boot_s": boot, "prepare_s": prep, "reboots": st.reboots,
    }  # fmt: skip


def _row(name: str, r: dict[str, Any], base: float) -> str:
    u = r["us_per_op"]
    ops = r["ops_per_s"]
    return (f"{name:22} {ops:8.1f} {u['drive']:7.0f} {u['snapshot']:8.0f} {u['model']:6.0f} {u['check']:6.0f} "
            f"{u['reset']:6.0f} {ops / base if base else 0:8.2f}x {ops / STUB_LIMIT_STOPS_PER_S:7.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description="throughput of the checked run per mode")
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--gdb-only-ops", type=int, default=200)
    parser.add_argument("--scaling-ops", type=int, default=1000,
                        help="ops per scaling row (0: no scaling rows); long enough that the first check "
                             "of a big table (our render of every node: kept for the next) amortises as in a run")
    parser.add_argument("--scaling", default="", metavar="PROFILE:MAPPINGS,...",
                        help=f"scaling rows (scripts/bench: {SCALING_ROWS})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if min(args.ops, args.gdb_only_ops) < 1 or args.scaling_ops < 0:
        parser.error("op counts must be positive")
    rows: list[tuple[str, int]] = []
    for spec in filter(None, args.scaling.split(",")):
        name, _, count = spec.partition(":")
        if not count.isdigit():
            parser.error(f"--scaling row {spec!r}: expected PROFILE:MAPPINGS")
        rows.append((name, int(count)))

    results = {mode: measure(mode, args.gdb_only_ops if mode == "gdb-only" else args.ops, args.seed) for mode in MODES}
    reset = measure_reset()
    scaling = [measure_scaling(p, n, args.scaling_ops, args.seed) for p, n in rows] if args.scaling_ops else []

    base = results["no-check"]["ops_per_s"]
    head = (f"{'mode':22} {'ops/s':>8} {'drive':>7} {'snapshot':>8} {'model':>6} {'check':>6} {'reset':>6} "
            f"{'/no-check':>9} {'/stub':>8}")  # fmt: skip
    print(head + "   (us per op; /stub: to 2,300 stops/s)")
    for mode, r in results.items():
        print(_row(mode, r, base))
    d = results["default"]
    print(f"boot to first op: {d['boot_s']:.3f} s (default), {results['gdb-only']['boot_s']:.3f} s (gdb-only); "
          f"reset after a CPU exception: {reset['reset_ms']:.2f} ms (restore {reset['restore_ms']:.2f} ms + "
          f"snapshot), same QEMU; default run: {d['fast_resets']} fast resets, {d['boots']} boot(s)")  # fmt: skip
    if scaling:
        print()
        print(f"{'scaling (same op mix)':22} {'ops/s':>8} {'drive':>7} {'snapshot':>8} {'model':>6} {'check':>6} "
              f"{'reset':>6} {'/first':>9}")  # fmt: skip
        first = 1e6 / scaling[0]["ops_per_s"] if scaling[0]["ops_per_s"] else 0.0
        for r in scaling:
            name = f"{r['ram_mib']} MiB, {r['mappings']} maps"
            u = r["us_per_op"]
            total = 1e6 / r["ops_per_s"] if r["ops_per_s"] else 0.0  # wall time per op
            print(f"{name:22} {r['ops_per_s']:8.1f} {u['drive']:7.0f} {u['snapshot']:8.0f} {u['model']:6.0f} "
                  f"{u['check']:6.0f} {u['reset']:6.0f} {total / first if first else 0:8.2f}x")  # fmt: skip
    if args.json:
        out = {"modes": results, "reset_ms": reset["reset_ms"], "scaling": scaling}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
