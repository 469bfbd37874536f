"""A nightly's unit of work: one chunk (image, profile, seed, ops) checked on one fresh guest.

`run_chunk(ChunkSpec) -> ChunkResult` is plain data in, plain data out, and imports no Dask:
any worker with QEMU and this package can run it, and tests can call it directly. The
checker runs in a SUBPROCESS (`python -m hil.workflows.chunk SPEC TRACE`), never in the
calling thread: PR_SET_PDEATHSIG fires when the *thread* that started QEMU exits (prctl(2)),
and Dask runs tasks on threads. The subprocess dies with the thread that waits for it (its own
PDEATHSIG), and its QEMU and gdb die with it. The result carries the whole trace back, so the
coordinator needs no shared filesystem.

`run_shrink(ShrinkSpec) -> ShrinkResult` is the same for minimising one finding: exactly its
signature at its op (`python -m hil.workflows.ci shrink-one`, the shrinker `hil ci` uses, in a
subprocess; `hil shrink --clause` would take the clause's first finding, whatever its field).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil.errors import timeout_scale

# beyond the chunk's budget deadline: a boot, a last op, closing the trace
END_GRACE_S = 60.0
# from a stop request to the subprocess's exit (it finishes its op and closes the trace)
STOP_GRACE_S = 20.0
POLL_S = 0.25


@dataclass(frozen=True)
class ChunkSpec:
    chunk_id: str
    seed: int
    ops: int
    image: str
    profile: str = "default"
    deadline: float = 0.0  # wall-clock (time.time()) end of the night's budget; 0: none
    attempt: int = 1
    work_dir: str = ""  # where the live trace is written ("" = a private temp dir)
    error_rate: float = 0.04
    build_id: str = ""  # the night's guest build: a worker whose image differs refuses the chunk

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChunkSpec:
        return cls(**d)


@dataclass
class ChunkResult:
    chunk_id: str
    seed: int
    ops_requested: int
    attempt: int
    # complete (all ops or the budget's end) | interrupted | infra-error | crashed
    status: str
    error: str = ""
    worker: str = ""  # host:pid of the process that ran the chunk
    started: float = 0.0  # wall clock
    finished: float = 0.0
    booted: bool = False
    stopped_by: str = ""  # ops | budget | stop
    ops_done: int = 0
    ops_by_kind: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)  # op kind -> result status -> n
    findings: list[dict[str, Any]] = field(default_factory=list)  # Finding.to_json() (+ caused_by)
    coverage: dict[str, dict[str, int]] = field(default_factory=dict)  # evaluated/exercised/violated
    reboots: int = 0
    infra_retries: int = 0
    guest_build_id: str = ""
    trace_text: str = ""  # the whole trace (JSON lines), not kept in the result files
    retries: list[dict[str, Any]] = field(default_factory=list)  # earlier attempts: why they were lost

    @property
    def counted(self) -> bool:
        """Whether its ops count in the night's totals (an attempt lost to infrastructure is
        redone, so only the redo counts)."""
        return self.status in ("complete", "interrupted")

    def to_json(self, with_trace: bool = True) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not with_trace:
            d.pop("trace_text")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChunkResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def summarize_trace(text: str) -> dict[str, Any]:
    """What a ChunkResult says about a trace: op counts by kind and outcome, findings, the end
    line's coverage and stats. Read from the JSON lines themselves, leniently: a chunk killed
    mid-line still reports the ops it finished."""
    out: dict[str, Any] = {"ops_done": 0, "ops_by_kind": {}, "outcomes": {}, "findings": [], "coverage": {},
                           "booted": False, "end": None, "header": {}, "reboots": 0, "infra_retries": 0}  # fmt: skip
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if not isinstance(obj, dict):
            continue
        kind = obj.get("type")
        if kind == "header":
            out["header"] = obj
        elif kind == "note":
            if obj.get("what") == "booted":
                out["booted"] = True
                out["findings"].extend(obj.get("findings", []))
            elif obj.get("what") == "infra-retry":
                out["infra_retries"] += 1
        elif kind == "event":
            ev = obj.get("event") or {}
            op = str(ev.get("op", "?"))
            if op == "Poke":
                continue
            out["ops_done"] += 1
            out["ops_by_kind"][op] = out["ops_by_kind"].get(op, 0) + 1
            status = str((obj.get("result") or {}).get("status", "NONE"))
            per = out["outcomes"].setdefault(op, {})
            per[status] = per.get(status, 0) + 1
            out["findings"].extend(obj.get("findings", []))
        elif kind == "end":
            out["end"] = obj
            out["coverage"] = obj.get("coverage") or {}
            out["reboots"] = int(obj.get("reboots", 0))
    return out


def _count_events(path: Path, pos: int, count: int) -> tuple[int, int]:
    """Event lines appended to `path` since byte `pos` (only whole lines)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(pos)
            data = fh.read()
    except OSError:
        return pos, count
    end = data.rfind(b"\n") + 1
    count += data[:end].count(b'"type": "event"')
    return pos + end, count


