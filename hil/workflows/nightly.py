"""`hil nightly`: as many checked ops as a time budget allows, over many seeds and guests in
parallel, and one report in the morning.

Work is handed out in chunks (seed, ops) through Dask distributed — a local cluster of N
worker processes by default, or an existing cluster (`--scheduler ADDR`). This is the only
module that imports Dask: a chunk is `hil.workflows.chunk.run_chunk` (plain data in and out,
the checker in a subprocess); the report (`hil.workflows.report`) reads only ChunkResults.

DIR holds the night: nightly.json (configuration, time spent), chunks/ID.json (each chunk's
counted result), traces/ID.jsonl (its trace), regressions/ (minimal traces of new root causes),
work/ (live traces of a local cluster), and report.html, summary.json, junit.xml. Rerunning
the same command on the same DIR resumes: finished chunks are kept, interrupted or lost ones
are redone under the same id (so no op is counted twice), and the budget left is what the
earlier legs did not spend.

Exit: 0 no new finding, 1 new findings, 2 the run could not do its work (bad input, no
scheduler, no worker ever booted a guest), 130 interrupted (every chunk asked to stop, the
cluster and every QEMU ended, the report of what was done written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import shlex
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil.errors import ConfigError, timeout_scale
from hil.workflows.chunk import ChunkResult, ChunkSpec, ShrinkResult, ShrinkSpec, run_chunk, run_shrink
from hil.workflows.report import build_summary, group_key, slug, write_report

EXIT_OK, EXIT_NEW, EXIT_NOTHING, EXIT_INTERRUPTED = 0, 1, 2, 130
STATE_VERSION = 1
MAX_ATTEMPTS = 2  # a chunk lost to infrastructure or a dead worker is retried once
WORKER_WAIT_S = 60.0
STOP_WAIT_S = 30.0
POLL_S = 0.5


def parse_duration(text: str) -> float:
    """'8h', '30m', '60s', '90' (seconds), '1h30m'."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise ConfigError(f"--budget {text!r}: give a duration like 8h, 30m, 60s or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


# --- the task functions (run on the workers; Dask only here) --------------------------------


def dask_run_chunk(spec: ChunkSpec, topic: str, stop_name: str) -> ChunkResult:
    """run_chunk with its progress published to the client (`log_event`) and its stop flag read
    from a cluster-wide Event (a stop request reaches workers on other machines too)."""
    from distributed import Event, get_client, get_worker

    worker = get_worker()
    event = Event(stop_name)
    last = [0.0, False]

    def progress(ops: int) -> None:
        worker.log_event(topic, {"chunk": spec.chunk_id, "attempt": spec.attempt, "ops": ops,
                                 "worker": worker.address, "t": time.time()})  # fmt: skip

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last[0] >= 0.5:
            last[0] = now
            with contextlib.suppress(Exception):  # a scheduler hiccup is not a stop
                last[1] = bool(event.is_set())
        return bool(last[1])

    # on a cluster whose scheduler reschedules tasks of dead workers itself (allowed-failures > 0,
    # the default of an existing cluster), a rerun is this task started again: say so in the result
    mark = ["hil-nightly", topic, spec.chunk_id, str(spec.attempt)]
    before = None
    with contextlib.suppress(Exception):  # the scheduler's metadata is best effort
        client = get_client()
        before = client.get_metadata(mark, default=None)
        client.set_metadata(mark, worker.address)
    progress(0)
    r = run_chunk(spec, progress, should_stop)
    if before:
        why = f"the scheduler redid the chunk after losing worker {before}"
        r.retries.append({"attempt": spec.attempt, "reason": "worker lost", "error": why, "worker": before})
    return r


def dask_run_shrink(spec: ShrinkSpec) -> ShrinkResult:
    return run_shrink(spec)


def dask_setup(worker: Any) -> None:
    """Dask preload of the local cluster's worker processes: die with `hil nightly`, even when
    it is killed (SIGKILL gives it no chance to close the cluster)."""
    import signal

    from hil.target.proc import die_with_parent

    die_with_parent()
    # a terminal's Ctrl-C reaches the whole process group: the coordinator alone decides, and
    # asks each chunk to stop (its trace closed, its ops kept), rather than losing the workers
    with contextlib.suppress(ValueError):  # not the worker's main thread: keep the default
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- the night's state on disk ----------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


