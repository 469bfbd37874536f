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
