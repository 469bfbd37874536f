"""JSON-lines traces: a header, one line per event (op or poke), an end line.

Written as the run goes (one flushed line per op) so a crash loses nothing already done.
Reading is strict: a corrupt, truncated or wrong-version trace is a clear `TraceError`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from hil.check import Finding
from model import ops as m

TRACE_VERSION = 1


class TraceError(ValueError):
    pass


@dataclass(frozen=True)
class Poke:
    """Corrupt guest memory between ops (through the gdb stub). Harness-only event."""

    paddr: int
    data: bytes

    def __repr__(self) -> str:
        return f"Poke(paddr={self.paddr:#x}, data=bytes.fromhex({self.data.hex()!r}))"

    def to_json(self) -> dict[str, Any]:
        return {"op": "Poke", "paddr": self.paddr, "data": self.data.hex()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Poke:
        try:
            return cls(int(d["paddr"]), bytes.fromhex(d["data"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"bad poke record {d!r}") from exc


Event = m.Op | Poke


def event_from_json(d: dict[str, Any]) -> Event:
    if isinstance(d, dict) and d.get("op") == "Poke":
        return Poke.from_json(d)
    try:
        return m.Op.from_json(d)
    except ValueError as exc:
        raise TraceError(str(exc)) from exc


@dataclass
class Record:
    index: int
    event: Event
    result: m.OpResult | None = None
    findings: list[Finding] = field(default_factory=list)


@dataclass
class Trace:
    header: dict[str, Any]
    records: list[Record]
    end: dict[str, Any] | None
    notes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def events(self) -> list[Event]:
        return [r.event for r in self.records]

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.records for f in r.findings]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ostd-hil", "pygdbmi", "capstone", "pyelftools"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


class TraceWriter:
    """Appends lines and flushes each: `hil run` can die at any moment and keep its trace."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO | None = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._write({"type": "header", "version": TRACE_VERSION, **header})

    def _write(self, obj: dict[str, Any]) -> None:
        assert self._fh is not None
        self._fh.write(json.dumps(obj, sort_keys=True) + "\n")
        self._fh.flush()

    def record(self, index: int, event: Event, result: m.OpResult | None, findings: list[Finding]) -> None:
        line: dict[str, Any] = {"type": "event", "index": index, "event": event.to_json()}
        if result is not None:
            line["result"] = result.to_json()
        line["findings"] = [f.to_json() for f in findings]
        self._write(line)

    def note(self, what: str, **extra: Any) -> None:
        """A harness event that is not an op (e.g. an infrastructure retry)."""
        self._write({"type": "note", "what": what, **extra})

    def close(self, status: str, **extra: Any) -> None:
        if self._fh is None:
            return
        self._write({"type": "end", "status": status, **extra})
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def read_trace(path: Path) -> Trace:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read: {exc}") from exc
    if not lines:
        raise TraceError(f"{path}: empty trace")
    records: list[Record] = []
    header: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    notes: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{n}: not JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise TraceError(f"{path}:{n}: not a record")
        kind = obj.get("type")
        if n == 1:
            if kind != "header":
                raise TraceError(f"{path}:1: the first line is not a trace header")
            if obj.get("version") != TRACE_VERSION:
                raise TraceError(f"{path}: trace version {obj.get('version')!r}, this tool reads {TRACE_VERSION}")
            header = obj
            continue
        if end is not None:
            raise TraceError(f"{path}:{n}: records after the end line")
        if kind == "end":
            end = obj
        elif kind == "note":
            notes.append(obj)
        elif kind == "event":
            try:
                event = event_from_json(obj["event"])
                result = m.OpResult.from_json(obj["result"]) if "result" in obj else None
                findings = [Finding.from_json(f) for f in obj.get("findings", [])]
                index = int(obj["index"])
            except (KeyError, TypeError, ValueError) as exc:
                raise TraceError(f"{path}:{n}: bad event record: {exc}") from exc
            records.append(Record(index, event, result, findings))
        else:
            raise TraceError(f"{path}:{n}: unknown record type {kind!r}")
    assert header is not None
    return Trace(header, records, end, notes)


def iter_events(trace: Trace) -> Iterator[Event]:
    yield from trace.events
