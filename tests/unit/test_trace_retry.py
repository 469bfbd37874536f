"""The run loop's infra retries, below the wire (a fake session): every op in the trace once,
numbered without a gap, the counts equal to the trace, the lost op named in the note, and a
resumed run drawing the lost op again. (The same faults for real: tests/hil/test_faults.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from hil.errors import ConfigError, InfraError, TraceWriteError
from hil.run import resume
from hil.run.runner import Runner
from hil.run.trace import TraceWriter, read_trace
from model import ops as m


class FakeSession:
    """apply() fails (InfraError) at the given apply calls; reset() and boot() count."""

    def __init__(self, fail_at: set[int], fail_boot: int = 0):
        self.fail_at = fail_at
        self.fail_boot = fail_boot
        self.applies = 0
        self.boots = 0
        self.memory = None
        self.layout = None
        self.machine = None

    def boot(self) -> None:
        self.boots += 1
        if self.boots <= self.fail_boot:
            raise InfraError("QEMU did not start (injected)")

    def reset(self, *, reboot: bool = False) -> None:
        assert reboot, "an infra retry must reboot, not fast-reset"
        self.boot()

    def snapshot(self, prev: object = None) -> object:
        return SimpleNamespace(anomalies=())

    def begin(self, op: m.Op) -> None:
        self._op = op

    def finish(self) -> object:
        return self.apply(self._op)

    def apply(self, op: m.Op) -> object:
        self.applies += 1
        if self.applies in self.fail_at:
            raise InfraError(f"gdb stub connection lost (injected at apply {self.applies})")
        return SimpleNamespace(result=m.OpResult.ok(value=op.value))  # type: ignore[attr-defined]

    def close(self) -> None:
        pass


def workload(start: int = 0):  # type: ignore[no-untyped-def]
    counter = iter(range(start, 10**6))
    return lambda state: m.Nop(value=next(counter))


def run(tmp_path: Path, session: FakeSession, count: int, overlap: bool = False) -> tuple[Runner, Path]:
    session.can_overlap = overlap  # type: ignore[attr-defined]
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path, {"seed": 1, "ops": count, "image": "x", "profile": "default"})
    runner = Runner(session, writer, check_enabled=False)  # type: ignore[arg-type]
    runner.start()
    runner.run(workload(), count=count)
    writer.close("complete", ops_done=runner.stats.total_ops)
    return runner, path


@pytest.mark.parametrize("overlap", [False, True])
def test_a_lost_op_is_not_counted_and_leaves_no_gap(tmp_path: Path, overlap: bool) -> None:
    runner, path = run(tmp_path, FakeSession(fail_at={5, 12}), 20, overlap)
    t = read_trace(path)  # strict: indices 0..n-1
    assert len(t.records) == 20 == runner.stats.total_ops == t.end["ops_done"]  # type: ignore[index]
    assert runner.stats.infra_retries == 2
    notes = [(n["index"], n["lost"]["value"]) for n in t.notes]
    # apply 5 was op 4's first try (value 4 drawn, lost); op 4 then ran with the next value
    assert notes == [(4, 4), (10, 11)]
    assert [r.event.value for r in t.records][:6] == [0, 1, 2, 3, 5, 6]  # type: ignore[union-attr]


@pytest.mark.parametrize("overlap", [False, True])
def test_two_failures_in_a_row_end_the_run(tmp_path: Path, overlap: bool) -> None:
    with pytest.raises(InfraError, match="apply 4"):
        run(tmp_path, FakeSession(fail_at={3, 4}), 10, overlap)
    t = read_trace(tmp_path / "t.jsonl")
    assert len(t.records) == 2 and [n["index"] for n in t.notes] == [2]


def test_a_boot_that_fails_once_is_retried(tmp_path: Path) -> None:
    runner, path = run(tmp_path, FakeSession(fail_at=set(), fail_boot=1), 3)
    t = read_trace(path)
    assert len(t.records) == 3 and runner.stats.infra_retries == 1
    assert t.notes[0]["what"] == "infra-retry" and t.notes[0]["lost"] is None


def test_a_trace_write_error_is_never_retried(tmp_path: Path) -> None:
    session = FakeSession(fail_at=set())
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path, {"seed": 1})
    runner = Runner(session, writer, check_enabled=False)  # type: ignore[arg-type]
    runner.start()

    def full(*a: object, **k: object) -> None:
        raise TraceWriteError("cannot write the trace: No space left on device")

    writer.record = full  # type: ignore[method-assign]
    with pytest.raises(TraceWriteError):
        runner.run(workload(), count=5)
    assert runner.stats.infra_retries == 0 and runner.stats.total_ops == 0 and runner.records == []


def test_resume_draws_the_lost_op_again(tmp_path: Path) -> None:
    """Replay a trace with a retry note: the workload is asked for the lost op too, so it stays
    in step; a different draw is refused."""
    _, path = run(tmp_path, FakeSession(fail_at={5}), 8)
    lines = path.read_text().splitlines()
    interrupted = tmp_path / "i.jsonl"
    interrupted.write_text("\n".join(lines[:-1]) + '\n{"type": "end", "status": "interrupted"}\n')
    point = resume.load(interrupted)
    runner = Runner(FakeSession(fail_at=set()), check_enabled=False)  # type: ignore[arg-type]
    runner.start()
    resume.replay_into(runner, workload(), point)  # type: ignore[arg-type]
    assert [r.event for r in runner.records] == [r.event for r in point.trace.records]
    runner2 = Runner(FakeSession(fail_at=set()), check_enabled=False)  # type: ignore[arg-type]
    runner2.start()
    # a workload that never drew the lost op is out of step from there
    values = iter([0, 1, 2, 3, 5, 6, 7, 8, 9])
    with pytest.raises(ConfigError, match="lost op 4: the workload of seed 1 draws Nop"):
        resume.replay_into(runner2, lambda state: m.Nop(value=next(values)), point)
