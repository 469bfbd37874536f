"""The nightly report from hand-made ChunkResults (no QEMU, no Dask): grouping by root cause,
new / known / seen before / fixed, totals, junit, and a self-contained HTML page."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from hil.errors import ConfigError
from hil.workflows.chunk import ChunkResult, ChunkSpec, summarize_trace
from hil.workflows.nightly import Night, parse_duration
from hil.workflows.report import build_summary, junit_xml, render_html, write_report

KNOWN = {("SPEC", "MAP-2", "slot")}


def finding(kind: str, clause: str, fld: str, op: int, **extra) -> dict:
    return {"kind": kind, "op_index": op, "clause": clause, "field": fld, "slot": 7, "va": None, "vs": None,
            "before": 1, "guest": 2, "model": 1, "message": "", **extra}  # fmt: skip


def result(cid: str, ops: int, findings: list[dict], *, t0: float, dt: float, status: str = "complete",
           worker: str = "w1", attempt: int = 1) -> ChunkResult:  # fmt: skip
    return ChunkResult(cid, int(cid[1:]) + 1, 100, attempt, status, worker=worker, started=t0, finished=t0 + dt,
                       booted=True, ops_done=ops, ops_by_kind={"Map": ops - 1, "Query": 1},
                       outcomes={"Map": {"OK": ops - 1}, "Query": {"ERR": 1}}, findings=findings,
                       coverage={"evaluated": {"MAP-2": ops}, "exercised": {"MAP-2": 3},
                                 "violated": {"MAP-2": 1}})  # fmt: skip


def night_results() -> list[ChunkResult]:
    return [
        result("c00000", 100, [finding("SPEC", "MAP-2", "rc,paths", 5), finding("SPEC", "MAP-2", "rc", 9),
                               finding("IMPL", "SLOT", "rc", 40)], t0=1000.0, dt=10.0),  # fmt: skip
        result("c00001", 80, [finding("IMPL", "SLOT", "rc", 3), finding("SPEC", "Q-3", "usage", 4, caused_by=3)],
               t0=1000.0, dt=8.0, worker="w2"),  # fmt: skip
        # lost to infrastructure and not redone: reported, never counted
        result("c00002", 30, [finding("IMPL", "PTE", "flags", 1)], t0=1010.0, dt=2.0, status="infra-error"),
    ]


def test_summary_counts_and_groups():
    s = build_summary(night_results(), meta={"status": "complete"}, shrinks={}, known=KNOWN, previous=None,
                      out_dir=Path("/n"))  # fmt: skip
    t = s["totals"]
    assert t["ops"] == 180 and t["chunks"] == 2 and t["chunks_lost"] == 1
    assert t["findings"] == 5  # the lost chunk's finding is not counted
    groups = {f["key"]: f for f in s["findings"]}
    assert set(groups) == {"SPEC MAP-2 slot", "IMPL SLOT rc", "SPEC Q-3 slot"}
    assert groups["SPEC MAP-2 slot"]["status"] == "known" and groups["SPEC MAP-2 slot"]["count"] == 2
    assert groups["IMPL SLOT rc"]["status"] == "new" and groups["IMPL SLOT rc"]["chunks"] == 2
    # first seen in the chunk that reported first (c00001 ended at 1008)
    assert groups["IMPL SLOT rc"]["first_chunk"] == "c00001" and groups["IMPL SLOT rc"]["first_op"] == 3
    assert groups["SPEC Q-3 slot"]["status"] == "consequence"
    # K counts the op findings of the chunk's trace: c00001's first one is IMPL SLOT rc
    assert groups["IMPL SLOT rc"]["debug"] == "hil debug /n/traces/c00001.jsonl --finding 0"
    assert groups["SPEC MAP-2 slot"]["debug"] == "hil debug /n/traces/c00000.jsonl --finding 0"
    assert (t["new"], t["known"], t["consequence"]) == (1, 1, 1)
    assert s["ops_by_kind"] == {"Map": 178, "Query": 2}
    assert s["outcomes"]["Query"] == {"ERR": 2}
    assert s["clause_coverage"]["MAP-2"] == {"evaluated": 180, "exercised": 6, "violated": 2}
    assert "MAP-2" not in s["never_exercised"] and "MAP-3" in s["never_exercised"]
    assert [p["ops"] for p in s["timeline"]] == [80, 180]


def test_facet_of_a_known_violation_is_known():
    # U-NEW names the slot and the `uniques` map at one op: one violation, known by its slot facet
    known = {("SPEC", "U-NEW", "slot")}
    r = result("c00000", 10, [finding("SPEC", "U-NEW", "usage", 4), finding("SPEC", "U-NEW", "uniques", 4),
                              finding("SPEC", "U-NEW", "uniques", 8)], t0=0.0, dt=1.0)  # fmt: skip
    s = build_summary([r], meta={}, shrinks={}, known=known, previous=None, out_dir=Path("/n"))
    groups = {f["key"]: f for f in s["findings"]}
    assert groups["SPEC U-NEW slot"]["count"] == 2
    assert groups["SPEC U-NEW uniques"]["count"] == 1 and groups["SPEC U-NEW uniques"]["status"] == "new"


def test_an_axioms_inv_conjunct_beside_its_invariant_is_a_consequence():
    # as Baseline.judge: SPEC inv:S1 fails because INVARIANT S1 broke at that very op; the
    # invariant is the root cause (new here), the axiom's conjunct never new by itself
    r = result("c00000", 10, [finding("INVARIANT", "S1", "rc", 4), finding("SPEC", "MAP-4", "inv:S1", 4),
                              finding("SPEC", "MAP-4", "inv:S1", 6)], t0=0.0, dt=1.0)  # fmt: skip
    s = build_summary([r], meta={}, shrinks={}, known=set(), previous=None, out_dir=Path("/n"))
    groups = {f["key"]: f for f in s["findings"]}
    assert groups["INVARIANT S1 slot"]["status"] == "new"
    spec = groups["SPEC MAP-4 inv"]
    # op 6 has no INVARIANT S1 beside it: that occurrence is a root cause of its own
    assert spec["count"] == 2 and spec["consequences"] == 1 and spec["status"] == "new"
    r2 = result("c00000", 10, r.findings[:2], t0=0.0, dt=1.0)
    s2 = build_summary([r2], meta={}, shrinks={}, known=set(), previous=None, out_dir=Path("/n"))
    assert {f["key"]: f["status"] for f in s2["findings"]}["SPEC MAP-4 inv"] == "consequence"
    assert junit_xml(s2).count("<failure") == 1  # the invariant only


def test_previous_night_new_fixed_unchanged():
    prev = {"version": 1, "out": "/prev", "findings": [{"key": "SPEC MAP-2 slot", "count": 4},
                                                       {"key": "SPEC UNMAP-2 slot", "count": 1},
                                                       {"key": "IMPL SLOT rc", "count": 1}]}  # fmt: skip
    rs = night_results() + [result("c00003", 10, [finding("IMPL", "PTE", "flags", 2)], t0=1020.0, dt=1.0)]
    s = build_summary(rs, meta={}, shrinks={}, known=KNOWN, previous=prev, out_dir=Path("/n"))
    groups = {f["key"]: f for f in s["findings"]}
    assert groups["IMPL PTE flags"]["since_previous"] == "new" and groups["IMPL PTE flags"]["status"] == "new"
    assert groups["IMPL SLOT rc"]["since_previous"] == "unchanged" and groups["IMPL SLOT rc"]["status"] == "seen-before"
    assert groups["SPEC MAP-2 slot"]["since_previous"] == "unchanged"
    assert [f["key"] for f in s["fixed"]] == ["SPEC UNMAP-2 slot"]
    assert s["totals"]["new"] == 1 and s["totals"]["fixed"] == 1


def test_junit_fails_new_root_causes_only():
    s = build_summary(night_results(), meta={}, shrinks={}, known=KNOWN, previous=None, out_dir=Path("/n"))
    suite = ET.fromstring(junit_xml(s))
    cases = suite.findall("testcase")
    assert len(cases) == len(s["findings"]) + 1
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["SLOT rc"]
    assert suite.get("errors") == "1"  # the lost chunk


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.rows: dict[str, int] = {}
        self.table: str | None = None
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self.table = a.get("id")
        if tag == "tr" and self.table:
            self.rows[self.table] = self.rows.get(self.table, 0) + 1
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])


def test_html_is_self_contained_with_decodable_plots(tmp_path):
    shrinks = {"IMPL SLOT rc": {"ok": True, "trace": "regressions/IMPL-SLOT-rc.jsonl", "events": 3,
                                "debug": "hil debug /n/regressions/IMPL-SLOT-rc.jsonl --finding 0"}}  # fmt: skip
    s = build_summary(night_results(), meta={"status": "complete"}, shrinks=shrinks, known=KNOWN, previous=None,
                      out_dir=tmp_path)  # fmt: skip
    write_report(tmp_path, s)
    page = (tmp_path / "report.html").read_text()
    p = _Collect()
    p.feed(page)
    assert p.external == []
    assert len(p.imgs) == 3
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert p.rows["findings"] == 1 + len(s["findings"])  # the header row + one per root cause
    assert "hil debug /n/regressions/IMPL-SLOT-rc.jsonl --finding 0" in page
    assert json.loads((tmp_path / "summary.json").read_text())["totals"] == s["totals"]
    assert not list(tmp_path.glob("*.tmp"))
    assert render_html(s) == page


def test_summarize_trace_survives_a_torn_last_line():
    lines = [{"type": "header", "version": 1, "guest_build_id": "ab"},
             {"type": "note", "what": "booted", "findings": [finding("SPEC", "VS-NEW-1", "inv:S1", -1)]},
             {"type": "event", "index": 0, "event": {"op": "NewVmSpace"}, "result": {"status": "OK"}, "findings": []},
             {"type": "event", "index": 1, "event": {"op": "Map"}, "result": {"status": "ERR"},
              "findings": [finding("SPEC", "MAP-2", "rc", 1)]}]  # fmt: skip
    text = "\n".join(json.dumps(x, sort_keys=True) for x in lines) + '\n{"type": "event", "ind'
    s = summarize_trace(text)
    assert s["ops_done"] == 2 and s["booted"] and s["end"] is None
    assert s["outcomes"] == {"NewVmSpace": {"OK": 1}, "Map": {"ERR": 1}}
    assert [f["clause"] for f in s["findings"]] == ["VS-NEW-1", "MAP-2"]


def test_spec_and_result_round_trip():
    spec = ChunkSpec("c00004", 5, 100, "/img", deadline=12.5, attempt=2)
    assert ChunkSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    r = night_results()[0]
    d = json.loads(json.dumps(r.to_json(with_trace=False)))
    assert "trace_text" not in d and ChunkResult.from_json(d).findings == r.findings


@pytest.mark.parametrize("text,seconds", [("8h", 28800), ("30m", 1800), ("60s", 60), ("90", 90), ("1h30m", 5400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "8 hours", "h", "1x", "-5s"])
def test_parse_duration_refuses(text):
    with pytest.raises(ConfigError, match="--budget"):
        parse_duration(text)


def test_night_refuses_another_nights_directory(tmp_path):
    cfg = {"guest_build_id": "ab", "profile": "default", "chunk_ops": 100, "seed": 1, "budget_s": 60}
    Night.open(tmp_path / "n", cfg)
    again = Night.open(tmp_path / "n", cfg)  # the same night: resumed
    assert again.results == {} and again.spent_s == 0
    with pytest.raises(ConfigError, match="guest_build_id"):
        Night.open(tmp_path / "n", {**cfg, "guest_build_id": "cd"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        Night.open(tmp_path / "other", cfg)
    assert re.fullmatch(r"\d+", str(len(list((tmp_path / "n").iterdir()))))


def test_plain_progress_lines():
    import io

    from hil.workflows.nightly import Progress

    out = io.StringIO()  # not a terminal: plain lines, at most one per interval
    p = Progress(interval=3600, stream=out)
    p.on_event((0.0, {"chunk": "c00001", "attempt": 1, "ops": 0, "worker": "tcp://w1", "t": 100.0}))
    p.on_event((0.0, {"chunk": "c00001", "attempt": 1, "ops": 50, "worker": "tcp://w1", "t": 102.0}))
    p.update(1000, 3725, 1, 7, 4, 0, force=True)
    p.update(2000, 3000, 1, 7, 4, 0)  # within the interval: nothing
    p.done("c00001")
    lines = out.getvalue().splitlines()
    assert lines == ["nightly: 1050 ops, budget left 1h02m05s, findings new 1 known 7, chunks done 4 running 1 "
                     "lost 0; ops/s per worker: tcp://w1 25.0"]  # fmt: skip
    assert p.live is None


def test_groups_kept_per_chunk_give_the_same_summary():
    from hil.workflows.report import chunk_groups

    rs = night_results()
    full = build_summary(rs, meta={}, shrinks={}, known=KNOWN, previous=None, out_dir=Path("/n"))
    cache = {r.chunk_id: chunk_groups(r, KNOWN) for r in rs if r.counted}
    for r in rs:
        if r.counted:
            r.findings = []  # what a long night keeps in memory: the groups only
    assert build_summary(rs, meta={}, shrinks={}, known=KNOWN, previous=None, out_dir=Path("/n"),
                         groups_cache=cache) == full  # fmt: skip
