"""The baseline of known findings (hil/run/baseline.py): signatures, judging a run, the file,
and `update` from a directory of minimal traces. No QEMU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hil.check import Finding, Kind
from hil.errors import ConfigError
from hil.run.baseline import (
    SHIPPED_BASELINE,
    TODO_REASON,
    Baseline,
    Entry,
    field_class,
    signature,
    todo_entries,
    update,
)


def spec(op: int, clause: str, field: str, kind: Kind = Kind.SPEC, slot: int | None = 7) -> Finding:
    return Finding(kind, op, clause, field, slot=slot)


def baseline(*sigs: tuple[str, str, str]) -> Baseline:
    return Baseline({s: Entry(*s, trace=f"findings/{s[1]}.jsonl", reason="known") for s in sigs})


def with_caused_by(f: Finding, index: int) -> Finding:
    if any(fl.name == "caused_by" for fl in dataclasses.fields(f)):
        return dataclasses.replace(f, caused_by=index)  # type: ignore[call-arg]
    object.__setattr__(f, "caused_by", index)  # before Finding grows the field
    return f


@pytest.mark.parametrize("kind, field, cls", [
    ("SPEC", "rc,vt,sto,paths", "slot"), ("SPEC", "rc,paths", "slot"), ("SPEC", "rc/paths", "slot"),
    ("INVARIANT", "usage", "slot"), ("SPEC", "inv:S1/R2", "inv"), ("SPEC", "inv:A3", "inv"),
    ("SPEC", "uniques", "uniques"), ("INVARIANT", "cursor 3", "cursor"), ("INVARIANT", "frame 12", "frame"),
    ("IMPL", "rc", "rc"), ("IMPL", "paths", "paths"), ("IMPL", "cursor 3", "cursor"), ("TLB", "write", "write"),
])  # fmt: skip
def test_field_class_drops_ids_and_instance_detail(kind: str, field: str, cls: str) -> None:
    assert field_class(kind, field) == cls


def test_signature_has_no_ids_or_addresses() -> None:
    a = Finding(Kind.SPEC, 91, "MAP-2", "rc,vt,sto,paths", slot=1883, va=0x1000, vs=2)
    b = Finding(Kind.SPEC, 5, "MAP-2", "rc,paths", slot=12, va=0x7000, vs=1)
    assert signature(a) == signature(b) == ("SPEC", "MAP-2", "slot")


def test_known_new_and_fixed() -> None:
    b = baseline(("SPEC", "MAP-2", "slot"), ("SPEC", "UNMAP-2", "slot"), ("SPEC", "Q-3", "slot"))
    run = [spec(3, "MAP-2", "rc,paths"), spec(9, "MAP-2", "rc,vt,sto,paths"), spec(12, "UNMAP-2", "vt"),
           spec(20, "SLOT", "rc", Kind.IMPL)]  # fmt: skip
    v = b.compare(run)
    assert not v.passed
    assert [signature(f) for f in v.new] == [("IMPL", "SLOT", "rc")]
    assert v.known == {("SPEC", "MAP-2", "slot"): 2, ("SPEC", "UNMAP-2", "slot"): 1}
    # a known entry that this run never met is reported as fixed (its minimal trace decides)
    assert [e.key for e in v.fixed] == [("SPEC", "Q-3", "slot")]
    assert "fixed? SPEC Q-3 slot not seen" in v.describe()
    assert "NEW IMPL SLOT rc" in v.describe()


def test_all_known_passes_and_nothing_is_fixed() -> None:
    b = baseline(("SPEC", "VS-NEW-1", "inv"), ("INVARIANT", "S1/R2", "slots"))
    v = b.compare([spec(0, "VS-NEW-1", "inv:S1/R2"), spec(0, "S1/R2", "slots", Kind.INVARIANT)])
    assert v.passed and not v.fixed and not v.new


def test_another_facet_of_a_known_violation_at_the_same_op_is_known() -> None:
    b = baseline(("SPEC", "U-NEW", "slot"))
    v = b.compare([spec(4, "U-NEW", "rc,vt,sto"), spec(4, "U-NEW", "uniques", slot=None)])
    assert v.passed and v.known[("SPEC", "U-NEW", "slot")] == 2
    # ... but not at another op, and never for IMPL (SLOT rc and SLOT paths are two bugs)
    assert not b.compare([spec(4, "U-NEW", "uniques", slot=None)]).passed
    bi = baseline(("IMPL", "SLOT", "rc"))
    v = bi.compare([spec(4, "SLOT", "rc", Kind.IMPL), spec(4, "SLOT", "paths", Kind.IMPL)])
    assert [f.field for f in v.new] == ["paths"]


def test_a_consequence_is_not_new_by_itself() -> None:
    b = baseline(("SPEC", "FI-3", "slot"))
    later = with_caused_by(spec(8, "MAP-9", "usage"), 3)
    v = b.compare([spec(3, "FI-3", "usage"), later])
    assert v.passed and v.consequences == 1


def test_new_in_one_op_is_what_stop_on_finding_new_stops_on() -> None:
    b = baseline(("SPEC", "MAP-2", "slot"))
    assert b.new_in([spec(1, "MAP-2", "rc")]) == []
    assert [f.clause for f in b.new_in([spec(1, "MAP-2", "rc"), spec(1, "MAP-4", "rc")])] == ["MAP-4"]


def test_file_round_trip_and_strict_reading(tmp_path: Path) -> None:
    b = baseline(("SPEC", "MAP-2", "slot"))
    path = tmp_path / "b.json"
    b.save(path)
    again = Baseline.load(path)
    assert again.entries == b.entries
    assert again.trace_path(again.entries[("SPEC", "MAP-2", "slot")]) == tmp_path / "findings/MAP-2.jsonl"
    bad = {
        "not readable JSON": "{",
        "version 7": json.dumps({"version": 7, "entries": []}),
        "must have exactly": json.dumps({"version": 1, "entries": [{"kind": "SPEC"}]}),
        "listed twice": json.dumps({"version": 1, "entries": [
            {"kind": "SPEC", "clause": "A", "field": "slot", "trace": "t", "reason": "r"}] * 2}),
    }  # fmt: skip
    for needle, text in bad.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            Baseline.load(path)
    with pytest.raises(ConfigError, match="not found"):
        Baseline.load(tmp_path / "nope.json")


def _minimal_trace(path: Path, sig: list[str]) -> None:
    header = {"type": "header", "version": 1, "finding": sig, "description": "..."}
    path.write_text(json.dumps(header) + "\n" + json.dumps({"type": "end", "status": "complete"}) + "\n")


def test_update_keeps_reasons_marks_new_entries_and_drops_gone_ones(tmp_path: Path) -> None:
    findings = tmp_path / "findings"
    findings.mkdir()
    _minimal_trace(findings / "spec-MAP-2.jsonl", ["SPEC", "MAP-2", "rc,vt,sto,paths"])
    _minimal_trace(findings / "spec-VS-DROP.jsonl", ["SPEC", "VS-DROP", "rc,vt,sto,paths"])
    (findings / "junk.jsonl").write_text("not a trace\n")
    path = tmp_path / "baseline.json"
    old = baseline(("SPEC", "MAP-2", "slot"), ("SPEC", "MAP-0", "slot"))
    old.entries[("SPEC", "MAP-2", "slot")] = Entry("SPEC", "MAP-2", "slot", "old/path.jsonl", "a person's reason")
    old.save(path)
    new, report = update(path, findings)
    assert set(new.entries) == {("SPEC", "MAP-2", "slot"), ("SPEC", "VS-DROP", "slot")}
    assert new.entries[("SPEC", "MAP-2", "slot")].reason == "a person's reason"
    assert new.entries[("SPEC", "MAP-2", "slot")].trace == "findings/spec-MAP-2.jsonl"
    assert new.entries[("SPEC", "VS-DROP", "slot")].reason == TODO_REASON
    assert [e.clause for e in todo_entries(new)] == ["VS-DROP"]
    assert [e.clause for e in report.dropped] == ["MAP-0"] and [e.clause for e in report.added] == ["VS-DROP"]
    assert report.skipped == [findings / "junk.jsonl"]
    assert Baseline.load(path).entries == new.entries
    # idempotent: a second update changes nothing
    before = path.read_text()
    update(path, findings)
    assert path.read_text() == before


def test_shipped_baseline_is_complete_and_explained() -> None:
    b = Baseline.load(SHIPPED_BASELINE)
    assert b.entries, "the shipped baseline is empty"
    assert not todo_entries(b), [e.describe() for e in todo_entries(b)]
    for e in b.entries.values():
        assert e.kind in ("SPEC", "INVARIANT"), f"{e.describe()}: a bug (IMPL/TLB/WALKER) is never accepted"
        assert b.trace_path(e).is_file(), f"{e.describe()}: minimal trace {e.trace} missing (hil baseline update)"


def test_an_axioms_inv_conjunct_beside_its_invariant_finding_is_a_consequence() -> None:
    b = baseline(("INVARIANT", "A3", "slot"))
    v = b.compare([spec(7, "MAP-1", "inv:A3"), spec(7, "A3", "rc", Kind.INVARIANT)])
    assert v.passed and v.consequences == 1 and v.known[("INVARIANT", "A3", "slot")] == 1
    # the invariant itself new: the inv conjunct does not hide it
    v = baseline().compare([spec(7, "MAP-1", "inv:A3"), spec(7, "A3", "rc", Kind.INVARIANT)])
    assert [f.clause for f in v.new] == ["A3"]
    # without the invariant finding at that op, the conjunct is judged on its own
    assert not b.compare([spec(7, "MAP-1", "inv:S7")]).passed


def test_judge_gives_each_finding_its_verdict_and_group() -> None:
    b = baseline(("SPEC", "U-NEW", "slot"), ("INVARIANT", "A3", "slot"))
    found = [spec(4, "U-NEW", "rc,vt,sto"), spec(4, "U-NEW", "uniques", slot=None), spec(7, "MAP-1", "inv:A3"),
             spec(7, "A3", "rc", Kind.INVARIANT), spec(9, "SLOT", "rc", Kind.IMPL)]  # fmt: skip
    assert [(status, sig) for _f, status, sig in b.judge(found)] == [
        ("known", ("SPEC", "U-NEW", "slot")), ("known", ("SPEC", "U-NEW", "slot")),
        ("consequence", ("SPEC", "MAP-1", "inv")), ("known", ("INVARIANT", "A3", "slot")),
        ("new", ("IMPL", "SLOT", "rc")),
    ]  # fmt: skip
