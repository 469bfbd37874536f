"""A baseline of known findings: a run passes when it meets only these, fails on a new one,
and reports the known ones it no longer meets as fixed.

An entry is keyed by the finding's root-cause signature: kind, clause and field class —
never a handle id, a slot or an address, which change from run to run. Each entry names
the minimal trace that reproduces it and says why it is accepted.

File (JSON, version 1; trace paths relative to the baseline file's directory):

    {"version": 1, "entries": [
      {"kind": "SPEC", "clause": "MAP-2", "field": "slot",
       "trace": "findings/spec-MAP-2.jsonl", "reason": "exec releases the replaced frame ..."}]}

`update` rewrites it from a directory of minimal traces (tests/data/findings/, one per
confirmed finding, its signature in the header): reasons of entries that stay are kept, new
entries get TODO_REASON for a person to fill, entries without a trace any more are dropped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil.check import Finding, Kind
from hil.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED_BASELINE = REPO / "tests" / "data" / "baseline.json"
FINDINGS_DIR = REPO / "tests" / "data" / "findings"
BASELINE_VERSION = 1
TODO_REASON = "TODO: say why this finding is known and accepted"
ENTRY_KEYS = ("kind", "clause", "field", "trace", "reason")

# The fields a slot diff names ("rc,vt,sto,paths": whichever ghost fields changed) depend on
# the instance (was it the frame's last user?), not on the cause: for SPEC and INVARIANT
# findings they are one class. IMPL fields stay apart: SLOT rc and SLOT paths are two bugs.
SLOT_FIELDS = frozenset({"rc", "usage", "inl", "vt", "sto", "paths", "node", "refs", "parked", "wf", "slot",
                         "H", "P", "C", "FULL"})  # fmt: skip
_ID_SUFFIX = re.compile(r"\s+\d+$")  # "cursor 3", "frame 12": a handle id

SPEC_LIKE = (str(Kind.SPEC), str(Kind.INVARIANT))  # the spec's own clauses (the rest: bugs, kept precise)

Signature = tuple[str, str, str]  # (kind, clause, field class)


def field_class(kind: str, field_name: str) -> str:
    """The part of a finding's field that names a cause: ids dropped; for SPEC/INVARIANT the
    slot-diff fields are one class "slot", and "inv:X" (the axiom's A.inv conjunct, failing
    because invariant X broke at this op) is "inv" — X itself is its own INVARIANT finding."""
    name = _ID_SUFFIX.sub("", field_name.strip())
    if kind not in SPEC_LIKE:
        return name
    if name.startswith("inv:"):
        return "inv"
    parts = {_ID_SUFFIX.sub("", p.strip()) for p in re.split(r"[,/]", name) if p.strip()}
    if parts and parts <= SLOT_FIELDS:
        return "slot"
    return "+".join(sorted(parts)) or name


def signature(f: Finding) -> Signature:
    return (str(f.kind), f.clause, field_class(str(f.kind), f.field))


def caused_by(f: Finding) -> int | None:
    """The earlier finding this one is a consequence of (issue 13 adds the field)."""
    value = getattr(f, "caused_by", None)
    return value if isinstance(value, int) else None


@dataclass(frozen=True)
class Entry:
    kind: str
    clause: str
    field: str  # the field class
    trace: str  # relative to the baseline file's directory
    reason: str

    @property
    def key(self) -> Signature:
        return (self.kind, self.clause, self.field)

    def describe(self) -> str:
        return f"{self.kind} {self.clause} {self.field}"


@dataclass
class Verdict:
    """A run's findings against a baseline."""

    new: list[Finding] = field(default_factory=list)
    known: Counter[Signature] = field(default_factory=Counter)
    consequences: int = 0  # findings with caused_by set: never new by themselves
    fixed: list[Entry] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.new

    def new_signatures(self) -> dict[Signature, Finding]:
        """The first finding of each new signature."""
        out: dict[Signature, Finding] = {}
        for f in self.new:
            out.setdefault(signature(f), f)
        return out

    def describe(self) -> str:
        lines = []
        for sig, f in self.new_signatures().items():
            n = sum(1 for g in self.new if signature(g) == sig)
            lines.append(f"NEW {' '.join(sig)} ({n}x, first op {f.op_index}): {f.describe()}")
        known = ", ".join(f"{' '.join(s)} {n}x" for s, n in sorted(self.known.items()))
        lines.append(f"known: {known or 'none'}" + (f"; {self.consequences} consequences" if self.consequences else ""))
        for e in self.fixed:
            lines.append(f"fixed? {e.describe()} not seen in this run (its minimal trace: {e.trace})")
        return "\n".join(lines)