@dataclass
class Night:
    out: Path
    config: dict[str, Any]
    spent_s: float = 0.0
    legs: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, ChunkResult] = field(default_factory=dict)  # chunk id -> its standing result
    # chunk id -> its root-cause groups: a result's findings are dropped from memory once grouped
    groups: dict[str, dict[Any, Any]] = field(default_factory=dict)
    shrinks: dict[str, dict[str, Any]] = field(default_factory=dict)  # group key -> shrink outcome
    version: int = 0  # bumped by every recorded result

    def compact(self, r: ChunkResult, known: set[Any]) -> None:
        """Keep `r`'s findings as groups only (the full list stays in chunks/ID.json)."""
        from hil.workflows.report import chunk_groups

        if not r.counted:
            return  # a lost attempt: a few, kept whole
        if r.chunk_id not in self.groups:
            self.groups[r.chunk_id] = chunk_groups(r, known)
        r.findings = []

    @classmethod
    def open(cls, out: Path, config: dict[str, Any]) -> Night:
        """A new night in `out`, or the one already there (resume) if it is the same night."""
        state_file = out / "nightly.json"
        if not state_file.exists():
            if out.exists() and any(out.iterdir()):
                raise ConfigError(f"--out {out}: the directory is not empty and holds no nightly (no nightly.json)")
            for sub in ("chunks", "traces", "regressions", "work"):
                (out / sub).mkdir(parents=True, exist_ok=True)
            night = cls(out, config)
            night.save()
            return night
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{state_file}: not readable ({exc})") from None
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"{state_file}: version {state.get('version')!r}, this tool reads {STATE_VERSION}")
        old = state.get("config", {})
        for key in ("guest_build_id", "profile", "chunk_ops", "seed"):
            if old.get(key) != config.get(key):
                raise ConfigError(f"--out {out} holds a night with {key} {old.get(key)!r}, not {config.get(key)!r}: "
                                  "give another --out to start a new night")  # fmt: skip
        night = cls(out, {**old, **config}, float(state.get("spent_s", 0.0)), list(state.get("legs", [])))
        for p in sorted((out / "chunks").glob("*.json")):
            r = ChunkResult.from_json(json.loads(p.read_text(encoding="utf-8")))
            night.results[r.chunk_id] = r
        shrinks = out / "regressions" / "shrinks.json"
        if shrinks.exists():
            night.shrinks = json.loads(shrinks.read_text(encoding="utf-8"))
        return night

    def save(self) -> None:
        _write_json(self.out / "nightly.json", {"version": STATE_VERSION, "config": self.config,
                                                "spent_s": round(self.spent_s, 3), "legs": self.legs})  # fmt: skip

    def record(self, r: ChunkResult) -> None:
        """Keep a chunk's result (and its trace) as the one that counts for its id."""
        (self.out / "traces" / f"{r.chunk_id}.jsonl").write_text(r.trace_text, encoding="utf-8")
        _write_json(self.out / "chunks" / f"{r.chunk_id}.json", r.to_json(with_trace=False))
        # a night holds gigabytes of traces: they live on disk, not in the coordinator
        r.trace_text = ""
        self.results[r.chunk_id] = r
        self.groups.pop(r.chunk_id, None)
        self.version += 1
        if r.counted:  # the live copy of a local worker is no longer needed (its log stays)
            for suffix in ("jsonl", "spec.json"):
                with contextlib.suppress(OSError):
                    (self.out / "work" / f"{r.chunk_id}.a{r.attempt}.{suffix}").unlink()

    def record_shrink(self, key: str, outcome: dict[str, Any]) -> None:
        self.shrinks[key] = outcome
        _write_json(self.out / "regressions" / "shrinks.json", self.shrinks)

    def next_index(self) -> int:
        return max((int(k[1:]) for k in self.results if k[1:].isdigit()), default=-1) + 1


# --- progress ---------------------------------------------------------------------------------


