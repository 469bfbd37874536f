"""The morning report of a nightly: DIR/summary.json, DIR/junit.xml, DIR/report.html.

Built from ChunkResults (and the shrink results) only, never from a live run: the same
function writes the report of a finished night, of an interrupted one, and of a resumed one.
The HTML is self-contained and readable offline: inline CSS, plots as inline base64 PNG
(matplotlib, Agg backend), no script from elsewhere.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from hil.check import Finding
from hil.run import baseline as bl
from hil.workflows.chunk import ChunkResult

SUMMARY_VERSION = 1
Signature = tuple[str, str, str]


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds") if t else ""


def group_key(sig: Sequence[str]) -> str:
    return " ".join(sig)


def slug(sig: Sequence[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(sig)).strip("_")


@dataclass
class Group:
    """One root cause: every finding of one signature (kind, clause, field class)."""

    signature: Signature
    count: int = 0
    chunks: set[str] = field(default_factory=set)
    first_chunk: str = ""
    first_op: int = 0
    first_seen: float = 0.0  # when the chunk that first showed it reported (wall clock)
    first_k: int = -1  # its position among the op findings of its chunk's trace (`hil debug --finding K`)
    consequences: int = 0  # occurrences the baseline judges consequences (caused_by, a SPEC inv:X)
    example: str = ""  # Finding.describe() of the first occurrence

    @property
    def root_cause(self) -> bool:
        return self.count > self.consequences


def counted(results: Iterable[ChunkResult]) -> list[ChunkResult]:
    """The results whose ops count, one per chunk (the last attempt stands), in chunk order."""
    by_id: dict[str, ChunkResult] = {}
    for r in results:
        if r.counted:
            by_id[r.chunk_id] = r
    return [by_id[k] for k in sorted(by_id)]


def judged(findings: Sequence[dict[str, Any]], known: set[Signature]) -> list[tuple[Signature, str]]:
    """Each finding's group and verdict ("known", "consequence", "new"), exactly as the baseline
    judges it (hil.run.baseline.Baseline.judge): a SPEC or INVARIANT finding whose clause also
    fails at the same op under a known signature joins that known group; a finding with
    `caused_by`, or a SPEC `inv:X` beside the INVARIANT X of its op, is a consequence."""
    baseline = bl.Baseline({sig: bl.Entry(*sig, trace="", reason="") for sig in known})
    return [(sig, verdict) for _f, verdict, sig in baseline.judge(Finding.from_json(d) for d in findings)]


def root_signatures(findings: Sequence[dict[str, Any]], known: set[Signature]) -> list[Signature]:
    """Each finding's group (`judged`)."""
    return [sig for sig, _verdict in judged(findings, known)]


def chunk_groups(r: ChunkResult, known: set[Signature]) -> dict[Signature, Group]:
    """One chunk's findings as root-cause groups (a night keeps these, not every finding)."""
    groups: dict[Signature, Group] = {}
    k = 0  # boot-state findings (op -1, from the trace's "booted" note) are not op findings
    for d, (sig, verdict) in zip(r.findings, judged(r.findings, known), strict=True):
        f = Finding.from_json(d)
        g = groups.get(sig)
        if g is None:
            g = groups[sig] = Group(sig, first_chunk=r.chunk_id, first_op=f.op_index, first_seen=r.finished,
                                    first_k=k if f.op_index >= 0 else -1, example=f.describe())  # fmt: skip
        k += f.op_index >= 0
        g.count += 1
        g.chunks.add(r.chunk_id)
        if verdict == "consequence":
            g.consequences += 1
    return groups


def group_findings(
    results: Sequence[ChunkResult], known: set[Signature] | None = None,
    cache: dict[str, dict[Signature, Group]] | None = None,
) -> dict[Signature, Group]:  # fmt: skip
    """The night's groups: each chunk's (from `cache` by chunk id when there, so a long night
    need not keep every finding in memory), merged in the order the chunks reported."""
    groups: dict[Signature, Group] = {}
    for r in sorted(counted(results), key=lambda r: r.finished):
        per = cache.get(r.chunk_id) if cache is not None else None
        if per is None:
            per = chunk_groups(r, known or set())
        for sig, cg in per.items():
            g = groups.get(sig)
            if g is None:
                g = groups[sig] = Group(sig, first_chunk=cg.first_chunk, first_op=cg.first_op,
                                        first_seen=cg.first_seen, first_k=cg.first_k, example=cg.example)  # fmt: skip
            g.count += cg.count
            g.consequences += cg.consequences
            g.chunks |= cg.chunks
    return groups


