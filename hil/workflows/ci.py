"""`hil ci`: a matrix of guest images x machine profiles x seeds (plus the fixed scenario suite
and the baseline's own minimal traces) from a small TOML file, judged against a baseline of
known findings. Exit 0 (only known findings), 1 (a new finding; it outranks the rest),
2 (infrastructure: a cell could not run; never a finding). JUnit XML: one test case per matrix cell and scenario.

Every cell is its own `hil` subprocess with its own QEMU (PR_SET_PDEATHSIG follows the
thread that started a process, so QEMU is never started from a pool thread here), up to
`--jobs` at a time; the parent only reads the traces back. A new finding is shrunk (another
subprocess) before the job ends; the failure names the minimal trace and the `hil debug`
command that stops before the op that went wrong.

Also `hil baseline update|show` (the baseline file, hil/run/baseline.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil import argtypes
from hil.errors import ConfigError, timeout_scale
from hil.run.baseline import SHIPPED_BASELINE, Baseline, Signature, Verdict, signature
from hil.workflows import junit

EXIT_OK, EXIT_NEW, EXIT_INFRA, EXIT_INTERRUPTED = 0, 1, 2, 130
REPO = Path(__file__).resolve().parents[2]
CONFIG_KEYS = ("images", "profiles", "seeds", "ops", "scenarios", "replay_baseline", "baseline", "jobs",
               "cell_timeout_s", "shrink", "shrink_timeout_s", "max_shrinks")  # fmt: skip
IMAGE_KEYS = ("path", "build")


# --- the config ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    label: str
    path: Path
    build: tuple[str, ...] = ()  # argv run (in the config's directory) before the matrix


@dataclass
class Config:
    images: list[Image]
    profiles: list[str]
    seeds: list[int] = field(default_factory=lambda: [1])
    ops: int = 300
    scenarios: list[str] = field(default_factory=list)
    replay_baseline: bool = True
    baseline: Path | None = None
    jobs: int = 2
    cell_timeout_s: float = 600.0
    shrink: bool = True
    shrink_timeout_s: float = 300.0
    max_shrinks: int = 4  # new signatures shrunk per image
    path: Path | None = None

    @classmethod
    def load(cls, path: Path) -> Config:
        from hil.workflows.scenarios import SCENARIOS

        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"ci config {path} not found") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"ci config {path}: {exc}") from None
        where = f"ci config {path}"
        unknown = sorted(set(data) - set(CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown} (allowed: {list(CONFIG_KEYS)})")
        base = path.resolve().parent
        images = []
        raw_images = data.get("images")
        if not isinstance(raw_images, dict) or not raw_images:
            raise ConfigError(f"{where}: [images] must name at least one image (label = path or a table)")
        for label, spec in raw_images.items():
            if isinstance(spec, str):
                spec = {"path": spec}
            if not isinstance(spec, dict) or "path" not in spec or set(spec) - set(IMAGE_KEYS):
                raise ConfigError(f"{where}: image {label!r} must be a path or a table with keys {list(IMAGE_KEYS)}")
            build = spec.get("build", [])
            if not isinstance(build, list) or not all(isinstance(a, str) for a in build):
                raise ConfigError(f"{where}: image {label!r}: build must be a list of strings (an argv)")
            images.append(Image(label, (base / spec["path"]).resolve(), tuple(build)))
        profiles = data.get("profiles", ["default"])
        if not isinstance(profiles, list) or not profiles or not all(isinstance(p, str) for p in profiles):
            raise ConfigError(f"{where}: profiles must be a non-empty list of profile names or .toml paths")
        profiles = [str((base / p).resolve()) if p.endswith(".toml") else p for p in profiles]
        seeds = data.get("seeds", [1])
        if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"{where}: seeds must be a list of integers")
        scen = data.get("scenarios", "all")
        names = list(SCENARIOS) if scen == "all" else scen
        if not isinstance(names, list) or not all(isinstance(n, str) and n in SCENARIOS for n in names):
            raise ConfigError(f"{where}: scenarios must be \"all\" or a list of {list(SCENARIOS)}")
        cfg = cls(images=images, profiles=profiles, seeds=seeds, scenarios=names, path=path)
        for key, typ in (("ops", int), ("jobs", int), ("max_shrinks", int), ("cell_timeout_s", (int, float)),
                         ("shrink_timeout_s", (int, float)), ("replay_baseline", bool), ("shrink", bool)):  # fmt: skip
            if key in data:
                value = data[key]
                if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                    raise ConfigError(f"{where}: {key} must be {getattr(typ, '__name__', 'a number')}")
                setattr(cfg, key, value)
        if cfg.ops < 0 or cfg.jobs < 1:
            raise ConfigError(f"{where}: ops must be >= 0 and jobs >= 1")
        if "baseline" in data:
            if not isinstance(data["baseline"], str):
                raise ConfigError(f"{where}: baseline must be a path")
            cfg.baseline = (base / data["baseline"]).resolve()
        return cfg


# --- children -----------------------------------------------------------------------------------
class Children:
    """Every subprocess of this run, so that each is ended by PID on every path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen[bytes]] = set()
        self.stopping = threading.Event()

    def run(self, argv: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None) -> int | None:
        """Run to completion; None when the deadline passed or the run is stopping (ended)."""
        from hil.target.proc import die_with_parent, end_process

        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out, self._lock:
            # under the lock: end_all() either sees this process or stops it from starting
            if self.stopping.is_set():
                return None
            out.write(("$ " + " ".join(argv) + "\n").encode())
            out.flush()
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})}, start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
            self._live.add(proc)
        try:
            proc.wait(timeout=timeout_s * timeout_scale())
            return proc.returncode
        except subprocess.TimeoutExpired:
            with open(log, "ab") as out:
                out.write(f"\nhil ci: deadline of {timeout_s * timeout_scale():.0f} s passed: ended\n".encode())
            return None
        finally:
            # SIGTERM first: `hil run` then ends its QEMU and gdb and closes its trace
            end_process(proc, 15.0, lambda: os.kill(proc.pid, signal.SIGTERM))
            with self._lock:
                self._live.discard(proc)

    def end_all(self) -> None:
        from hil.target.proc import end_process

        with self._lock:
            self.stopping.set()
            live = list(self._live)
        for proc in live:
            end_process(proc, 15.0, lambda p=proc: os.kill(p.pid, signal.SIGTERM))  # type: ignore[misc]


