"""Throughput of the checked run, mode beside mode in one run (scripts/bench).

Never a timed assertion: this prints (and optionally writes as JSON) what it measured."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from hil.run.runner import Runner
from hil.run.session import Session
from hil.run.workload import Workload

MODES = {
    # name: (shared RAM file, checks on)
    "default": (True, True),
    "no-check": (True, False),
    "gdb-only": (False, True),
}


def measure(mode: str, ops: int, seed: int) -> dict[str, Any]:
    shared, checked = MODES[mode]
    session = Session(shared_ram=shared)
    runner = Runner(session, check_enabled=checked)
    try:
        t0 = time.monotonic()
        runner.start()
        boot = time.monotonic() - t0
        assert session.layout is not None
        t1 = time.monotonic()
        runner.run(Workload(seed, session.layout), count=ops)
        elapsed = time.monotonic() - t1
    finally:
        session.close()
    st = runner.stats
    n = max(st.total_ops, 1)
    return {
        "ops": st.total_ops, "ops_per_s": st.total_ops / elapsed if elapsed else 0.0, "boot_s": boot,
        "us_per_op": {"drive": 1e6 * st.drive_s / n, "snapshot": 1e6 * st.snapshot_s / n,
                      "model": 1e6 * st.model_s / n, "check": 1e6 * st.check_s / n},
        "reboots": st.reboots,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--gdb-only-ops", type=int, default=100, help="the gdb-only mode is slow: fewer ops")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    results = {}
    for mode in MODES:
        results[mode] = measure(mode, args.gdb_only_ops if mode == "gdb-only" else args.ops, args.seed)
    base = results["no-check"]["ops_per_s"] or 1.0
    cols = ("ops/s", "drive", "snapshot", "model", "check", "boot s", "vs no-check")
    widths = (8, 8, 9, 8, 8, 7, 11)
    print(f"{'mode':10} " + " ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)))
    for mode, r in results.items():
        u = r["us_per_op"]
        print(f"{mode:10} {r['ops_per_s']:8.1f} {u['drive']:7.0f}us {u['snapshot']:8.0f}us {u['model']:7.0f}us "
              f"{u['check']:7.0f}us {r['boot_s']:7.2f} {r['ops_per_s'] / base:10.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"modes": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
