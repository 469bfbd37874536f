"""The checked run end to end: random ops with all three checks, corruption caught at the right
op, traces that replay and shrink, determinism, and the CLI's exit statuses."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hil.check import Finding, Kind
from hil.errors import timeout_scale
from hil.run.runner import Runner
from hil.run.session import Session
from hil.run.shrink import shrink
from hil.run.trace import Poke, TraceError, TraceWriter, read_trace
from hil.run.workload import Workload, WorkloadConfig
from model import axioms
from model import ops as m
from model.types import PAGE_SIZE

REPO = Path(__file__).resolve().parents[2]


def run_workload(n: int, seed: int, trace: Path | None = None, **cfg: float) -> Runner:
    session = Session()
    writer = TraceWriter(trace, {"seed": seed, "started": "x"}) if trace else None
    runner = Runner(session, writer)
    try:
        runner.start()
        assert session.layout is not None
        runner.run(Workload(seed, session.layout, WorkloadConfig(**cfg)), count=n)  # type: ignore[arg-type]
    finally:
        session.close()
        if writer:
            writer.close("complete")
    return runner


def test_random_ops_with_all_checks(tmp_path: Path) -> None:
    runner = run_workload(600, seed=7, trace=tmp_path / "t.jsonl")
    findings = [f for r in runner.records for f in r.findings]
    impl = [f for f in findings if f.kind == Kind.IMPL]
    assert not impl, "\n".join(f.describe() for f in impl[:20])
    assert runner.stats.total_ops == 600
    # every op kind the workload issued exercised at least one of its clauses non-vacuously
    counts = runner.coverage.exercised
    for op_name in runner.stats.ops:
        clauses = axioms.clauses_for(m.OP_CLASSES[op_name])
        if clauses:
            assert any(counts.get(c.id, 0) > 0 for c in clauses), f"{op_name}: no clause exercised"
    for op_cls in (m.Map, m.Unmap, m.Query, m.FrameFromUnused, m.FrameDrop, m.NewVmSpace, m.OpenCursorMut):
        assert runner.stats.ops[op_cls.__name__] > 0


def _mapped_session() -> tuple[Session, Runner, int, int]:
    session = Session()
    try:
        runner = Runner(session)
        runner.start()
        assert session.layout is not None
        paddr = session.layout.data_pool_start
        ops = [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=1 << 40), m.FrameFromUnused(paddr=paddr),
               m.Jump(cursor=1, va=0x3000), m.Map(cursor=1, frame=1), m.Nop(value=1)]  # fmt: skip
        for op in ops:
            assert not [f for f in runner.step(op).findings if f.kind == Kind.IMPL]
    except BaseException:
        session.close()
        raise
    return session, runner, paddr, 0x3000


def _pte_paddr(runner: Runner, va: int) -> int:
    assert runner.state is not None
    view = runner.state.vm_spaces[1]
    for node in view.nodes.values():
        if node.level == 1:
            return node.paddr + 8 * ((va >> 12) & 511)
    raise AssertionError("no level-1 node")


@pytest.mark.parametrize("what", ["rc", "pte_flag", "pte_addr"])
def test_corruption_between_ops_is_found_at_that_op(what: str) -> None:
    session, runner, paddr, va = _mapped_session()
    try:
        lay = session.layout
        assert lay is not None
        if what == "rc":
            target = lay.meta_base + 64 * (paddr // PAGE_SIZE) + 40
            runner.step(Poke(target, struct.pack("<Q", 5)))
        else:
            pte_at = _pte_paddr(runner, va)
            raw = session.read_u64(pte_at)
            new = raw & ~0x2 if what == "pte_flag" else raw ^ (0x10 << 12)
            runner.step(Poke(pte_at, struct.pack("<Q", new)))
        rec = runner.step(m.Nop(value=2))
        assert rec.findings, "the corruption went unnoticed"
        impl = [f for f in rec.findings if f.kind == Kind.IMPL]
        if what == "rc":
            assert any(f.clause == "SLOT" and f.field == "rc" and f.slot == paddr // PAGE_SIZE
                       and f.guest == 5 and f.model == 1 for f in impl), rec.findings  # fmt: skip
        else:
            assert any(f.clause == "PTE" and f.va == va and f.vs == 1 for f in impl), rec.findings
    finally:
        session.close()


def test_trace_replays_identically_and_shrinks(tmp_path: Path) -> None:
    trace_path = tmp_path / "long.jsonl"
    session = Session()
    writer = TraceWriter(trace_path, {"seed": 3, "started": "x"})
    runner = Runner(session, writer)
    try:
        runner.start()
        assert session.layout is not None
        runner.run(Workload(3, session.layout), count=30)
        lay = session.layout
        victim = lay.data_pool_start + 5 * PAGE_SIZE  # a slot the workload may or may not use
        runner.step(Poke(lay.meta_base + 64 * (victim // PAGE_SIZE) + 40, struct.pack("<Q", 9)))
        runner.run(Workload(4, lay), count=10)
    finally:
        session.close()
        writer.close("complete")
    trace = read_trace(trace_path)
    assert len(trace.records) == 41
    target = next(f for f in trace.findings if f.clause == "SLOT" and f.field == "rc")
    # replay: identical results and findings
    out = subprocess.run([sys.executable, "-m", "hil.cli", "replay", str(trace_path)], capture_output=True,
                         text=True, cwd=REPO, timeout=300 * timeout_scale())  # fmt: skip
    assert "0 differences" in out.stdout, out.stdout + out.stderr
    # shrink to a handful of events that still give the same finding
    events, finding = shrink(trace, Session, clause="SLOT")
    assert finding.signature() == target.signature()
    assert len(events) <= 6, events  # a handful: the poke, an op after it, and what that op needs
    assert any(isinstance(e, Poke) for e in events)


def test_same_seed_gives_identical_traces(tmp_path: Path) -> None:
    def strip(path: Path) -> list[str]:
        lines = []
        for line in path.read_text().splitlines():
            obj = json.loads(line)
            for key in ("started", "finished"):
                obj.pop(key, None)
            lines.append(json.dumps(obj, sort_keys=True))
        return lines

    run_workload(80, seed=11, trace=tmp_path / "a.jsonl")
    run_workload(80, seed=11, trace=tmp_path / "b.jsonl")
    assert strip(tmp_path / "a.jsonl") == strip(tmp_path / "b.jsonl")


def test_cli_run_exit_status_and_summary(tmp_path: Path) -> None:
    trace = tmp_path / "cli.jsonl"
    out = subprocess.run([sys.executable, "-m", "hil.cli", "run", "--ops", "60", "--seed", "5", "--trace",
                          str(trace)], capture_output=True, text=True, cwd=REPO,
                         timeout=300 * timeout_scale())  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    assert "ops by kind:" in out.stdout and "trace:" in out.stdout
    t = read_trace(trace)
    assert t.end is not None and t.end["status"] == "complete" and len(t.records) == 60
    assert (out.returncode == 1) == bool(t.findings)


def test_bad_traces_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "header", "version": 1}\n{"type": "event", "index": 0, "event": {"op": "Jump"}}\n')
    with pytest.raises(TraceError, match="missing field"):
        read_trace(bad)
    bad.write_text('{"type": "header", "version": 99}\n')
    with pytest.raises(TraceError, match="version"):
        read_trace(bad)
    bad.write_text('{"type": "header", "version": 1}\n{"type": "ev')
    with pytest.raises(TraceError, match="not JSON"):
        read_trace(bad)
    out = subprocess.run([sys.executable, "-m", "hil.cli", "replay", str(bad)], capture_output=True, text=True,
                         cwd=REPO, timeout=60 * timeout_scale())  # fmt: skip
    assert out.returncode == 2 and "not JSON" in out.stderr


def test_findings_serialise() -> None:
    f = Finding(Kind.SPEC, 3, "MAP-2", "rc", slot=5, before=1, guest=2, model=2)
    assert Finding.from_json(json.loads(json.dumps(f.to_json()))) == f


def test_qemu_killed_mid_run_is_retried_once_on_a_fresh_machine(tmp_path: Path) -> None:
    import os
    import signal

    session = Session()
    writer = TraceWriter(tmp_path / "k.jsonl", {"seed": 2, "started": "x"})
    runner = Runner(session, writer)
    calls = 0
    try:
        runner.start()
        assert session.layout is not None
        workload = Workload(2, session.layout)

        def killing(state):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 30:
                assert session.machine is not None and session.machine.pid is not None
                os.kill(session.machine.pid, signal.SIGKILL)
            return workload(state)

        runner.run(killing, count=60)
    finally:
        session.close()
        writer.close("complete")
    assert runner.stats.infra_retries == 1 and runner.stats.reboots >= 1
    assert runner.stats.total_ops == 60
    trace = read_trace(tmp_path / "k.jsonl")
    assert [n["what"] for n in trace.notes] == ["infra-retry"]
    assert not [f for f in trace.findings if f.kind == Kind.IMPL]


def test_replay_reports_a_difference(tmp_path: Path) -> None:
    trace = tmp_path / "r.jsonl"
    run_workload(30, seed=9, trace=trace)
    lines = trace.read_text().splitlines()
    for n, line in enumerate(lines):
        obj = json.loads(line)
        if obj.get("type") == "event" and obj["event"]["op"] == "NewVmSpace":
            obj["result"]["values"] = [[k, v + 1 if k == "root" else v] for k, v in obj["result"]["values"]]
            lines[n] = json.dumps(obj)
            break
    trace.write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "hil.cli", "replay", str(trace)], capture_output=True, text=True,
                         cwd=REPO, timeout=300 * timeout_scale())  # fmt: skip
    assert out.returncode == 1 and "1 differences" in out.stdout, out.stdout + out.stderr
    assert "NewVmSpace()" in out.stdout
