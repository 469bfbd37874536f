"""Replay a trace, and shrink a failing one by delta debugging.

Ops name objects by id, and ids are counters in the guest: dropping an op that created an
object shifts every later id. So events are first made symbolic — each id argument points
at the event (and result word) that produced it — and a candidate subset is re-run with the
ids its own run produced. An event whose producer was dropped is dropped with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hil.check import Finding
from hil.errors import ConfigError
from hil.run.runner import Runner
from hil.run.session import Session
from hil.run.trace import Event, Poke, Record, Trace
from model import ops as m

# op field -> id kind
ID_FIELDS = {"vs": "vm_space", "cursor": "cursor", "frame": "frame", "segment": "segment", "unique": "unique"}


def produced_ids(op: m.Op, result: m.OpResult | None) -> list[tuple[str, str, int]]:
    """(kind, result word, id) of every object the op created."""
    if result is None or result.status != m.Status.OK:
        return []
    names: list[tuple[str, str]] = {
        m.NewVmSpace: [("vm_space", "vs")],
        m.OpenCursor: [("cursor", "cursor")],
        m.OpenCursorMut: [("cursor", "cursor")],
        m.Query: [("frame", "frame")],
        m.FrameFromUnused: [("frame", "frame")],
        m.FrameFromInUse: [("frame", "frame")],
        m.SegmentFromUnused: [("segment", "segment")],
        m.SegmentSplit: [("segment", "left"), ("segment", "right")],
        m.SegmentNext: [("frame", "frame")],
        m.SegmentClone: [("segment", "segment")],
        m.SegmentSlice: [("segment", "segment")],
        m.UniqueFromUnused: [("unique", "unique")],
        m.FromUnique: [("frame", "frame")],
        m.TryFromShared: [("unique", "unique")],
    }.get(type(op), [])
    out = []
    for kind, word in names:
        value = result.get(word)
        if value:
            out.append((kind, word, value))
    return out


@dataclass(frozen=True)
class SymbolicEvent:
    index: int  # in the original trace
    event: Event
    refs: tuple[tuple[str, int, str], ...]  # (op field, producer event index, result word)


def symbolize(records: Sequence[Record]) -> list[SymbolicEvent]:
    latest: dict[tuple[str, int], tuple[int, str]] = {}
    out = []
    for rec in records:
        refs: list[tuple[str, int, str]] = []
        if isinstance(rec.event, m.Op):
            for f in dataclasses.fields(rec.event):
                kind = ID_FIELDS.get(f.name)
                value = getattr(rec.event, f.name)
                if kind and (kind, value) in latest:
                    prod, word = latest[(kind, value)]
                    refs.append((f.name, prod, word))
            for kind, word, value in produced_ids(rec.event, rec.result):
                latest[(kind, value)] = (rec.index, word)
        out.append(SymbolicEvent(rec.index, rec.event, tuple(refs)))
    return out


def run_events(
    session: Session, events: Sequence[SymbolicEvent], stop_at_first: tuple[str, str, str] | None = None
) -> list[Record]:
    """Boot, run the (symbolic) events with remapped ids, return the records."""
    runner = Runner(session)
    try:
        runner.start()
        produced: dict[tuple[int, str], int] = {}
        for sev in events:
            event = sev.event
            if isinstance(event, m.Op) and sev.refs:
                changes = {}
                for field_name, prod, word in sev.refs:
                    if (prod, word) not in produced:
                        break
                    changes[field_name] = produced[(prod, word)]
                else:
                    event = dataclasses.replace(event, **changes)
                if len(changes) != len(sev.refs):
                    continue  # its producer was dropped
            rec = runner.step(event)
            if isinstance(event, m.Op):
                for _kind, word, value in produced_ids(event, rec.result):
                    produced[(sev.index, word)] = value
            if stop_at_first and any(f.signature() == stop_at_first for f in rec.findings):
                break
        return runner.records
    finally:
        session.close()


def ddmin(items: list[SymbolicEvent], fails: Callable[[list[SymbolicEvent]], bool]) -> list[SymbolicEvent]:
    """Zeller's delta debugging: a 1-minimal sublist that still fails."""
    n = 2
    while len(items) >= 2:
        chunk = max(1, len(items) // n)
        subsets = [items[i : i + chunk] for i in range(0, len(items), chunk)]
        reduced = False
        for i in range(len(subsets)):
            complement = [x for j, s in enumerate(subsets) if j != i for x in s]
            if complement and fails(complement):
                items = complement
                n = max(n - 1, 2)
                reduced = True
                break
        if not reduced:
            if n >= len(items):
                break
            n = min(len(items), n * 2)
    return items


class ShrinkError(ConfigError, ValueError):
    """Nothing to shrink: no such finding, or it does not come back on replay. Bad input (exit 2
    with one line), not a harness error; a ValueError for callers that catch that."""


def target_finding(trace: Trace, clause: str | None = None) -> Finding:
    for f in trace.findings:
        if clause is None or f.clause == clause:
            return f
    raise ShrinkError("the trace has no finding" + (f" with clause {clause}" if clause else ""))


def shrink(
    trace: Trace, make_session: Callable[[], Session], clause: str | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[Event], Finding]:  # fmt: skip
    """The shortest event list (1-minimal) that still produces the trace's first finding
    (or the first with `clause`), judged by kind, clause and field."""
    target = target_finding(trace, clause)
    sig = target.signature()
    events = symbolize(trace.records)
    events = [e for e in events if e.index <= target.op_index]
    tests = 0

    def fails(candidate: list[SymbolicEvent]) -> bool:
        nonlocal tests
        tests += 1
        records = run_events(make_session(), candidate, stop_at_first=sig)
        hit = any(f.signature() == sig for r in records for f in r.findings)
        log(f"shrink: test {tests}: {len(candidate)} events -> {'fails' if hit else 'passes'}")
        return hit

    if not fails(events):
        raise ShrinkError(f"the finding {sig} does not reproduce on replay (another guest build?)")
    minimal = ddmin(events, fails)
    # rebuild concrete events with the ids a run of the minimal list produces
    records = run_events(make_session(), minimal)
    return [r.event for r in records], target


def regression_test_source(events: Sequence[Event], finding: Finding, name: str) -> str:
    """A pytest case that replays the minimal trace and asserts the finding still appears."""
    from model import types as t

    op_names = sorted({type(e).__name__ for e in events if isinstance(e, m.Op)})
    body = "".join(f"    {e!r},\n" for e in events)
    type_names = sorted(n for n in ("PageProperty", "CachePolicy", "PropTransform") if n in body)
    imports = ["import pytest", ""]
    if any(isinstance(e, Poke) for e in events):
        imports.append("from hil.run.trace import Poke")
    if op_names:
        imports.append(f"from model.ops import {', '.join(op_names)}")
    if type_names:
        imports.append(f"from model.types import {', '.join(type_names)}")
    assert all(hasattr(t, n) for n in type_names)
    sig = finding.signature()
    return (
        f'"""Regression: {finding.describe()}"""\n\n' + "\n".join(imports) + "\n\n"
        "pytestmark = pytest.mark.hil\n\n"
        f"EVENTS = [\n{body}]\n\n\n"
        f"def test_{name}(run_events_fn):\n"
        "    findings = run_events_fn(EVENTS)\n"
        f"    assert any(f.signature() == {sig!r} for f in findings), findings\n"
    )


__all__ = ["Poke", "ddmin", "regression_test_source", "run_events", "shrink", "symbolize"]