def _safe(name: str) -> str:
    """A file name CI artifact uploaders accept (no ':' or '/')."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- one job --------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    name: str
    image: Image
    profile: str
    trace: Path | None = None
    time_s: float = 0.0
    verdict: Verdict | None = None
    infra: str | None = None
    shrunk: dict[Signature, tuple[Path | None, str]] = field(default_factory=dict)  # sig -> (min trace, note)
    fixed_note: str = ""  # a replayed baseline trace no longer shows its finding
    skipped: str = ""  # a baseline entry whose minimal trace is missing
    expected: Signature | None = None  # for a replayed baseline trace

    @property
    def cell(self) -> str:
        return f"{self.image.label}/{Path(self.profile).stem}"


@dataclass
class Job:
    kind: str  # "run" | "scenarios"
    image: Image
    profile: str
    seed: int = 0

    @property
    def dirname(self) -> str:
        return f"{self.image.label}-{Path(self.profile).stem}"


class Matrix:
    def __init__(self, cfg: Config, out: Path, baseline: Baseline, log: Callable[[str], None]):
        self.cfg = cfg
        self.out = out
        self.baseline = baseline
        self.children = Children()
        self.log = log
        self.results: list[CaseResult] = []

    def jobs(self) -> list[Job]:
        jobs = []
        for image in self.cfg.images:
            for profile in self.cfg.profiles:
                if self.cfg.scenarios or (self.cfg.replay_baseline and self.baseline.entries):
                    jobs.append(Job("scenarios", image, profile))
                jobs += [Job("run", image, profile, seed) for seed in self.cfg.seeds]
        return jobs

    def _env(self, job: Job) -> dict[str, str]:
        return {"HIL_LOG_DIR": str(self.out / job.dirname / "qemu-logs")}

    def run_job(self, job: Job) -> list[CaseResult]:
        t0 = time.monotonic()
        cases = self._run_cell(job) if job.kind == "run" else self._run_scenarios(job)
        if job.kind == "run" and cases:
            cases[0].time_s = time.monotonic() - t0
        return cases

    def _run_cell(self, job: Job) -> list[CaseResult]:
        from hil.run.trace import TraceError, read_trace

        d = self.out / job.dirname
        trace = d / f"seed-{job.seed}.jsonl"
        logf = d / f"seed-{job.seed}.log"
        case = CaseResult(f"seed {job.seed} ({self.cfg.ops} ops)", job.image, job.profile, trace)
        for old in d.glob(f"seed-{job.seed}.*") if d.is_dir() else ():
            old.unlink()  # an earlier run's files in the same --out never pass for this one's
        argv = _py("hil.cli", "run", "--ops", str(self.cfg.ops), "--seed", str(job.seed), "--image",
                   str(job.image.path), "--profile", job.profile, "--trace", str(trace), "--show", "none")  # fmt: skip
        rc = self.children.run(argv, logf, self.cfg.cell_timeout_s, self._env(job))
        if rc not in (EXIT_OK, EXIT_NEW):
            why = "ended at its deadline" if rc is None else f"hil run exited {rc}"
            case.infra = f"{why}; log {logf}:\n{_tail(logf)}"
            return [case]
        try:
            case.verdict = self.baseline.compare(read_trace(trace).findings, report_fixed=False)
        except TraceError as exc:
            case.infra = f"unreadable trace: {exc}"
        return [case]

    def _run_scenarios(self, job: Job) -> list[CaseResult]:
        from hil.run.trace import TraceError, read_trace
        from hil.workflows.scenarios import replay_name

        d = self.out / job.dirname / "scenarios"
        logf = self.out / job.dirname / "scenarios.log"
        shutil.rmtree(d, ignore_errors=True)  # an earlier run's traces never pass for this one's
        logf.unlink(missing_ok=True)
        replays = []
        missing: list[CaseResult] = []
        if self.cfg.replay_baseline:
            for key, entry in sorted(self.baseline.entries.items()):
                path = self.baseline.trace_path(entry)
                if path.is_file():
                    replays.append((key, path))
                else:
                    case = CaseResult(f"known {' '.join(key)}", job.image, job.profile)
                    case.skipped = f"its minimal trace {path} is missing: update the baseline (hil baseline update)"
                    missing.append(case)
        argv = _py("hil.workflows.scenarios", "--image", str(job.image.path), "--profile", job.profile,
                   "--out", str(d), "--only", *self.cfg.scenarios)  # fmt: skip
        if replays:
            argv += ["--replay", *(str(p) for _k, p in replays)]
        t0 = time.monotonic()
        rc = self.children.run(argv, logf, self.cfg.cell_timeout_s, self._env(job))
        elapsed = time.monotonic() - t0
        named: list[tuple[str, Signature | None]] = [(n, None) for n in self.cfg.scenarios]
        named += [(replay_name(p), k) for k, p in replays]
        cases = []
        for name, expected in named:
            label = f"scenario {name}" if expected is None else f"known {' '.join(expected)}"
            case = CaseResult(label, job.image, job.profile, d / f"{name}.jsonl", elapsed / max(1, len(named)))
            case.expected = expected
            cases.append(case)
            try:
                tr = read_trace(case.trace) if case.trace and case.trace.is_file() else None
            except TraceError as exc:
                case.infra = f"unreadable trace: {exc}"
                continue
            if tr is None or tr.end is None or tr.end.get("status") != "complete":
                why = "did not run" if rc == EXIT_OK else ("ended at its deadline" if rc is None else f"exited {rc}")
                case.infra = f"scenario runner {why}; log {logf}:\n{_tail(logf)}"
                continue
            findings = tr.findings
            case.verdict = self.baseline.compare(findings, report_fixed=False)
            if expected is not None and not any(signature(f) == expected for f in findings):
                entry = self.baseline.entries[expected]
                case.fixed_note = (f"fixed? {' '.join(expected)}: its minimal trace {entry.trace} no longer "
                                   "shows it on this image/profile: remove the entry (hil baseline update)")
        return cases + missing

    def shrink_plan(self, results: list[CaseResult]) -> list[tuple[CaseResult, Signature, Any]]:
        """Which new findings to shrink, after every cell ran: per image and new signature the
        case where it appeared earliest (the shortest prefix to shrink: a scenario, usually),
        earliest first and bugs before spec clauses; at most `max_shrinks` per image. The
        other cases with that signature point at the same minimal trace."""
        best: dict[tuple[str, Signature], tuple[CaseResult, Any]] = {}
        for c in results:
            if c.verdict is None or c.trace is None:
                continue
            for sig, f in c.verdict.new_signatures().items():
                key = (c.image.label, sig)
                if key not in best or f.op_index < best[key][1].op_index:
                    best[key] = (c, f)

        def rank(item: tuple[tuple[str, Signature], tuple[CaseResult, Any]]) -> tuple[int, bool, bool, str]:
            (_label, sig), (_c, f) = item
            # at one op: a bug before a spec clause, and a guest-vs-model difference (SLOT, RESULT,
            # PTE...) before a clause the guest then violates because of it (Q-4, MAP-1...)
            spec_clause = any(ch.isdigit() or ch == "-" for ch in f.clause)
            return (f.op_index, str(f.kind) not in ("IMPL", "TLB", "WALKER"), spec_clause, " ".join(sig))

        plan: list[tuple[CaseResult, Signature, Any]] = []
        per_image: Counter[str] = Counter()
        for (label, sig), (c, f) in sorted(best.items(), key=rank):
            if per_image[label] < self.cfg.max_shrinks:
                per_image[label] += 1
                plan.append((c, sig, f))
        return plan

    def shrink_all(self, results: list[CaseResult], pool: ThreadPoolExecutor) -> None:
        plan = self.shrink_plan(results)
        futures = [pool.submit(self._shrink_one, c, sig, f) for c, sig, f in plan]
        done: dict[tuple[str, Signature], tuple[Path | None, str]] = {}
        for (c, sig, _f), fut in zip(plan, futures, strict=True):
            done[(c.image.label, sig)] = fut.result()
            self.log(f"shrunk {' '.join(sig)} ({c.cell} {c.name}): {done[(c.image.label, sig)][0] or 'failed'}")
        for c in results:
            for sig in c.verdict.new_signatures() if c.verdict is not None else ():
                c.shrunk[sig] = done.get((c.image.label, sig),
                                         (None, f"not shrunk (max_shrinks = {self.cfg.max_shrinks} per image)"))

    def _shrink_one(self, case: CaseResult, sig: Signature, f: Any) -> tuple[Path | None, str]:
        assert case.trace is not None
        stem = case.trace.stem + ".new-" + _safe("-".join(sig))
        out = case.trace.with_name(stem + ".min.jsonl")
        log = case.trace.with_name(stem + ".shrink.log")
        argv = _py("hil.workflows.ci", "shrink-one", str(case.trace), "--op", str(f.op_index), "--kind",
                   str(f.kind), "--clause", f.clause, "--field", f.field, "--image", str(case.image.path),
                   "--profile", case.profile, "--out", str(out))  # fmt: skip
        env = {"HIL_LOG_DIR": str(self.out / f"{case.image.label}-{Path(case.profile).stem}" / "qemu-logs")}
        rc = self.children.run(argv, log, self.cfg.shrink_timeout_s, env)
        if rc == EXIT_OK and out.is_file():
            return (out, "")
        why = "deadline passed" if rc is None else f"shrink exited {rc}"
        return (None, f"not shrunk ({why}, see {log}); the full trace reproduces it")

    def run(self) -> list[CaseResult]:
        results = self.results = []  # kept for a partial report when interrupted
        jobs = self.jobs()
        pool = ThreadPoolExecutor(max_workers=self.cfg.jobs, thread_name_prefix="hil-ci")
        futures: dict[Future[list[CaseResult]], Job] = {}
        try:
            futures = {pool.submit(self.run_job, j): j for j in jobs}
            for n, (fut, job) in enumerate(futures.items(), 1):
                cases = fut.result()
                bad = [f"{_status(c)} {c.name}" for c in cases if _status(c) != "ok"]
                what = f"seed {job.seed}" if job.kind == "run" else f"{len(cases)} scenarios"
                self.log(f"[{n}/{len(jobs)}] {job.image.label}/{Path(job.profile).stem} {what}: "
                         + ("; ".join(bad) if bad else "ok"))
                results += cases
            if self.cfg.shrink:
                self.shrink_all(results, pool)
        except BaseException:
            self.children.end_all()
            for fut in futures:
                fut.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results


def _status(c: CaseResult) -> str:
    if c.verdict is not None and c.verdict.new:
        return "NEW"
    if c.infra:
        return "INFRA"
    return "ok"


# --- reporting ------------------------------------------------------------------------------------
def _debug_cmd(trace: Path, op: int, image: Image, profile: str) -> str:
    return f"hil debug {trace} --at {op} --image {image.path} --profile {profile}"


def case_to_junit(c: CaseResult) -> junit.Case:
    jc = junit.Case(c.name, f"hil.{c.image.label}.{Path(c.profile).stem}", c.time_s)
    jc.properties = {"image": str(c.image.path), "profile": c.profile}
    if c.trace:
        jc.properties["trace"] = str(c.trace)
    out = []
    if c.verdict is not None:
        known = ", ".join(f"{' '.join(s)} {n}x" for s, n in sorted(c.verdict.known.items()))
        out.append(f"known findings: {known or 'none'}")
        new = c.verdict.new_signatures()
        if new:
            body = []
            for sig, f in new.items():
                count = sum(1 for g in c.verdict.new if signature(g) == sig)
                body.append(f"NEW {' '.join(sig)} ({count}x, first op {f.op_index}):\n  {f.describe()}")
                path, note = c.shrunk.get(sig, (None, "not shrunk"))
                if path is not None:
                    n_events = max(0, len(path.read_text(encoding="utf-8").splitlines()) - 2)
                    body.append(f"  minimal trace: {path} ({n_events} events)")
                    body.append(f"  debug: {_debug_cmd(path, max(0, n_events - 1), c.image, c.profile)}")
                else:
                    body.append(f"  {note}")
                    if c.trace:
                        body.append(f"  debug: {_debug_cmd(c.trace, f.op_index, c.image, c.profile)}")
            body.append(f"trace: {c.trace}")
            msg = "new finding(s): " + "; ".join(" ".join(s) for s in new)
            jc.failure = (msg, "\n".join(body))
    if c.infra:
        jc.error = ("infrastructure error (not a finding)", c.infra)
    if c.fixed_note:
        out.append(c.fixed_note)
    if c.skipped:
        jc.skipped = c.skipped
    jc.stdout = "\n".join(out)
    return jc


def to_suites(results: list[CaseResult]) -> list[junit.Suite]:
    suites: dict[str, junit.Suite] = {}
    for c in results:
        s = suites.setdefault(c.cell, junit.Suite(c.cell, properties={"image": str(c.image.path),
                                                                        "profile": c.profile}))  # fmt: skip
        s.cases.append(case_to_junit(c))
    return list(suites.values())


def summarize(results: list[CaseResult], baseline: Baseline) -> tuple[str, int]:
    lines = []
    new: dict[Signature, list[CaseResult]] = {}
    seen: set[Signature] = set()
    known_total: Counter[Signature] = Counter()
    for c in results:
        if c.verdict is None:
            continue
        known_total.update(c.verdict.known)
        seen.update(c.verdict.known)
        for sig in c.verdict.new_signatures():
            new.setdefault(sig, []).append(c)
    infra = [c for c in results if c.infra]
    passed = sum(1 for c in results if _status(c) == "ok")
    failed = sum(1 for c in results if _status(c) == "NEW")
    lines.append(f"{len(results)} cases: {passed} passed, {failed} with new findings, {len(infra)} infrastructure")
    for sig, cases in sorted(new.items()):
        lines.append(f"NEW {' '.join(sig)} in {', '.join(f'{c.cell} {c.name}' for c in cases)}")
        for path in sorted({str(p) for c in cases if (p := c.shrunk.get(sig, (None, ""))[0])}):
            lines.append(f"    minimal trace: {path}")
    for c in infra:
        lines.append(f"INFRA {c.cell} {c.name}: {c.infra.splitlines()[0] if c.infra else ''}")
    lines.append("known: " + (", ".join(f"{' '.join(s)} {n}x" for s, n in sorted(known_total.items())) or "none"))
    fixed = [c.fixed_note for c in results if c.fixed_note]
    lines += sorted(set(fixed))
    missing = [e for e in baseline.entries.values() if not baseline.trace_path(e).is_file()]
    if missing:
        lines.append("baseline entries whose minimal trace is missing (run hil baseline update): "
                     + ", ".join(f"{e.describe()} ({e.trace})" for e in missing))
    unseen = [e for k, e in sorted(baseline.entries.items()) if k not in seen]
    if unseen:
        lines.append("baseline entries seen nowhere in this matrix: " + ", ".join(e.describe() for e in unseen))
    code = EXIT_NEW if new else (EXIT_INFRA if infra else EXIT_OK)
    return "\n".join(lines), code


# --- commands -------------------------------------------------------------------------------------
def _build_images(cfg: Config, log: Callable[[str], None]) -> None:
    from hil.errors import InfraError

    base = cfg.path.resolve().parent if cfg.path else REPO
    for image in cfg.images:
        if not image.build:
            continue
        log(f"build {image.label}: {' '.join(image.build)}")
        try:
            res = subprocess.run(list(image.build), cwd=base, capture_output=True, text=True,
                                 timeout=600 * timeout_scale())  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InfraError(f"building image {image.label} failed: {exc}") from exc
        if res.returncode != 0:
            tail = "\n".join((res.stdout + res.stderr).splitlines()[-20:])
            raise InfraError(f"building image {image.label} failed (exit {res.returncode}):\n{tail}")


def cmd_ci(args: argparse.Namespace) -> int:
    from hil.errors import InfraError

    cfg = Config.load(Path(args.config))
    if args.image:
        cfg.images = [Image(Path(p).parent.name or Path(p).stem, Path(p).resolve()) for p in args.image]
    if args.profile:
        cfg.profiles = args.profile
    if args.seeds is not None:
        try:
            cfg.seeds = [argtypes.seed(s) for s in args.seeds.split(",") if s.strip()]
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--seeds: {exc}") from None
    if args.ops is not None:
        cfg.ops = args.ops
    if args.jobs is not None:
        cfg.jobs = args.jobs
    if args.scenarios is not None:
        cfg.scenarios = [] if args.scenarios == "none" else args.scenarios.split(",")
    if args.no_shrink:
        cfg.shrink = False
    if args.max_shrinks is not None:
        cfg.max_shrinks = args.max_shrinks
    if args.baseline:
        cfg.baseline = Path(args.baseline).resolve()
    baseline = Baseline.load(cfg.baseline) if cfg.baseline else Baseline()

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    from hil.target.elf import GuestElf
    from hil.target.machine import Profile
    from hil.workflows.scenarios import SCENARIOS

    # bad input is one line before anything is built, started or created
    bad = [n for n in cfg.scenarios if n not in SCENARIOS]
    if bad:
        raise ConfigError(f"unknown scenario(s) {bad} (known: {list(SCENARIOS)})")
    for p in cfg.profiles:
        Profile.load(p)
    if not args.no_build:
        try:
            _build_images(cfg, log)
        except InfraError as exc:
            print(f"hil ci: {exc.describe()}", file=sys.stderr)
            return EXIT_INFRA
    for image in cfg.images:
        if not image.path.is_file():
            raise ConfigError(f"image {image.label}: {image.path} not found (build it, or give its build argv)")
        GuestElf(image.path)  # an image without the ABI symbols: one line naming them, before any cell
    out = Path(args.out).resolve()  # the cells get absolute paths
    out.mkdir(parents=True, exist_ok=True)
    matrix = Matrix(cfg, out, baseline, log)
    t0 = time.monotonic()
    try:
        results = matrix.run()
    except KeyboardInterrupt:
        print("hil ci: interrupted; every cell ended", file=sys.stderr)
        if args.junit:  # what finished is still worth reading (a CI job cancelled at its timeout)
            stop = CaseResult("interrupted", Image("hil-ci", Path(args.config)), "-",
                              infra="hil ci was interrupted (SIGINT/SIGTERM) before every cell ran")  # fmt: skip
            junit.write(Path(args.junit), to_suites(matrix.results + [stop]))
        return EXIT_INTERRUPTED
    text, code = summarize(results, baseline)
    if args.junit:
        junit.write(Path(args.junit), to_suites(results))
        text += f"\njunit: {args.junit}"
    print(text + f"\ntraces: {out}\n{time.monotonic() - t0:.1f} s, exit {code}")
    return code


def cmd_baseline(args: argparse.Namespace) -> int:
    from hil.run import baseline as bl

    path = Path(args.baseline)
    if args.action == "update":
        new, report = bl.update(path, Path(args.findings))
        print(f"{path}: {report.describe()}")
        todo = bl.todo_entries(new)
        if todo:
            print(f"{len(todo)} entries need a reason (look for {bl.TODO_REASON!r})")
        return EXIT_OK
    b = Baseline.load(path)
    for _k, e in sorted(b.entries.items()):
        print(f"{e.describe():40} {e.trace}\n    {e.reason}")
    print(f"{len(b.entries)} entries, {len(bl.todo_entries(b))} without a reason")
    return EXIT_OK


def _count(text: str) -> int:
    return argtypes.seed(text)  # an integer >= 0


def add_parser(subparsers: Any) -> None:
    ci = subparsers.add_parser("ci", help="a matrix of images x profiles x seeds against a baseline (JUnit)")
    ci.add_argument("--config", required=True, type=argtypes.readable_file,
                    help="the matrix (TOML; see docs/ci/hil-ci.toml)")
    ci.add_argument("--junit", metavar="FILE", type=argtypes.output_file, help="write JUnit XML here")
    ci.add_argument("--out", default="ci-out", help="traces, minimal traces and logs (default ci-out/)")
    ci.add_argument("--jobs", type=argtypes.positive_int, help="cells at a time (default: the config's jobs)")
    ci.add_argument("--image", action="append", metavar="ELF", type=argtypes.guest_image,
                    help="run these images instead of the config's")
    ci.add_argument("--profile", action="append", type=argtypes.profile,
                    help="run these profiles instead of the config's")
    ci.add_argument("--seeds", help="comma-separated seeds instead of the config's (\"\": no random cells)")
    ci.add_argument("--ops", type=argtypes.positive_int, help="ops per seed instead of the config's")
    ci.add_argument("--scenarios", help="comma-separated scenario names, or none")
    ci.add_argument("--baseline", type=argtypes.readable_file, help="baseline file instead of the config's")
    ci.add_argument("--no-shrink", action="store_true", help="do not shrink new findings")
    ci.add_argument("--max-shrinks", type=_count, metavar="N",
                    help="new signatures shrunk per image (default: config's)")
    ci.add_argument("--no-build", action="store_true", help="do not run the images' build commands")
    ci.set_defaults(fn=cmd_ci)
    b = subparsers.add_parser("baseline", help="the baseline of known findings: update from minimal traces, show")
    b.add_argument("action", choices=("update", "show"))
    b.add_argument("--baseline", default=str(SHIPPED_BASELINE), help="the file (default: the shipped one)")
    b.add_argument("--findings", default=str(REPO / "tests" / "data" / "findings"),
                   help="directory of minimal traces, one per finding, signature in the header")
    b.set_defaults(fn=cmd_baseline)


# --- `python -m hil.workflows.ci shrink-one`: one new finding, shrunk in its own process ----------
def shrink_one(argv: list[str] | None = None) -> int:
    import dataclasses

    from hil.errors import HilError, InfraError
    from hil.run.session import Session
    from hil.run.shrink import shrink
    from hil.run.trace import Trace, TraceError, TraceWriter, now, read_trace
    from hil.target.machine import Profile

    p = argparse.ArgumentParser(prog="python -m hil.workflows.ci shrink-one")
    p.add_argument("trace")
    p.add_argument("--op", type=int, required=True)
    p.add_argument("--kind", required=True)
    p.add_argument("--clause", required=True)
    p.add_argument("--field", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        trace = read_trace(Path(args.trace))
        profile = Profile.load(args.profile)
    except (TraceError, HilError) as exc:
        print(f"shrink-one: {exc}", file=sys.stderr)
        return EXIT_INFRA
    want = (args.kind, args.clause, args.field)
    # only the target finding stays in the trace handed to shrink: it shrinks for that one
    records = [dataclasses.replace(r, findings=[f for f in r.findings if r.index == args.op and f.signature() == want])
               for r in trace.records]  # fmt: skip
    target = Trace(trace.header, records, trace.end, trace.notes)
    if not target.findings:
        print(f"shrink-one: no finding {want} at op {args.op} in {args.trace}", file=sys.stderr)
        return EXIT_INFRA
    image = Path(args.image)
    try:
        events, finding = shrink(target, lambda: Session(image=image, profile=profile), args.clause,
                                 log=lambda s: print(s, file=sys.stderr, flush=True))  # fmt: skip
    except InfraError as exc:
        print(f"shrink-one: infrastructure error (not a finding):\n{exc.describe()}", file=sys.stderr)
        return EXIT_INFRA
    except ValueError as exc:  # does not reproduce on replay
        print(f"shrink-one: {exc}", file=sys.stderr)
        return EXIT_NEW
    writer = TraceWriter(Path(args.out), {"guest_build_id": trace.header.get("guest_build_id"), "image": str(image),
                                          "profile": profile.name, "shrunk_from": args.trace, "started": now(),
                                          "finding": list(finding.signature()),
                                          "description": finding.describe()})  # fmt: skip
    for i, e in enumerate(events):
        writer.record(i, e, None, [])
    writer.close("complete", finished=now())
    print(f"shrink-one: {len(events)} events -> {args.out}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    if sys.argv[1:2] == ["shrink-one"]:

        def _interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, _interrupt)
        try:
            sys.exit(shrink_one(sys.argv[2:]))
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
    print("usage: python -m hil.workflows.ci shrink-one TRACE ... (the command is `hil ci`)", file=sys.stderr)
    sys.exit(EXIT_INFRA)