def _end(proc: subprocess.Popen[bytes], sig: int, grace_s: float) -> None:
    from hil.target.proc import end_process

    end_process(proc, grace_s, lambda: proc.send_signal(sig))


def run_chunk(
    spec: ChunkSpec,
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ChunkResult:
    """Run one chunk in a subprocess; report its ops to `progress` as they come; ask it to stop
    (it finishes the op in flight and closes its trace) when `should_stop()` turns true."""
    from hil.target.proc import die_with_parent

    started = time.time()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    own_tmp = None
    if spec.work_dir:
        work = Path(spec.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        own_tmp = tempfile.TemporaryDirectory(prefix="hil-chunk-")
        work = Path(own_tmp.name)
    trace = work / f"{spec.chunk_id}.a{spec.attempt}.jsonl"
    spec_file = work / f"{spec.chunk_id}.a{spec.attempt}.spec.json"
    log_file = work / f"{spec.chunk_id}.a{spec.attempt}.log"
    spec_file.write_text(json.dumps(spec.to_json()), encoding="utf-8")
    error = ""
    stopped = False
    scale = timeout_scale()
    hard_deadline = (spec.deadline + END_GRACE_S * scale) if spec.deadline else None
    try:
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hil.workflows.chunk", str(spec_file), str(trace)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # noqa: PLW1509 (one prctl, no locks)
            )  # fmt: skip
            try:
                pos, count, last = 0, 0, -1
                stop_asked_at: float | None = None
                while proc.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(POLL_S)  # returns at the exit (a fixed sleep cost ~0.125 s per chunk)
                    pos, count = _count_events(trace, pos, count)
                    if progress is not None and count != last:
                        last = count
                        with contextlib.suppress(Exception):  # progress is best effort
                            progress(count)
                    now_t = time.time()
                    if stop_asked_at is None and should_stop is not None and should_stop():
                        stopped = True
                        stop_asked_at = now_t
                        proc.send_signal(signal.SIGTERM)
                    if stop_asked_at is not None and now_t - stop_asked_at > STOP_GRACE_S * scale:
                        error = f"the chunk did not end within {STOP_GRACE_S * scale:.0f} s of being asked to stop"
                        break
                    if hard_deadline is not None and now_t > hard_deadline:
                        error = f"the chunk did not end within {END_GRACE_S * scale:.0f} s of the budget's end"
                        break
            finally:
                _end(proc, signal.SIGTERM, STOP_GRACE_S)
        rc = proc.returncode
        text = trace.read_text(encoding="utf-8", errors="replace") if trace.exists() else ""
        log_tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:] if log_file.exists() else ""
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
    s = summarize_trace(text)
    end = s["end"] or {}
    if error:
        status = "infra-error"
    elif rc == 0 and end.get("status") == "complete":
        status = "complete"
    elif rc == 130 or end.get("status") == "interrupted":
        status = "interrupted"
    elif rc == 2 or end.get("status") == "infra-error":
        status = "infra-error"
        error = str(end.get("error") or (log_tail.strip().splitlines() or ["infrastructure error"])[-1])
    else:
        status = "crashed"
        error = f"the chunk process ended with status {rc}: {log_tail.strip()[-500:]}"
    if status == "infra-error" and not error:
        error = "infrastructure error"
    return ChunkResult(
        chunk_id=spec.chunk_id, seed=spec.seed, ops_requested=spec.ops, attempt=spec.attempt, status=status,
        error=error if status != "complete" else "", worker=worker, started=started, finished=time.time(),
        booted=s["booted"], stopped_by="stop" if stopped else str(end.get("stopped_by", "")),
        ops_done=s["ops_done"], ops_by_kind=s["ops_by_kind"], outcomes=s["outcomes"], findings=s["findings"],
        coverage=s["coverage"], reboots=s["reboots"], infra_retries=s["infra_retries"],
        guest_build_id=str(s["header"].get("guest_build_id", "")), trace_text=text,
    )  # fmt: skip


# --- shrinking ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShrinkSpec:
    group: str  # the root-cause key, "KIND CLAUSE FIELD-CLASS"
    finding: dict[str, Any]  # the occurrence to minimise (Finding.to_json(): kind, clause, field, op_index)
    trace_text: str  # the chunk trace holding it
    image: str
    profile: str = "default"
    timeout_s: float = 600.0


@dataclass
class ShrinkResult:
    group: str
    ok: bool
    events: int = 0
    trace_text: str = ""  # the minimal trace
    error: str = ""
    elapsed_s: float = 0.0
    worker: str = ""


