"""`hil run --resume TRACE`: continue an interrupted run from its last finished op.

The workload's choices depend only on its seed and the states it is shown, and the guest is
deterministic: so a fresh guest, driven through the trace's ops again with the workload drawing
each one (and checked equal to the recorded op and result), reaches the state the interrupted
run had, with the workload's generator in step. The run then goes on with the same seed and
appends to the same trace (after a `resume` line: the file is only ever appended to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hil.errors import ConfigError
from hil.run.runner import Runner
from hil.run.trace import Trace, TraceError, event_from_json, read_trace
from model import ops as m
from model.state import State

RESUMABLE = ("interrupted", "infra-error", "error")


@dataclass
class ResumePoint:
    path: Path
    trace: Trace

    @property
    def header(self) -> dict[str, Any]:
        return self.trace.header

    @property
    def done(self) -> int:
        return len(self.trace.records)


def load(path: Path) -> ResumePoint:
    """The trace of an interrupted `hil run`, or a ConfigError saying why it cannot go on."""
    trace = read_trace(path)
    h = trace.header
    if "shrunk_from" in h or "finding" in h:
        raise ConfigError(f"{path}: not a `hil run` trace but a minimal one; replay it instead")
    for key, kind in (("seed", int), ("ops", int), ("image", str), ("profile", str)):
        if not isinstance(h.get(key), kind):
            raise ConfigError(f"{path}: not a `hil run` trace (its header has no {key})")
    status = trace.end.get("status") if trace.end else None
    if status == "complete":
        raise ConfigError(f"{path}: the run is complete; nothing to resume")
    if status is not None and status not in RESUMABLE:
        raise ConfigError(f"{path}: a trace ended {status!r} cannot be resumed")
    return ResumePoint(path, trace)


def replay_into(runner: Runner, workload: Callable[[State], m.Op], point: ResumePoint) -> None:
    """Drive `runner` (booted, writing nothing) through the trace, drawing every op from
    `workload` as the original run did, including the ops an infra retry lost."""
    retries: dict[int, list[dict[str, Any]]] = {}
    discards: dict[int, dict[str, Any]] = {}  # Runner.run: an op drawn, run and dropped before `index`
    for note in point.trace.notes:
        if note.get("what") == "infra-retry" and isinstance(note.get("index"), int):
            retries.setdefault(note["index"], []).append(note)
        if note.get("what") == "discarded" and isinstance(note.get("index"), int):
            discards[note["index"]] = note

    def redo_discard(index: int) -> None:
        """The run drew the op after `index - 1` from the state that op left, before rebooting."""
        note = discards.get(index)
        if note is not None:
            drawn = workload(_state(runner))
            try:
                dropped = event_from_json(note["event"])
            except (TraceError, KeyError) as exc:
                raise ConfigError(f"{point.path}: discarded note before op {index}: {exc}") from exc
            _same(point, index, "discarded op", dropped, drawn)
        runner.reboot_if_pending()

    def redo_retries(index: int) -> None:
        for note in retries.get(index, []):
            if note.get("lost") is not None:
                drawn = workload(_state(runner))
                try:
                    lost = event_from_json(note["lost"])
                except TraceError as exc:
                    raise ConfigError(f"{point.path}: infra-retry note before op {index}: {exc}") from exc
                _same(point, index, "lost op", lost, drawn)
            runner.stats.infra_retries += 1
            runner._reboot(reboot=True)

    for rec in point.trace.records:
        redo_retries(rec.index)
        drawn = workload(_state(runner))
        _same(point, rec.index, "op", rec.event, drawn)
        new = runner.step(drawn, reboot=False)
        redo_discard(rec.index + 1)
        if rec.result is not None and new.result != rec.result:
            raise ConfigError(
                f"{point.path}: op {rec.index} {drawn!r} gave {new.result!r} on this guest, the trace "
                f"recorded {rec.result!r}; the run cannot be rebuilt (another guest build?)"
            )
    redo_retries(point.done)


def _state(runner: Runner) -> State:
    assert runner.state is not None
    return runner.state


def _same(point: ResumePoint, index: int, what: str, recorded: object, drawn: object) -> None:
    if recorded != drawn:
        raise ConfigError(
            f"{point.path}: {what} {index}: the workload of seed {point.header['seed']} draws {drawn!r}, "
            f"the trace has {recorded!r}; it was not written by this seed, workload and guest"
        )
