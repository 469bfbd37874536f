"""Runner.run's overlap (op k checked while the guest runs op k+1), below the wire: the records,
findings and trace equal the one-at-a-time loop's; an op sent after one that stops the run, or
after a state the model cannot interpret, is dropped with a `discarded` note; a harness error
while an op is held keeps that op in the trace; `hil run --resume` draws a discarded op again."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from hil.run import resume
from hil.run.runner import Runner
from hil.run.trace import TraceWriter, read_trace
from model import ops as m
from model import store
from model.state import State


class FakeSession:
    """A guest that runs Nops: begin() sends, finish() answers; it logs what it was sent."""

    def __init__(self, overlap: bool):
        self.can_overlap = overlap
        self.memory = None
        self.layout = None
        self.machine = None
        self.sent: list[m.Op] = []
        self.in_flight: m.Op | None = None
        self.resets = 0
        self.state = store.initial_state()

    def boot(self) -> None:
        pass

    def reset(self, *, reboot: bool = False) -> None:
        assert self.in_flight is None, "a reset with an op in flight"
        self.resets += 1

    def snapshot(self, prev: object = None) -> State:
        assert self.in_flight is None, "a snapshot while the guest runs"
        return dataclasses.replace(self.state, parent=None, changed=None)

    def begin(self, op: m.Op) -> None:
        assert self.in_flight is None
        self.in_flight = op
        self.sent.append(op)

    def finish(self) -> object:
        op, self.in_flight = self.in_flight, None
        assert op is not None
        return SimpleNamespace(result=m.OpResult.ok(value=op.value),  # type: ignore[attr-defined]
                               response=SimpleNamespace(flush_log=()))  # fmt: skip

    def close(self) -> None:
        pass


def counting() -> Callable[[State], m.Op]:
    values = iter(range(10**6))
    return lambda state: m.Nop(value=next(values))


def model_that(bad: Callable[[int], str | None]) -> Callable[..., tuple[m.OpResult, State]]:
    """The real model, except at the Nops `bad` names: 'wrong' predicts another result (an
    IMPL finding), 'raise' cannot interpret the state."""

    def model(state: State, op: m.Op, alloc: Callable[[int], int]) -> tuple[m.OpResult, State]:
        result, after = store.apply(state, op, alloc)
        what = bad(op.value) if isinstance(op, m.Nop) else None
        if what == "raise":
            raise AssertionError("a node in use twice (injected)")
        if what == "wrong":
            return m.OpResult.ok(value=op.value + 1), after  # type: ignore[attr-defined]
        return result, after

    return model


def run(tmp_path: Path, overlap: bool, events: object, count: int, bad: Callable[[int], str | None] = lambda v: None,
        **kw: object) -> tuple[Runner, FakeSession, Path]:  # fmt: skip
    session = FakeSession(overlap)
    path = tmp_path / f"t-{overlap}.jsonl"
    writer = TraceWriter(path, {"seed": 1, "ops": count, "image": "x", "profile": "default"})
    runner = Runner(session, writer, probes=False, qemu_every=0, **kw)  # type: ignore[arg-type]
    runner.start()
    runner.model = model_that(bad)
    runner.run(events, count=count)  # type: ignore[arg-type]
    writer.close("complete", ops_done=runner.stats.total_ops)
    return runner, session, path


def summary(path: Path) -> list[tuple[int, object, list[str]]]:
    t = read_trace(path)
    return [(r.index, r.event, [f"{f.kind}:{f.clause}" for f in r.findings]) for r in t.records]


def test_overlap_records_what_the_one_at_a_time_loop_records(tmp_path: Path) -> None:
    bad = {3: "wrong", 7: "wrong"}.get
    seq, s_seq, p_seq = run(tmp_path, False, counting(), 12, bad)
    ovl, s_ovl, p_ovl = run(tmp_path, True, counting(), 12, bad)
    assert summary(p_ovl) == summary(p_seq)
    assert [k for _, _, k in summary(p_ovl)][3] == ["IMPL:RESULT"]
    assert s_ovl.sent == s_seq.sent and len(s_ovl.sent) == 12  # the count is kept: no op sent past it
    assert ovl.stats.total_ops == seq.stats.total_ops == 12 and ovl.stats.discarded == 0


def test_a_stop_on_finding_drops_the_op_already_sent(tmp_path: Path) -> None:
    runner, session, path = run(tmp_path, True, counting(), 20, {4: "wrong"}.get, stop_on_finding=True)
    t = read_trace(path)
    assert [r.index for r in t.records] == [0, 1, 2, 3, 4]
    assert len(session.sent) == 6 and session.in_flight is None  # op 5 ran, was waited for, dropped
    assert t.notes == [{"type": "note", "what": "discarded", "index": 5, "why": "the run stopped at the op before",
                        "event": m.Nop(value=5).to_json()}]  # fmt: skip
    assert runner.stats.discarded == 1


@pytest.mark.parametrize("fixed", [False, True])
def test_an_uninterpretable_state_reboots_and_drops_the_op_sent_after_it(tmp_path: Path, fixed: bool) -> None:
    events = iter([m.Nop(value=v) for v in range(10)]) if fixed else counting()
    runner, session, path = run(tmp_path, True, events, 8, {2: "raise"}.get)
    t = read_trace(path)
    assert [f.clause for f in t.records[2].findings] == ["MODEL"]
    assert session.resets == 1 and runner.stats.discarded == 1
    assert t.notes[0]["what"] == "discarded" and t.notes[0]["index"] == 3
    # a fixed list runs the dropped event again on the fresh machine; a workload draws anew
    assert [r.event.value for r in t.records] == ([0, 1, 2, 3, 4, 5, 6, 7] if fixed  # type: ignore[union-attr]
                                                  else [0, 1, 2, 4, 5, 6, 7, 8])  # fmt: skip
    seq, s_seq, _ = run(tmp_path, False, iter([m.Nop(value=v) for v in range(10)]), 8, {2: "raise"}.get)
    assert s_seq.resets == 1 and seq.stats.discarded == 0


def test_a_harness_error_keeps_the_op_already_observed(tmp_path: Path) -> None:
    values = iter(range(10**6))

    def workload(state: State) -> m.Op:
        v = next(values)
        if v == 5:
            raise RuntimeError("injected harness bug")
        return m.Nop(value=v)

    with pytest.raises(RuntimeError, match="injected"):
        run(tmp_path, True, workload, 10)
    assert [r.index for r in read_trace(tmp_path / "t-True.jsonl").records] == [0, 1, 2, 3, 4]


def test_resume_draws_a_discarded_op_again(tmp_path: Path) -> None:
    _, _, path = run(tmp_path, True, counting(), 8, {2: "raise"}.get)
    lines = path.read_text().splitlines()
    interrupted = tmp_path / "i.jsonl"
    interrupted.write_text("\n".join(lines[:-1]) + '\n{"type": "end", "status": "interrupted"}\n')
    point = resume.load(interrupted)
    session = FakeSession(True)
    runner = Runner(session, probes=False, qemu_every=0)  # type: ignore[arg-type]
    runner.start()
    runner.model = model_that({2: "raise"}.get)
    resume.replay_into(runner, counting(), point)
    assert [r.event for r in runner.records] == [r.event for r in point.trace.records]
    assert session.resets == 1 and Nop_values(session.sent) == [0, 1, 2, 4, 5, 6, 7, 8]


def Nop_values(ops: list[m.Op]) -> list[int]:  # noqa: N802 - reads as what it returns
    return [op.value for op in ops]  # type: ignore[attr-defined]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_signal_right_after_a_trace_line_still_counts_that_op(tmp_path: Path, overlap: bool) -> None:
    """A real SIGINT delivered while an op's trace line is being written, to `hil run`'s own
    handler: the op is both in the trace and in the counts, so the end line's `ops_done` equals
    the trace's records (tests/hil/test_faults.py saw 95 vs 96), and the run stops soon after."""
    import os
    import signal

    from hil import cli

    session = FakeSession(overlap)
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path, {"seed": 1})
    runner = Runner(session, writer, probes=False, qemu_every=0)  # type: ignore[arg-type]
    runner.start()
    real = writer.record

    def record(*a: object, **k: object) -> None:
        real(*a, **k)  # type: ignore[arg-type]
        if len(runner.records) == 4:  # the 5th line is written: the signal lands right now
            os.kill(os.getpid(), signal.SIGINT)

    writer.record = record  # type: ignore[method-assign]
    # another thread that does not hold the signal: the kernel hands it to that one, and Python
    # still runs the handler in the main thread (a pytest process may have such threads)
    done = threading.Event()
    other = threading.Thread(target=done.wait, args=(30,), daemon=True)
    other.start()
    old = signal.signal(signal.SIGINT, cli._raise_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run(counting(), count=20, on_step=lambda rec: cli.check_interrupted())
    finally:
        signal.signal(signal.SIGINT, old)
        cli._signalled.clear()
        done.set()
        other.join(5)
    writer.close("interrupted", ops_done=runner.stats.total_ops)
    t = read_trace(path)
    assert len(t.records) == runner.stats.total_ops == t.end["ops_done"]  # type: ignore[index]
    # the run stops at its next check after the signal; a signal the kernel hands to the other
    # thread reaches the main thread's handler a moment later on a loaded machine (an op or so)
    assert 5 <= len(t.records) < 20