def merge_counts(results: Sequence[ChunkResult]) -> dict[str, Any]:
    ops_by_kind: dict[str, int] = {}
    outcomes: dict[str, dict[str, int]] = {}
    coverage: dict[str, dict[str, int]] = {"evaluated": {}, "exercised": {}, "violated": {}}
    for r in counted(results):
        for k, n in r.ops_by_kind.items():
            ops_by_kind[k] = ops_by_kind.get(k, 0) + n
        for k, per in r.outcomes.items():
            mine = outcomes.setdefault(k, {})
            for s, n in per.items():
                mine[s] = mine.get(s, 0) + n
        for part in coverage:
            for c, n in (r.coverage.get(part) or {}).items():
                coverage[part][c] = coverage[part].get(c, 0) + n
    return {"ops_by_kind": dict(sorted(ops_by_kind.items())),
            "outcomes": {k: dict(sorted(v.items())) for k, v in sorted(outcomes.items())},
            "coverage": {p: dict(sorted(v.items())) for p, v in coverage.items()}}  # fmt: skip


def all_clauses() -> list[str]:
    from model.axioms import CLAUSES

    return [c.id for c in CLAUSES]


def build_summary(
    results: Sequence[ChunkResult], *, meta: dict[str, Any], shrinks: dict[str, dict[str, Any]],
    known: set[Signature], previous: dict[str, Any] | None, out_dir: Path,
    groups_cache: dict[str, dict[Signature, Group]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every number of the report. `shrinks`: group key -> {"ok", "trace", "events", "error",
    "debug"}; `known`: the baseline's signatures; `previous`: the previous night's summary."""
    rs = counted(results)
    groups = group_findings(results, known, groups_cache)
    prev_groups = {g["key"]: g for g in (previous or {}).get("findings", [])}
    ops = sum(r.ops_done for r in rs)
    busy = sum(max(r.finished - r.started, 0.0) for r in rs)
    started = min((r.started for r in rs), default=0.0)
    finished = max((r.finished for r in rs), default=0.0)
    counts = merge_counts(results)
    cov = counts["coverage"]
    clauses = all_clauses()
    findings = []
    for sig, g in sorted(groups.items(), key=lambda kv: (kv[1].first_seen, kv[0])):  # status order below
        key = group_key(sig)
        in_baseline = sig in known
        if not g.root_cause:
            status = "consequence"
        elif in_baseline:
            status = "known"
        elif previous is not None and key in prev_groups:
            status = "seen-before"  # not in the baseline, but last night had it too
        else:
            status = "new"
        entry: dict[str, Any] = {
            "key": key, "kind": sig[0], "clause": sig[1], "field": sig[2], "status": status,
            "count": g.count, "consequences": g.consequences, "chunks": len(g.chunks),
            "first_seen": iso(g.first_seen), "first_chunk": g.first_chunk, "first_op": g.first_op,
            "example": g.example, "chunk_trace": f"traces/{g.first_chunk}.jsonl",
        }  # fmt: skip
        if previous is not None:
            entry["since_previous"] = "unchanged" if key in prev_groups else "new"
        if g.first_k >= 0:
            # the chunk's whole trace until a minimal one exists (or if minimising failed)
            entry["debug"] = f"hil debug {out_dir / entry['chunk_trace']} --finding {g.first_k}"
        sh = shrinks.get(key)
        if sh:
            entry["minimal_trace"] = sh.get("trace", "")
            entry["minimal_events"] = sh.get("events", 0)
            entry["debug"] = sh.get("debug") or entry.get("debug", "")
            if sh.get("facet_of"):
                entry["facet_of"] = sh["facet_of"]  # first seen at the same op: one minimal trace
            if not sh.get("ok"):
                entry["shrink_error"] = sh.get("error", "")
        findings.append(entry)
    # what a person acts on first: new, then last night's, known, consequences; each by first seen
    order = {"new": 0, "seen-before": 1, "known": 2, "consequence": 3}
    findings.sort(key=lambda f: order[f["status"]])
    fixed = []
    if previous is not None:
        tonight = {f["key"] for f in findings}
        fixed = [{"key": k, "count_previous": g.get("count", 0)} for k, g in sorted(prev_groups.items())
                 if k not in tonight]  # fmt: skip
    chunks = []
    retries = []
    for r in sorted(results, key=lambda r: r.chunk_id):
        cached = (groups_cache or {}).get(r.chunk_id)
        nfind = sum(g.count for g in cached.values()) if cached is not None else len(r.findings)
        chunks.append({"id": r.chunk_id, "seed": r.seed, "attempt": r.attempt, "status": r.status,
                       "ops": r.ops_done, "worker": r.worker, "started": iso(r.started), "finished": iso(r.finished),
                       "seconds": round(r.finished - r.started, 3), "stopped_by": r.stopped_by,
                       "findings": nfind, "error": r.error[:500]})  # fmt: skip
        for n in r.retries:
            retries.append({"chunk": r.chunk_id, **n})
    timeline = []
    total = 0
    for r in sorted(rs, key=lambda r: r.finished):
        total += r.ops_done
        rate = round(r.ops_done / (r.finished - r.started), 2) if r.finished > r.started else 0.0
        timeline.append({"t": round(r.finished - started, 3), "ops": total, "chunk": r.chunk_id, "worker": r.worker,
                         "rate": rate})  # fmt: skip
    by_status: dict[str, int] = {}
    for f in findings:
        by_status[f["status"]] = by_status.get(f["status"], 0) + 1
    return {
        "version": SUMMARY_VERSION,
        **meta,
        "out": str(out_dir),
        "started": iso(started), "finished": iso(finished),
        "totals": {
            "ops": ops, "chunks": len(rs), "chunks_lost": sum(1 for r in results if not r.counted),
            "retries": len(retries), "worker_seconds": round(busy, 3),
            "ops_per_s": round(ops / (finished - started), 2) if finished > started else 0.0,
            "findings": sum(g.count for g in groups.values()), "groups": len(findings),
            "new": by_status.get("new", 0), "known": by_status.get("known", 0),
            "seen_before": by_status.get("seen-before", 0), "consequence": by_status.get("consequence", 0),
            "fixed": len(fixed), "booted": any(r.booted for r in results),
        },  # fmt: skip
        "ops_by_kind": counts["ops_by_kind"],
        "outcomes": counts["outcomes"],
        "clause_coverage": {
            c: {"evaluated": cov["evaluated"].get(c, 0), "exercised": cov["exercised"].get(c, 0),
                "violated": cov["violated"].get(c, 0)} for c in clauses
        },  # fmt: skip
        "never_exercised": [c for c in clauses if not cov["exercised"].get(c, 0)],
        "findings": findings,
        "fixed": fixed,
        "previous": (previous or {}).get("out"),
        "previous_build_id": (previous or {}).get("guest_build_id"),
        "previous_ops": ((previous or {}).get("totals") or {}).get("ops"),
        "chunks": chunks,
        "retries": retries,
        "timeline": timeline,
    }


# --- junit ----------------------------------------------------------------------------------


def junit_xml(summary: dict[str, Any]) -> str:
    """One test case per root cause (a new one fails) and one for the infrastructure (lost
    chunks fail it), so CI tools show a night like a test run."""
    findings = summary["findings"]
    suite = ET.Element("testsuite", name="hil-nightly", tests=str(len(findings) + 1),
                       failures=str(sum(1 for f in findings if f["status"] == "new")),
                       errors=str(1 if summary["totals"]["chunks_lost"] else 0),
                       timestamp=summary.get("started") or "")  # fmt: skip
    for f in findings:
        case = ET.SubElement(suite, "testcase", classname=f"hil.nightly.{f['kind']}",
                             name=f"{f['clause']} {f['field']}")  # fmt: skip
        if f["status"] == "new":
            fail = ET.SubElement(case, "failure", message=f"new finding {f['key']} ({f['count']}x)")
            fail.text = f"{f['example']}\nminimal trace: {f.get('minimal_trace', '-')}\n{f.get('debug', '')}"
        else:
            ET.SubElement(case, "system-out").text = f"{f['status']}: {f['count']}x"
    infra = ET.SubElement(suite, "testcase", classname="hil.nightly", name="infrastructure")
    if summary["totals"]["chunks_lost"]:
        ET.SubElement(infra, "error", message=f"{summary['totals']['chunks_lost']} chunks lost to infrastructure")
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


# --- html -----------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plots(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, data URI) of every plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit: a PNG in memory
    from matplotlib.figure import Figure

    out = []
    tl = summary["timeline"]
    fig = Figure(figsize=(7, 3))
    ax = fig.add_subplot()
    ax.plot([0] + [p["t"] for p in tl], [0] + [p["ops"] for p in tl], drawstyle="steps-post")
    ax.set_xlabel("seconds since the first chunk started")
    ax.set_ylabel("checked ops (cumulative)")
    fig.tight_layout()
    out.append(("Checked ops over time", _png(fig)))
    fig = Figure(figsize=(7, 3))
    ax = fig.add_subplot()
    workers = sorted({p["worker"] for p in tl})
    for w in workers:
        pts = [p for p in tl if p["worker"] == w]
        ax.plot([p["t"] for p in pts], [p["rate"] for p in pts], marker="o", label=w)
    ax.set_xlabel("seconds (chunk end)")
    ax.set_ylabel("ops/s per chunk")
    if workers:
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    out.append(("Ops/s per worker over time", _png(fig)))
    cc = summary["clause_coverage"]
    names = list(cc)
    fig = Figure(figsize=(max(7, len(names) * 0.12), 3))
    ax = fig.add_subplot()
    xs = range(len(names))
    ax.bar(xs, [cc[c]["evaluated"] for c in names], label="evaluated", color="#bbb")
    ax.bar(xs, [cc[c]["exercised"] for c in names], label="antecedent held", color="#4a8")
    ax.bar(xs, [cc[c]["violated"] for c in names], label="violated", color="#c33")
    ax.set_yscale("symlog")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=5)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    out.append(("Clause coverage", _png(fig)))
    return out


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str = "") -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else e(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)  # fmt: skip
    tid = f' id="{e(table_id)}"' if table_id else ""
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;
vertical-align:top}th{background:#f3f3f3}.new{background:#fdd}.known{background:#eef}.fixed{background:#dfd}
code{font-size:12px}img{display:block;margin:.3em 0 1.2em;max-width:100%}.nums td:nth-child(2){text-align:right}
"""

# counts the plots that decoded, so a browser test (and a person) sees a broken image at once
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-plots-loaded', ok + '/' + imgs.length);
});
"""


def render_html(summary: dict[str, Any]) -> str:
    e = html.escape
    t = summary["totals"]
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>hil nightly {e(summary['out'])}</title>"
             f"<style>{CSS}</style><script>{CHECK_SCRIPT}</script></head><body>"]  # fmt: skip
    parts.append(f"<h1>hil nightly — {e(summary.get('started', ''))}</h1>")
    parts.append(f"<p>status <b id=status>{e(summary.get('status', ''))}</b>; image "
                 f"<code>{e(str(summary.get('image')))}</code> (build {e(str(summary.get('guest_build_id', '')))}), "
                 f"profile {e(str(summary.get('profile')))}; budget {e(str(summary.get('budget_s')))} s</p>")
    nums = [("checked ops", t["ops"]), ("ops/s (whole night)", t["ops_per_s"]), ("chunks", t["chunks"]),
            ("chunks lost", t["chunks_lost"]), ("retries", t["retries"]), ("findings", t["findings"]),
            ("root causes", t["groups"]), ("new", t["new"]), ("known (baseline)", t["known"]),
            ("fixed since previous", t["fixed"])]  # fmt: skip
    parts.append("<h2>Numbers</h2><table class=nums id=numbers>" +
                 "".join(f"<tr><td>{e(k)}</td><td data-key='{e(k)}'>{e(str(v))}</td></tr>" for k, v in nums) +
                 "</table>")  # fmt: skip
    parts.append("<h2>Findings by root cause</h2>")
    rows = []
    for f in summary["findings"]:
        trace = f.get("minimal_trace") or f["chunk_trace"]
        debug = f.get("debug") or ""
        rows.append([_Raw(f"<span class={e(f['status'])}>{e(f['status'])}</span>"), f["kind"], f["clause"], f["field"],
                     f["count"], f["first_seen"], f"{f['first_chunk']} op {f['first_op']}",
                     _Raw(f"<code>{e(trace)}</code>" + (f" ({f['minimal_events']} events)" if "minimal_events" in f
                                                          else "")),
                     _Raw(f"<code>{e(debug)}</code>" if debug else e(f.get("shrink_error", "")[:200])),
                     f.get("since_previous", "")])  # fmt: skip
    parts.append(_table(["status", "kind", "clause", "field", "count", "first seen", "where",
                         "minimal trace", "open in gdb", "since previous"], rows, "findings"))  # fmt: skip
    if summary.get("previous"):
        parts.append(f"<h2>Since {e(summary['previous'])}</h2><p>that night: build "
                     f"{e(str(summary.get('previous_build_id')))}, {e(str(summary.get('previous_ops')))} ops; "
                     f"\"fixed\" means not seen tonight</p>")  # fmt: skip
        new = [f["key"] for f in summary["findings"] if f.get("since_previous") == "new"]
        same = [f["key"] for f in summary["findings"] if f.get("since_previous") == "unchanged"]
        parts.append(_table(["", "root causes"], [
            ["new", ", ".join(new) or "none"], ["fixed", ", ".join(x["key"] for x in summary["fixed"]) or "none"],
            ["unchanged", ", ".join(same) or "none"]], "since-previous"))  # fmt: skip
    for title, uri in plots(summary):
        parts.append(f"<h2>{e(title)}</h2><img class=plot alt='{e(title)}' src='{uri}'>")
    parts.append("<h2>Clause coverage</h2>")
    never = summary["never_exercised"]
    parts.append(f"<p>never exercised: {e(', '.join(never)) if never else 'none'}</p>")
    cc = summary["clause_coverage"]
    parts.append(_table(["clause", "evaluated", "antecedent held", "violated"],
                        [[c, v["evaluated"], v["exercised"], v["violated"]] for c, v in cc.items()], "coverage"))
    parts.append("<h2>Op outcomes</h2>")
    statuses = sorted({s for per in summary["outcomes"].values() for s in per})
    parts.append(_table(["op", *statuses, "total"],
                        [[k, *(per.get(s, 0) for s in statuses), sum(per.values())]
                         for k, per in summary["outcomes"].items()], "outcomes"))  # fmt: skip
    parts.append("<h2>Chunks</h2>")
    parts.append(_table(["chunk", "seed", "attempt", "status", "ops", "seconds", "worker", "stopped by", "error"],
                        [[c["id"], c["seed"], c["attempt"], c["status"], c["ops"], c["seconds"], c["worker"],
                          c["stopped_by"], c["error"][:200]] for c in summary["chunks"]], "chunks"))  # fmt: skip
    if summary["retries"]:
        parts.append("<h2>Retries</h2>")
        parts.append(_table(["chunk", "attempt", "reason", "error"],
                            [[r["chunk"], r.get("attempt", ""), r.get("reason", ""), str(r.get("error", ""))[:300]]
                             for r in summary["retries"]], "retries"))  # fmt: skip
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(out_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json, junit.xml, report.html, each replaced whole (never half written)."""
    for name, text in (("summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n"),
                       ("junit.xml", junit_xml(summary)), ("report.html", render_html(summary))):  # fmt: skip
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)