@dataclass
class Baseline:
    entries: dict[Signature, Entry] = field(default_factory=dict)
    path: Path | None = None

    # --- file ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path | str) -> Baseline:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"baseline {path} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"baseline {path}: not readable JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("version") != BASELINE_VERSION:
            got = data.get("version") if isinstance(data, dict) else None
            raise ConfigError(f"baseline {path}: version {got!r}, this tool reads {BASELINE_VERSION}")
        raw = data.get("entries")
        if not isinstance(raw, list):
            raise ConfigError(f"baseline {path}: 'entries' must be a list")
        out = cls(path=path)
        for n, e in enumerate(raw):
            if not isinstance(e, dict) or set(e) != set(ENTRY_KEYS) or not all(isinstance(e[k], str) for k in e):
                raise ConfigError(f"baseline {path}: entry {n} must have exactly the string keys {list(ENTRY_KEYS)}")
            entry = Entry(**{k: e[k] for k in ENTRY_KEYS})
            if entry.key in out.entries:
                raise ConfigError(f"baseline {path}: entry {n} ({entry.describe()}) is listed twice")
            out.entries[entry.key] = entry
        return out

    def dumps(self) -> str:
        entries = [{k: getattr(e, k) for k in ENTRY_KEYS} for _, e in sorted(self.entries.items())]
        return json.dumps({"version": BASELINE_VERSION, "entries": entries}, indent=2) + "\n"

    def save(self, path: Path | None = None) -> None:
        path = path or self.path
        assert path is not None
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.dumps(), encoding="utf-8")
        tmp.replace(path)  # never a half-written baseline
        self.path = path

    def trace_path(self, entry: Entry) -> Path:
        base = self.path.parent if self.path else Path.cwd()
        return base / entry.trace

    # --- judging --------------------------------------------------------------------------------
    def new_in(self, findings: Sequence[Finding]) -> list[Finding]:
        """The findings of ONE op that are new (what `--stop-on-finding new` stops on)."""
        return self.compare(findings, report_fixed=False).new

    def judge(self, findings: Iterable[Finding]) -> list[tuple[Finding, str, Signature]]:
        """Each finding with its verdict — "known", "consequence" or "new" — and the signature
        of the group it counts under (a known facet: the known signature it joins). A SPEC or
        INVARIANT finding whose clause fails at the same op under a known signature is another
        facet of that one violation (e.g. U-NEW names the slot and the `uniques` map in one op):
        known. A finding with `caused_by`, and a SPEC `inv:X` finding beside the INVARIANT X
        finding of the same op, are consequences: never new by themselves."""
        found = list(findings)
        known_at: dict[tuple[int, str, str], Signature] = {}
        invariants_at: set[tuple[int, str]] = set()
        for f in found:
            if signature(f) in self.entries:
                known_at.setdefault((f.op_index, str(f.kind), f.clause), signature(f))
            if f.kind == Kind.INVARIANT:
                invariants_at.add((f.op_index, f.clause))
        out = []
        for f in found:
            sig = signature(f)
            if sig in self.entries:
                out.append((f, "known", sig))
            elif caused_by(f) is not None:
                out.append((f, "consequence", sig))
            elif f.kind == Kind.SPEC and f.field.startswith("inv:") and (f.op_index, f.field[4:]) in invariants_at:
                # the axiom's A.inv conjunct fails because invariant X broke at this very op:
                # the INVARIANT X finding beside it is the root cause, judged on its own
                out.append((f, "consequence", sig))
            elif str(f.kind) in SPEC_LIKE and (f.op_index, str(f.kind), f.clause) in known_at:
                out.append((f, "known", known_at[(f.op_index, str(f.kind), f.clause)]))
            else:
                out.append((f, "new", sig))
        return out

    def compare(self, findings: Iterable[Finding], *, report_fixed: bool = True) -> Verdict:
        """A run's findings sorted into new / known / consequences (see `judge`), and the
        entries the run never met (`fixed`)."""
        verdict = Verdict()
        for f, status, sig in self.judge(findings):
            if status == "known":
                verdict.known[sig] += 1
            elif status == "consequence":
                verdict.consequences += 1
            else:
                verdict.new.append(f)
        if report_fixed:
            verdict.fixed = [e for k, e in sorted(self.entries.items()) if k not in verdict.known]
        return verdict


def read_trace_signature(path: Path) -> tuple[Signature, str] | None:
    """The signature in a minimal trace's header (and its description), or None."""
    try:
        with open(path, encoding="utf-8") as fh:
            header: Any = json.loads(fh.readline())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    sig = header.get("finding") if isinstance(header, dict) else None
    if not (isinstance(sig, list) and len(sig) == 3 and all(isinstance(s, str) for s in sig)):
        return None
    kind, clause, fld = sig
    return (kind, clause, field_class(kind, fld)), str(header.get("description", ""))


@dataclass
class UpdateReport:
    added: list[Entry] = field(default_factory=list)
    kept: list[Entry] = field(default_factory=list)
    dropped: list[Entry] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # traces without a signature header

    def describe(self) -> str:
        lines = [f"{len(self.kept)} kept, {len(self.added)} added, {len(self.dropped)} dropped"]
        lines += [f"  added   {e.describe()}  ({e.trace}): fill in its reason" for e in self.added]
        lines += [f"  dropped {e.describe()}  (no minimal trace any more: {e.trace})" for e in self.dropped]
        lines += [f"  skipped {p}: no finding signature in its header" for p in self.skipped]
        return "\n".join(lines)


def update(path: Path, findings_dir: Path = FINDINGS_DIR) -> tuple[Baseline, UpdateReport]:
    """Rewrite the baseline at `path` from the minimal traces in `findings_dir`."""
    if not findings_dir.is_dir():
        raise ConfigError(f"findings directory {findings_dir} not found")
    old = Baseline.load(path) if path.exists() else Baseline(path=path)
    new = Baseline(path=path)
    report = UpdateReport()
    base = path.resolve().parent
    for trace in sorted(findings_dir.glob("*.jsonl")):
        got = read_trace_signature(trace)
        if got is None:
            report.skipped.append(trace)
            continue
        sig, _description = got
        if sig in new.entries:
            continue  # two minimal traces of one root cause: the first (by name) stands for it
        try:
            rel = str(trace.resolve().relative_to(base))
        except ValueError:
            rel = str(trace.resolve())
        prev = old.entries.get(sig)
        entry = Entry(*sig, trace=rel, reason=prev.reason if prev else TODO_REASON)
        new.entries[sig] = entry
        (report.kept if prev else report.added).append(entry)
    report.dropped = [e for k, e in sorted(old.entries.items()) if k not in new.entries]
    new.save(path)
    return new, report


def todo_entries(baseline: Baseline) -> list[Entry]:
    return [e for e in baseline.entries.values() if e.reason.strip() == TODO_REASON or not e.reason.strip()]