class Progress:
    """A live rich table on a terminal; a plain line every `interval` seconds otherwise."""

    def __init__(self, interval: float, stream: Any = None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.lock = threading.Lock()
        self.running: dict[str, dict[str, Any]] = {}  # chunk id -> {worker, ops, t0, t}
        self.last_plain = 0.0
        self.live: Any = None
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(file=self.stream), refresh_per_second=2, transient=False)
            self.live.start()

    def on_event(self, event: Any) -> None:
        """Dask topic handler: (timestamp, msg)."""
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        if not isinstance(msg, dict) or "chunk" not in msg:
            return
        with self.lock:
            cur = self.running.get(msg["chunk"])
            if cur is None or cur.get("attempt") != msg.get("attempt"):
                cur = self.running[msg["chunk"]] = {"t0": msg["t"], "attempt": msg.get("attempt")}
            cur.update(worker=msg["worker"], ops=int(msg["ops"]), t=msg["t"])

    def done(self, chunk_id: str) -> None:
        with self.lock:
            self.running.pop(chunk_id, None)

    def update(self, done_ops: int, left_s: float, new: int, known: int, chunks: int, lost: int,
               force: bool = False) -> None:  # fmt: skip
        with self.lock:
            running = {k: dict(v) for k, v in self.running.items()}
        live_ops = done_ops + sum(v.get("ops", 0) for v in running.values())
        left = _hms(max(left_s, 0.0))
        if self.live is not None:
            from rich.table import Table

            table = Table(title=f"hil nightly: {live_ops} ops, budget left {left}, findings new {new} / known {known}, "
                                f"chunks done {chunks}, lost {lost}")  # fmt: skip
            for col in ("worker", "chunk", "ops", "ops/s"):
                table.add_column(col)
            for cid, v in sorted(running.items()):
                dt = v.get("t", 0) - v.get("t0", 0)
                table.add_row(str(v.get("worker", "")), cid, str(v.get("ops", 0)),
                              f"{v.get('ops', 0) / dt:.1f}" if dt > 0 else "-")  # fmt: skip
            self.live.update(table)
            return
        now = time.monotonic()
        if not force and now - self.last_plain < self.interval:
            return
        self.last_plain = now
        rates = ", ".join(
            f"{v.get('worker', '?')} {v.get('ops', 0) / (v['t'] - v['t0']):.1f}"
            for v in running.values() if v.get("t", 0) > v.get("t0", 0)
        )  # fmt: skip
        print(f"nightly: {live_ops} ops, budget left {left}, findings new {new} known {known}, chunks done "
              f"{chunks} running {len(running)} lost {lost}; ops/s per worker: {rates or '-'}",
              file=self.stream, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.live is not None:
            with contextlib.suppress(Exception):
                self.live.stop()
            self.live = None


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Options:
    out: Path
    budget_s: float
    workers: int
    image: Path
    profile: str
    chunk_ops: int
    seed: int
    scheduler: str | None
    baseline: Path | None
    previous: Path | None
    shrink: bool
    shrink_timeout_s: float
    progress_interval_s: float


def _load_previous(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    f = path / "summary.json" if path.is_dir() else path
    try:
        data: dict[str, Any] = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--previous {path}: no summary.json there") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--previous {path}: not readable ({exc})") from None
    if data.get("version") != 1 or not isinstance(data.get("findings"), list):
        raise ConfigError(f"--previous {path}: not a nightly summary")
    return data


class _NoCluster(Exception):
    """The scheduler cannot be reached or no worker joined: nothing can run (exit 2)."""


class Coordinator:
    def __init__(self, opts: Options, night: Night, known: set[tuple[str, str, str]], previous: dict[str, Any] | None,
                 meta: dict[str, Any]):  # fmt: skip
        self.opts = opts
        self.night = night
        self.known = known
        self.previous = previous
        self.meta = meta
        token = secrets.token_hex(4)
        self.topic = f"hil-progress-{token}"
        self.stop_name = f"hil-stop-{token}"
        self.lost_chunks = 0
        self.interrupted = False
        self._counts_cache: tuple[int, tuple[int, int, int, int]] | None = None

    # groups and shrinking
    def _new_groups(self, r: ChunkResult) -> list[tuple[str, dict[str, Any], list[str]]]:
        """(group key, its first finding, facet keys) of root causes in `r` not in the baseline and not
        shrunk (or being shrunk) tonight. New signatures that first show at one op are facets
        of one violation: the first is minimised, the others share its minimal trace."""
        from hil.workflows.report import judged

        by_op: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        for d, (sig, verdict) in zip(r.findings, judged(r.findings, self.known), strict=True):
            if verdict == "consequence":
                continue
            key = group_key(sig)
            if sig in self.known or key in self.night.shrinks or key in self.shrinking:
                continue
            self.shrinking.add(key)
            if int(d.get("op_index", -1)) < 0:
                continue  # a boot-state finding: there is no op sequence to minimise
            by_op.setdefault(int(d["op_index"]), []).append((key, d))
        return [(lead[0], lead[1], [k for k, _ in rest]) for lead, *rest in by_op.values()]

    def _shrink_new(self, client: Any, futs: dict[Any, str], r: ChunkResult) -> None:
        for key, finding, facets in self._new_groups(r):
            self.facets[key] = facets
            self._submit_shrink(client, futs, key, finding, r)

    def summary(self, status: str) -> dict[str, Any]:
        return build_summary(list(self.night.results.values()), meta={**self.meta, "status": status},
                             shrinks=self.night.shrinks, known=self.known, previous=self.previous,
                             out_dir=self.night.out, groups_cache=self.night.groups)  # fmt: skip

    def run(self) -> int:
        import dask
        import distributed
        from distributed import Client, Event, LocalCluster

        opts, night = self.opts, self.night
        scale = timeout_scale()
        self.shrinking: set[str] = set()
        self.facets: dict[str, list[str]] = {}  # lead key -> the keys minimised with it
        leg = {"started": time.time(), "workers": opts.workers, "scheduler": opts.scheduler or "local"}
        night.legs.append(leg)
        budget_left = opts.budget_s - night.spent_s
        t_start = time.monotonic()
        deadline = time.time() + max(budget_left, 0.0)
        progress = Progress(opts.progress_interval_s)
        cluster = client = None
        chunk_futs: dict[Any, ChunkSpec] = {}
        shrink_futs: dict[Any, str] = {}
        retries: dict[str, list[dict[str, Any]]] = {}
        status = "interrupted"
        try:
            # a worker that dies loses its chunk: we (not Dask) resubmit it, once, and say so
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                if opts.scheduler:
                    try:
                        client = Client(opts.scheduler, timeout=f"{30 * scale}s")
                    except (OSError, TimeoutError) as exc:
                        raise _NoCluster(f"cannot reach the Dask scheduler {opts.scheduler}: {exc}") from None
                else:
                    cluster = LocalCluster(
                        n_workers=opts.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                        memory_limit=0, silence_logs=logging.ERROR, preload=["hil.workflows.nightly"],
                    )  # fmt: skip
                    client = Client(cluster)
            try:
                client.wait_for_workers(1, timeout=WORKER_WAIT_S * scale)
            except TimeoutError:
                raise _NoCluster(f"no Dask worker joined {opts.scheduler or 'the local cluster'} within "
                                 f"{WORKER_WAIT_S * scale:.0f} s") from None  # fmt: skip
            client.subscribe_topic(self.topic, progress.on_event)
            Event(self.stop_name, client=client).clear()  # the name is this leg's own
            # chunks of an earlier leg that did not finish are redone first, under their ids
            todo: deque[ChunkSpec] = deque()
            for cid, r in sorted(night.results.items()):
                if r.status != "complete":
                    todo.append(self._spec(cid, r.seed, deadline, 1))
            next_index = night.next_index()
            # findings of earlier legs whose shrink never finished
            for r in night.results.values():
                if opts.shrink:
                    self._shrink_new(client, shrink_futs, r)
                night.compact(r, self.known)

            def submit(spec: ChunkSpec) -> None:
                fut = client.submit(dask_run_chunk, spec, self.topic, self.stop_name,
                                    key=f"hil-chunk-{spec.chunk_id}-a{spec.attempt}-{secrets.token_hex(3)}",
                                    pure=False)  # fmt: skip
                chunk_futs[fut] = spec

            while True:
                slots = max(1, sum(client.nthreads().values()))
                while time.time() < deadline and len(chunk_futs) < slots:
                    if todo:
                        submit(todo.popleft())
                    else:
                        cid = f"c{next_index:05d}"
                        submit(self._spec(cid, opts.seed + next_index, deadline, 1))
                        next_index += 1
                if not chunk_futs and not shrink_futs:
                    break
                if not chunk_futs and time.time() > deadline + opts.shrink_timeout_s * scale:
                    # the night is over: minimisations still queued or running are given up
                    for fut, key in list(shrink_futs.items()):
                        fut.cancel()
                        self._record_shrink(key, {"ok": False, "error": "not minimised: the night's time ran out"})
                    shrink_futs.clear()
                    break
                done = [f for f in [*chunk_futs, *shrink_futs] if f.done()]
                if not done:
                    # woken by the first result (a fixed sleep left each worker idle ~0.25 s per chunk)
                    try:
                        distributed.wait([*chunk_futs, *shrink_futs], timeout=POLL_S, return_when="FIRST_COMPLETED")
                    except (TimeoutError, distributed.TimeoutError):
                        pass
                    except Exception:  # noqa: BLE001 - e.g. a cancelled future: the loop looks at each itself
                        time.sleep(POLL_S)
                for fut in done:
                    if fut in shrink_futs:
                        self._shrink_done(fut, shrink_futs.pop(fut))
                        continue
                    spec = chunk_futs.pop(fut)
                    progress.done(spec.chunk_id)
                    r = self._chunk_outcome(fut, spec)
                    fut.release()
                    if not r.counted and r.attempt < MAX_ATTEMPTS and time.time() < deadline:
                        retries.setdefault(spec.chunk_id, []).append(
                            {"attempt": r.attempt, "reason": "worker lost" if r.status == "worker-lost" else
                             "infrastructure", "error": r.error[:2000], "worker": r.worker})  # fmt: skip
                        print(f"nightly: chunk {spec.chunk_id} attempt {r.attempt} lost ({r.status}): "
                              f"{r.error.splitlines()[0] if r.error else ''}; retrying on a fresh machine",
                              file=sys.stderr, flush=True)  # fmt: skip
                        submit(self._spec(spec.chunk_id, spec.seed, deadline, r.attempt + 1))
                        continue
                    r.retries = retries.pop(spec.chunk_id, []) + r.retries
                    if not r.counted:
                        self.lost_chunks += 1
                        prior = night.results.get(r.chunk_id)
                        if prior is not None and prior.counted:
                            continue  # a redo of an interrupted chunk failed: the earlier part still counts
                    night.record(r)
                    if opts.shrink and r.counted:
                        self._shrink_new(client, shrink_futs, r)
                    night.compact(r, self.known)
                if self.lost_chunks >= 2 * slots and not any(x.booted for x in night.results.values()):
                    # every chunk so far failed before its guest booted: the night cannot do its work
                    print(f"nightly: {self.lost_chunks} chunks lost and no guest ever booted; giving up",
                          file=sys.stderr, flush=True)  # fmt: skip
                    self._stop(client, chunk_futs, shrink_futs, progress)
                    break
                s = self._counts()
                progress.update(s[0], deadline - time.time(), s[1], s[2], s[3], self.lost_chunks)
            status = "complete"
        except _NoCluster as exc:
            print(f"nightly: {exc}", file=sys.stderr, flush=True)
            status = "no-cluster"
        except KeyboardInterrupt:
            self.interrupted = True
            print("\nnightly: interrupted; asking every chunk to stop and writing the report of what was done",
                  file=sys.stderr, flush=True)  # fmt: skip
            self._stop(client, chunk_futs, shrink_futs, progress)
        finally:
            progress.close()
            night.spent_s += time.monotonic() - t_start
            leg["finished"] = time.time()
            leg["status"] = status
            night.save()
            with contextlib.suppress(Exception):
                if client is not None:
                    client.close(timeout=10 * scale)
            with contextlib.suppress(Exception):
                if cluster is not None:
                    cluster.close(timeout=30 * scale)
            self._sweep()
        return self._finish(status)

    def _spec(self, cid: str, seed: int, deadline: float, attempt: int) -> ChunkSpec:
        opts = self.opts
        return ChunkSpec(chunk_id=cid, seed=seed, ops=opts.chunk_ops, image=str(opts.image), profile=opts.profile,
                         deadline=deadline, attempt=attempt, build_id=str(self.meta["guest_build_id"]),
                         work_dir="" if opts.scheduler else str(self.night.out / "work"))  # fmt: skip

    def _chunk_outcome(self, fut: Any, spec: ChunkSpec) -> ChunkResult:
        try:
            r = fut.result()
            assert isinstance(r, ChunkResult)
            return r
        except Exception as exc:  # KilledWorker, a lost connection: the worker died with the chunk
            return ChunkResult(spec.chunk_id, spec.seed, spec.ops, spec.attempt, "worker-lost",
                               error=f"{type(exc).__name__}: {exc}", finished=time.time())  # fmt: skip

    def _submit_shrink(self, client: Any, futs: dict[Any, str], key: str, finding: dict[str, Any],
                       r: ChunkResult) -> None:  # fmt: skip
        text = r.trace_text or (self.night.out / "traces" / f"{r.chunk_id}.jsonl").read_text(encoding="utf-8")
        spec = ShrinkSpec(key, finding, text, str(self.opts.image), self.opts.profile, self.opts.shrink_timeout_s)
        futs[client.submit(dask_run_shrink, spec, key=f"hil-shrink-{slug(key.split())}-{secrets.token_hex(3)}",
                           pure=False)] = key  # fmt: skip
        print(f"nightly: new root cause {key} (chunk {r.chunk_id}); minimising it", file=sys.stderr, flush=True)

    def _shrink_done(self, fut: Any, key: str) -> None:
        try:
            res = fut.result()
        except Exception as exc:
            res = ShrinkResult(key, False, error=f"{type(exc).__name__}: {exc}")
        fut.release()
        outcome: dict[str, Any] = {"ok": res.ok, "events": res.events, "error": res.error,
                                   "seconds": round(res.elapsed_s, 2)}  # fmt: skip
        if res.ok:
            rel = f"regressions/{slug(key.split())}.jsonl"
            path = self.night.out / rel
            path.write_text(res.trace_text, encoding="utf-8")
            outcome["trace"] = rel
            # a minimal trace holds its one finding (K = 0) at its last op
            outcome["debug"] = f"hil debug {shlex.quote(str(path))} --finding 0"
        self._record_shrink(key, outcome)

    def _record_shrink(self, key: str, outcome: dict[str, Any]) -> None:
        self.night.record_shrink(key, outcome)
        self.shrinking.discard(key)
        for facet in self.facets.pop(key, []):
            self.night.record_shrink(facet, {**outcome, "facet_of": key})
            self.shrinking.discard(facet)

    def _counts(self) -> tuple[int, int, int, int]:
        """(ops, new root causes, known ones, chunks) for the progress line; recomputed only when
        a result came in."""
        from hil.workflows.report import counted, group_findings

        if self._counts_cache is not None and self._counts_cache[0] == self.night.version:
            return self._counts_cache[1]
        rs = counted(self.night.results.values())
        groups = group_findings(rs, self.known, self.night.groups)
        new = sum(1 for s, g in groups.items() if g.root_cause and s not in self.known)
        known = sum(1 for s in groups if s in self.known)
        out = (sum(r.ops_done for r in rs), new, known, len(rs))
        self._counts_cache = (self.night.version, out)
        return out

    def _stop(self, client: Any, chunk_futs: dict[Any, ChunkSpec], shrink_futs: dict[Any, str],
              progress: Progress) -> None:  # fmt: skip
        """Ask every running chunk to stop (it closes its trace), keep what they did, cancel the rest."""
        from distributed import Event

        if client is None:
            return
        scale = timeout_scale()
        with contextlib.suppress(Exception):
            Event(self.stop_name, client=client).set()
        for fut in list(shrink_futs):
            with contextlib.suppress(Exception):
                fut.cancel()
        if not chunk_futs:
            return
        end = time.monotonic() + STOP_WAIT_S * scale
        # what does not come back in time is redone on resume
        while time.monotonic() < end and not all(f.done() for f in chunk_futs):
            time.sleep(POLL_S)
        for fut, spec in chunk_futs.items():
            if fut.done():
                r = self._chunk_outcome(fut, spec)
                if r.counted:
                    self.night.record(r)
            else:
                with contextlib.suppress(Exception):
                    fut.cancel()
            progress.done(spec.chunk_id)

    def _sweep(self) -> None:
        """Shared RAM files of chunk processes killed with their worker (local machine only)."""
        from hil.target.machine import sweep_stale_files

        with contextlib.suppress(Exception):
            sweep_stale_files()

    def _finish(self, status: str) -> int:
        summary = self.summary(status)
        write_report(self.night.out, summary)
        t = summary["totals"]
        print(f"nightly {status}: {t['ops']} ops in {t['chunks']} chunks ({t['ops_per_s']} ops/s), {t['groups']} root "
              f"causes: {t['new']} new, {t['known']} known, {t['fixed']} fixed; lost chunks {t['chunks_lost']}, "
              f"retries {t['retries']}")  # fmt: skip
        for f in summary["findings"]:
            if f["status"] == "new":
                print(f"  NEW {f['key']} ({f['count']}x): {f['example'][:160]}")
                if f.get("debug"):
                    print(f"      {f['debug']}")
        print(f"report: {self.night.out / 'report.html'}")
        if self.interrupted:
            return EXIT_INTERRUPTED
        if not t["booted"]:
            print("nightly: no worker ever booted a guest (see the chunks' errors in the report)", file=sys.stderr)
            return EXIT_NOTHING
        return EXIT_NEW if t["new"] else EXIT_OK


def cmd_nightly(args: argparse.Namespace) -> int:
    from hil.run import baseline as bl
    from hil.target.elf import GuestElf
    from hil.target.machine import Profile

    budget = parse_duration(args.budget)
    if budget <= 0:
        raise ConfigError("--budget must be more than 0")
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.chunk_ops < 1:
        raise ConfigError("--chunk-ops must be at least 1")
    image = Path(args.image).resolve()
    if not image.is_file():
        raise ConfigError(f"--image {args.image}: no such file")
    Profile.load(args.profile)  # a bad profile is refused here, not by every chunk
    build_id = GuestElf(image).build_id
    baseline_path = Path(args.baseline) if args.baseline else (bl.SHIPPED_BASELINE if bl.SHIPPED_BASELINE.exists()
                                                               else None)  # fmt: skip
    known = set(bl.Baseline.load(baseline_path).entries) if baseline_path else set()
    previous = _load_previous(Path(args.previous) if args.previous else None)
    out = Path(args.out).resolve()
    config = {"image": str(image), "guest_build_id": build_id, "profile": args.profile, "chunk_ops": args.chunk_ops,
              "seed": args.seed, "budget_s": budget}  # fmt: skip
    night = Night.open(out, config)
    opts = Options(out, budget, args.workers, image, args.profile, args.chunk_ops, args.seed, args.scheduler,
                   baseline_path, Path(args.previous) if args.previous else None, not args.no_shrink,
                   parse_duration(args.shrink_timeout), args.progress_interval)  # fmt: skip
    meta = {"image": str(image), "guest_build_id": build_id, "profile": args.profile, "budget_s": budget,
            "workers": args.workers, "scheduler": args.scheduler or "local", "chunk_ops": args.chunk_ops,
            "baseline": str(baseline_path) if baseline_path else None, "legs": len(night.legs) + 1,
            # as read at the start: the report says what it judged by, whatever the file says later
            "baseline_signatures": sorted(group_key(k) for k in known)}  # fmt: skip
    coordinator = Coordinator(opts, night, known, previous, meta)
    if night.spent_s >= budget:
        print(f"nightly: the budget of {out} is spent ({night.spent_s:.0f} s of {budget:.0f} s); "
              "running nothing, writing the report", file=sys.stderr)  # fmt: skip
        return coordinator._finish("complete")
    return coordinator.run()


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("nightly", help="checked ops over many seeds and guests for a time budget; one report")
    p.add_argument("--budget", default="8h", help="wall-clock budget: 8h, 30m, 60s, 1h30m (default 8h)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="local worker processes, one QEMU each (default: one per CPU)")
    p.add_argument("--out", required=True, metavar="DIR", help="the night's directory; rerun on it to resume")
    p.add_argument("--previous", metavar="DIR", help="an earlier night: report what is new, fixed and unchanged")
    p.add_argument("--baseline", metavar="FILE", help="known findings (default: the shipped tests/data/baseline.json)")
    from hil.target.machine import DEFAULT_IMAGE

    p.add_argument("--image", default=str(DEFAULT_IMAGE))
    p.add_argument("--profile", default="default")
    p.add_argument("--scheduler", metavar="ADDR",
                   help="an existing Dask scheduler (tcp://host:8786) instead of a local cluster")
    # ~10 s at today's ~500 ops/s: a new process, QEMU and boot per chunk cost well under 10 %
    p.add_argument("--chunk-ops", type=int, default=5000, help="ops per chunk (one seed each; default 5000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the first chunk (chunk i runs seed S+i)")
    p.add_argument("--no-shrink", action="store_true", help="do not minimise new root causes")
    p.add_argument("--shrink-timeout", default="10m", help="per new root cause (default 10m)")
    p.add_argument("--progress-interval", type=float, default=30.0, help="seconds between plain progress lines")
    p.set_defaults(fn=cmd_nightly)
