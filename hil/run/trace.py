"""JSON-lines traces: a header, one line per event (op or poke), an end line.

Written as the run goes (one flushed line per op) so a crash loses nothing already done.
Reading is strict: a corrupt, truncated or wrong-version trace is a clear `TraceError`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from hil.check import Finding
from hil.errors import TraceWriteError
from model import ops as m

TRACE_VERSION = 1
# header fields the commands use (image, profile to boot; seed, ops to resume), when present
HEADER_TYPES: dict[str, type] = {"image": str, "profile": str, "guest_build_id": str, "seed": int, "ops": int}


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

    def __init__(self, path: Path, header: dict[str, Any], *, resume: dict[str, Any] | None = None):
        """A new trace, or (`resume`) one more leg appended to an interrupted trace: its end
        line stays, a `resume` line reopens it (the file is only ever appended to)."""
        self.path = path
        self.lines = 0  # lines written by this writer
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh: TextIO | None = open(path, "a" if resume is not None else "w", encoding="utf-8")  # noqa: SIM115
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
            raise TraceWriteError(f"cannot open the trace {path} for writing: {exc}") from exc
        self._whole = path.stat().st_size if resume is not None else 0  # bytes of whole lines
        if resume is not None:
            self._write({"type": "resume", **resume})
        else:
            self._write({"type": "header", "version": TRACE_VERSION, **header})

    def _write(self, obj: dict[str, Any]) -> None:
        if self._fh is None:
            raise TraceWriteError(f"the trace {self.path} is closed")
        text = json.dumps(obj, sort_keys=True) + "\n"
        try:
            self._fh.write(text)
            self._fh.flush()
        except OSError as exc:
            self._abandon()
            raise TraceWriteError(
                f"cannot write the trace {self.path}: {exc}; every line before it is kept, whole"
            ) from exc
        self.lines += 1
        self._whole += len(text.encode())

    def _abandon(self) -> None:
        """After a write error: close without writing more, and cut the part of a line the
        failed write may have left, so the trace stays readable (and resumable once there is
        room again)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            # close() retries the failed flush, then closes the file descriptor whatever happens
            with contextlib.suppress(OSError):
                fh.close()
            with contextlib.suppress(OSError):
                os.truncate(self.path, self._whole)

    def record(self, index: int, event: Event, result: m.OpResult | None, findings: list[Finding]) -> None:
        line: dict[str, Any] = {"type": "event", "index": index, "event": event.to_json()}
        if result is not None:
            line["result"] = result.to_json()
        line["findings"] = [f.to_json() for f in findings]
        self._write(line)

    def note(self, what: str, **extra: Any) -> None:
        """A harness event that is not an op (e.g. an infrastructure retry)."""
        self._write({"type": "note", "what": what, **extra})

    @property
    def closed(self) -> bool:
        return self._fh is None

    def close(self, status: str, **extra: Any) -> None:
        """Write the end line and close. After a write error there is nothing more to write."""
        if self._fh is None:
            return
        self._write({"type": "end", "status": status, **extra})
        fh, self._fh = self._fh, None
        try:
            os.fsync(fh.fileno())
            fh.close()
        except OSError as exc:
            with contextlib.suppress(OSError):
                fh.close()
            raise TraceWriteError(f"cannot write the trace {self.path}: {exc}") from exc


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def read_trace(path: Path) -> Trace:
    """Strict: every line whole and of a known type, the first a header of our version, events
    numbered 0, 1, 2... in order, nothing after the end line but a `resume` (an interrupted run
    continued with `hil run --resume`; a killed run has no end line before its `resume`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, not a trace") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read: {exc}") from exc
    lines = text.splitlines()
    if not lines:
        raise TraceError(f"{path}: empty trace")
    if not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            raise TraceError(
                f"{path}:{len(lines)}: truncated line, not JSON (the run was cut off while writing it); "
                f"the {len(lines) - 1} lines before it are whole"
            ) from None
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
            for key, kind in HEADER_TYPES.items():
                if obj.get(key) is not None and not isinstance(obj[key], kind):
                    raise TraceError(f"{path}:1: header field {key} is {obj[key]!r}, not {kind.__name__}")
            header = obj
            continue
        if end is not None:
            if kind != "resume":
                raise TraceError(f"{path}:{n}: records after the end line")
            end = None
        if kind == "resume" and obj.get("from_index", len(records)) != len(records):
            raise TraceError(f"{path}:{n}: resumed from op {obj.get('from_index')}, the trace has {len(records)}")
        if kind == "end":
            if not isinstance(obj.get("status"), str):  # complete, interrupted, infra-error, error, ...
                raise TraceError(f"{path}:{n}: an end line without a status")
            end = obj
        elif kind in ("note", "resume"):  # resume: after an end line, or a killed run's last event
            notes.append(obj)
        elif kind == "event":
            try:
                event = event_from_json(obj["event"])
                result = m.OpResult.from_json(obj["result"]) if "result" in obj else None
                findings = [Finding.from_json(f) for f in obj.get("findings", [])]
                index = int(obj["index"])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise TraceError(f"{path}:{n}: bad event record: {exc}") from exc
            if index != len(records):
                raise TraceError(f"{path}:{n}: event index {index}, expected {len(records)} (events lost or reordered)")
            records.append(Record(index, event, result, findings))
        else:
            raise TraceError(f"{path}:{n}: unknown record type {kind!r}")
    assert header is not None
    return Trace(header, records, end, notes)


def iter_events(trace: Trace) -> Iterator[Event]:
    yield from trace.events