def run_shrink(spec: ShrinkSpec) -> ShrinkResult:
    from hil.target.proc import die_with_parent

    t0 = time.monotonic()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="hil-shrink-") as tmp:
        src, out = Path(tmp) / "chunk.jsonl", Path(tmp) / "min.jsonl"
        src.write_text(spec.trace_text, encoding="utf-8")
        f = spec.finding
        argv = [sys.executable, "-m", "hil.workflows.ci", "shrink-one", str(src), "--op", str(f["op_index"]),
                "--kind", str(f["kind"]), "--clause", str(f["clause"]), "--field", str(f["field"]),
                "--image", spec.image, "--profile", spec.profile, "--out", str(out)]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=spec.timeout_s * timeout_scale())
        except subprocess.TimeoutExpired:
            _end(proc, signal.SIGTERM, STOP_GRACE_S)
            return ShrinkResult(spec.group, False, error=f"not minimised within {spec.timeout_s:.0f} s",
                                elapsed_s=time.monotonic() - t0, worker=worker)  # fmt: skip
        finally:
            _end(proc, signal.SIGTERM, STOP_GRACE_S)
        text = out.read_text(encoding="utf-8") if out.exists() else ""
        if not text:
            tail = output.decode(errors="replace").strip()[-800:]
            return ShrinkResult(spec.group, False, error=f"shrink-one exited {proc.returncode}: {tail}",
                                elapsed_s=time.monotonic() - t0, worker=worker)  # fmt: skip
        events = sum(1 for line in text.splitlines() if '"type": "event"' in line)
        return ShrinkResult(spec.group, True, events, text, elapsed_s=time.monotonic() - t0, worker=worker)


# --- the subprocess -------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _child(spec: ChunkSpec, trace_path: Path) -> int:
    """One checked run of the chunk's seeded workload, until `ops` or the budget's deadline.
    Exit 0 done, 2 infrastructure, 130 interrupted; the trace's end line carries the clause
    coverage (which a trace's events alone cannot give)."""
    from hil.errors import InfraError
    from hil.run.runner import Runner
    from hil.run.session import Session
    from hil.run.trace import TraceWriter, now, versions
    from hil.run.workload import Workload, WorkloadConfig
    from hil.target.machine import Profile
    from hil.target.proc import signals_held
    from model.state import State

    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    session = Session(image=Path(spec.image), profile=Profile.load(spec.profile))
    if spec.build_id and session.elf.build_id != spec.build_id:
        # one night, one build: never mix two guests' findings (a rebuilt image, another worker's copy)
        print(f"chunk: {spec.image} on {socket.gethostname()} is guest build {session.elf.build_id}, "
              f"the night runs build {spec.build_id}", file=sys.stderr)  # fmt: skip
        return 2
    header = {
        "guest_build_id": session.elf.build_id, "image": spec.image, "profile": spec.profile, "seed": spec.seed,
        "ops": spec.ops, "chunk": spec.chunk_id, "attempt": spec.attempt, "versions": versions(), "started": now(),
    }  # fmt: skip
    runner = Runner(session, None)
    status, stopped_by, error, code = "interrupted", "stop", "", 130
    writer: TraceWriter | None = None
    try:
        # held while the header is written: a signal then is raised here, inside the try whose
        # finally writes the end line (hil run met a trace without one: hil/cli.py cmd_run)
        with signals_held():
            writer = runner.writer = TraceWriter(trace_path, header)
        boot = runner.start()
        writer.note("booted", findings=[f.to_json() for f in boot])
        assert session.layout is not None
        workload = Workload(spec.seed, session.layout, WorkloadConfig(error_rate=spec.error_rate))

        def next_op(state: State) -> Any:
            if spec.deadline and time.time() >= spec.deadline:
                raise _Stop
            return workload(state)

        try:
            runner.run(next_op, count=spec.ops)
            stopped_by = "ops"
        except _Stop:
            stopped_by = "budget"
        status, code = "complete", 0
    except KeyboardInterrupt:
        pass
    except InfraError as exc:
        status, error, code, stopped_by = "infra-error", exc.describe()[-2000:], 2, ""
        print(exc.describe(), file=sys.stderr)
    finally:
        session.close()
        cov = runner.coverage
        if writer is not None:
            writer.close(
                status, finished=now(), ops_done=runner.stats.total_ops, stopped_by=stopped_by, error=error,
                reboots=runner.stats.reboots, infra_retries=runner.stats.infra_retries,
                coverage={"evaluated": cov.evaluated, "exercised": cov.exercised, "violated": cov.violated},
            )  # fmt: skip
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m hil.workflows.chunk SPEC.json TRACE.jsonl", file=sys.stderr)
        return 2
    try:
        spec = ChunkSpec.from_json(json.loads(Path(args[0]).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        print(f"chunk: bad spec {args[0]}: {exc}", file=sys.stderr)
        return 2
    from hil.errors import HilError

    try:
        return _child(spec, Path(args[1]))
    except HilError as exc:  # a bad image or profile: the chunk cannot run anywhere
        print(f"chunk: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
