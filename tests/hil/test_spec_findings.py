"""Every spec finding the checker has confirmed, as a minimal trace (tests/data/findings/,
written by scripts/collect-findings), is still reported. A finding that disappears means the
guest, the model or a predicate changed: look before deleting the trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.check import Kind
from hil.run.trace import read_trace

FINDINGS = sorted((Path(__file__).resolve().parents[1] / "data" / "findings").glob("*.jsonl"))


def test_there_are_confirmed_findings() -> None:
    assert FINDINGS, "tests/data/findings/ is empty: run scripts/collect-findings"


@pytest.mark.parametrize("path", FINDINGS, ids=lambda p: p.stem)
def test_finding_is_still_reported(path: Path, run_events_fn) -> None:  # type: ignore[no-untyped-def]
    trace = read_trace(path)
    signature = tuple(trace.header["finding"])
    assert signature[0] in (Kind.SPEC, Kind.INVARIANT)
    findings = run_events_fn(trace.events)
    assert any(f.signature() == signature for f in findings), [f.describe() for f in findings]
    assert not [f for f in findings if f.kind == Kind.IMPL], "guest and model must agree on a spec finding"


def test_a_finding_on_a_slot_already_broken_is_a_consequence(run_events_fn) -> None:  # type: ignore[no-untyped-def]
    """FI-3 breaks the page-table node's slot (S13); a second FrameFromInUse on it fails FI-3
    again, from a before-state already broken: a consequence of the first (caused_by)."""
    (event,) = read_trace(FINDINGS[0].parent / "spec-FI-3.jsonl").events
    findings = run_events_fn([event, event])
    first = [f for f in findings if f.op_index == 0 and f.clause in ("FI-3", "S13")]
    again = [f for f in findings if f.op_index == 1 and f.clause == "FI-3"]
    assert first and all(f.caused_by is None for f in first), [f.describe() for f in findings]
    assert again and all(f.caused_by == 0 for f in again), [f.describe() for f in findings]
