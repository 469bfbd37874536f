"""`scripts/soak --minutes M`: the checker under faults injected at random, for a while.

Runs `hil run` again and again (a "leg": one seeded run of N ops, on the default guest or on a
test build that triple-faults every K requests) and, while a leg runs, injects at random: QEMU
SIGKILLed, QEMU stopped (SIGSTOP: the stop never comes, the deadline fires), the shared RAM
file deleted, SIGINT / SIGTERM to `hil run`, `hil run` itself SIGKILLed. A leg that ends early
(interrupted, infrastructure error) is continued with `hil run --resume` until its trace is
complete. A fault is survived when its leg ends with a whole trace of exactly N ops, every
process exit was the one that fault calls for (never a traceback, never exit 1 on an
unfinished run), and no process or file of the leg is left. Prints ops done, faults injected
and survived, infra retries, leaked processes, leaked files and lost trace lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hil.errors import env_timeout_scale, timeout_scale
from hil.run.trace import TraceError, read_trace
from hil.target.machine import REPO, leftover_files, leftover_gdbs, leftover_processes

# in-run faults and the exits each may cause (besides finishing normally: 0 or 1)
IN_RUN = ("qemu-kill", "qemu-stop", "ram-file-deleted", "sigint", "sigterm", "harness-kill")
ALLOWED_EXITS = {
    "qemu-kill": {2},  # retried once in a row; a second in a row is an infra error (resumed)
    "qemu-stop": {2},
    "ram-file-deleted": set(),
    "sigint": {130},
    "sigterm": {130},
    "harness-kill": {-signal.SIGKILL},
}
MAX_ATTEMPTS = 12


@dataclass
class Totals:
    legs: int = 0
    processes: int = 0
    ops: int = 0
    injected: Counter[str] = field(default_factory=Counter)
    survived: Counter[str] = field(default_factory=Counter)
    infra_retries: int = 0
    leaked_processes: int = 0
    leaked_files: int = 0
    lost_lines: int = 0
    failures: list[str] = field(default_factory=list)

    def report(self, minutes: float) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.injected.items()))
        rows = [
            ("ops done", f"{self.ops}"),
            ("faults injected", f"{sum(self.injected.values())} ({kinds})"),
            ("faults survived", f"{sum(self.survived.values())}"),
            ("infra retries", f"{self.infra_retries}"),
            ("leaked processes", f"{self.leaked_processes}"),
            ("leaked files", f"{self.leaked_files}"),
            ("lost trace lines", f"{self.lost_lines}"),
        ]
        head = f"soak: {minutes:.1f} min, {self.legs} runs, {self.processes} hil processes"
        body = "\n".join(f"  {k:<17} {v}" for k, v in rows)
        tail = "".join(f"\n  FAILED: {f}" for f in self.failures)
        return f"{head}\n{body}{tail}"


def build_fault_image(root: Path, at: int) -> Path:
    out = root / f"triple-at{at}"
    subprocess.run(["make", "-s", "-C", str(REPO / "guest"), f"B={out}", "FAULT_TEST=2", f"FAULT_AT={at}"],
                   check=True, capture_output=True)  # fmt: skip
    return out / "kernel.elf"


class Leg:
    """One seeded run of `ops` ops, continued with --resume until complete."""

    def __init__(self, n: int, rng: random.Random, work: Path, image: Path | None, ops: int, scale: float):
        self.rng = rng
        self.tag = f"soak{os.getpid()}-{n}"
        self.trace = work / f"leg{n}.jsonl"
        self.ops = ops
        self.args = ["--ops", str(ops), "--seed", str(rng.randrange(1 << 16)), "--show", "none"]
        if image is not None:
            self.args += ["--image", str(image)]
        self.env = {**os.environ, "HIL_RUN_TAG": self.tag, "HIL_TIMEOUT_SCALE": str(scale)}
        self.injected: Counter[str] = Counter()
        self.problems: list[str] = []
        self.processes = 0

    def _start(self, first: bool) -> subprocess.Popen[str]:
        args = ["run", "--trace", str(self.trace), *self.args] if first else ["run", "--resume", str(self.trace)]
        self.processes += 1
        return subprocess.Popen([sys.executable, "-m", "hil.cli", *args], cwd=REPO, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def _inject(self, proc: subprocess.Popen[str], fault: str) -> bool:
        """Inject `fault` into the running leg; False when there was nothing to hit (no QEMU yet)."""
        qemus = leftover_processes(self.tag)
        if fault in ("qemu-kill", "qemu-stop"):
            if not qemus:
                return False
            os.kill(qemus[0], signal.SIGKILL if fault == "qemu-kill" else signal.SIGSTOP)
        elif fault == "ram-file-deleted":
            rams = [p for p in leftover_files(self.tag) if p.suffix == ".ram"]
            if not rams:
                return False
            with contextlib.suppress(FileNotFoundError):
                rams[0].unlink()
        elif fault == "sigint":
            proc.send_signal(signal.SIGINT)
        elif fault == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif fault == "harness-kill":
            proc.kill()
        self.injected[fault] += 1
        return True

    def run(self, mean_gap_s: float, deadline: float) -> None:
        for attempt in range(MAX_ATTEMPTS):
            # killed before its header was written: start the leg again, else continue it
            first = not self._started()
            proc = self._start(first)
            faults: list[str] = []
            # none after half the attempts (the leg must end)
            inject = attempt < MAX_ATTEMPTS // 2 and self.rng.random() < 0.8
            next_at = time.monotonic() + self.rng.uniform(0, 2 * mean_gap_s)
            while proc.poll() is None:
                now = time.monotonic()
                if inject and now >= next_at and now < deadline:
                    fault = self.rng.choice(IN_RUN)
                    if self._inject(proc, fault):
                        faults.append(fault)
                        # up to three per process; none after one that ends the process
                        inject = len(faults) < 3 and fault not in ("sigint", "sigterm", "harness-kill")
                        next_at = now + self.rng.uniform(0, 2 * mean_gap_s)
                    else:
                        next_at = now + 0.2
                time.sleep(0.02)
            err = proc.stderr.read() if proc.stderr else ""
            proc.wait()
            self._check_exit(proc.returncode, faults, err)
            if self._complete():
                return
            if time.monotonic() > deadline + 300:
                break
        self.problems.append(f"{self.trace}: not complete after {MAX_ATTEMPTS} attempts")

    def _check_exit(self, rc: int, faults: list[str], err: str) -> None:
        # without a fault of ours, exit 2 may still be a guest fault (triple-fault build) twice in a row
        allowed = {0, 1}.union(*(ALLOWED_EXITS[f] for f in faults)) if faults else {0, 1, 2}
        if {"sigint", "sigterm"} & set(faults) and rc in (-signal.SIGINT, -signal.SIGTERM):
            # the signal came while the interpreter started or finalised, outside `hil`'s code
            # (Python's default handlers): acceptable when the trace and the census stay clean,
            # which the next attempt and the leg's census check
            return
        if "Traceback" in err or rc not in allowed:
            self.problems.append(f"{self.tag}: exit {rc} after {faults or 'no fault'}: {err.strip()[-400:]}")
        if rc in (0, 1):
            try:
                t = read_trace(self.trace)
            except TraceError as exc:
                self.problems.append(f"{self.tag}: exit {rc} but the trace is unreadable: {exc}")
                return
            if t.end is None or t.end.get("status") != "complete":
                self.problems.append(f"{self.tag}: exit {rc} but the trace ends {t.end}")

    def _started(self) -> bool:
        return self.trace.exists() and self.trace.stat().st_size > 0

    def _complete(self) -> bool:
        if not self._started():
            return False  # ended before its header: the next attempt starts the leg again
        try:
            t = read_trace(self.trace)
        except TraceError as exc:
            self.problems.append(f"{self.tag}: {exc}")
            return True  # nothing more can be done with it
        return t.end is not None and t.end.get("status") == "complete"

    def census(self) -> tuple[int, int]:
        deadline = time.monotonic() + 10 * timeout_scale()
        while (leftover_processes(self.tag) or leftover_gdbs(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.05)
        procs = len(leftover_processes(self.tag)) + len(leftover_gdbs(self.tag))
        # a stopped QEMU that outlived its harness would hold its files: resume it so it can die
        for pid in leftover_processes(self.tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        return procs, len(leftover_files(self.tag))


def soak(
    minutes: float, seed: int, keep: Path | None, mean_gap_s: float, log: Callable[[str], None] = print
) -> Totals:
    rng = random.Random(seed)
    totals = Totals()
    work = Path(tempfile.mkdtemp(prefix="hil-soak-"))
    try:
        images: list[Path | None] = [None, None, None, build_fault_image(work, 150), build_fault_image(work, 400)]
        start = time.monotonic()
        deadline = start + minutes * 60
        n = 0
        while time.monotonic() < deadline:
            image = rng.choice(images)
            leg = Leg(n, rng, work, image, ops=rng.choice((300, 600, 1000)), scale=0.5 * env_timeout_scale())
            n += 1
            leg.run(mean_gap_s, deadline)
            procs, files = leg.census()
            lost = 0
            try:
                t = read_trace(leg.trace)
                lost = 0
                if t.end and t.end.get("status") == "complete":
                    # ops missing from the trace, and any op the run counted that the trace lacks
                    lost = leg.ops - len(t.records)
                    if t.end.get("ops_done") != len(t.records):
                        leg.problems.append(f"{leg.tag}: the run counted {t.end.get('ops_done')} ops, "
                                            f"its trace has {len(t.records)}")  # fmt: skip
                retries = [x for x in t.notes if x.get("what") == "infra-retry"]
                guest = sum(1 for x in retries if "triple fault" in str(x.get("error")))
                if guest:
                    leg.injected["guest-triple-fault"] += guest
                totals.infra_retries += len(retries)
                totals.ops += len(t.records)
            except TraceError as exc:
                leg.problems.append(str(exc))
            ok = not leg.problems and procs == 0 and files == 0 and lost == 0
            totals.legs += 1
            totals.processes += leg.processes
            totals.injected += leg.injected
            if ok:
                totals.survived += leg.injected
            totals.leaked_processes += procs
            totals.leaked_files += files
            totals.lost_lines += abs(lost)
            totals.failures += leg.problems + ([f"{leg.tag}: leaked {procs} processes, {files} files"]
                                               if procs or files else [])  # fmt: skip
            log(f"leg {leg.tag}: {leg.ops} ops, {leg.processes} hil processes, faults "
                f"{dict(leg.injected) or 'none'}, {'ok' if ok else 'FAILED'}")  # fmt: skip
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(leg.trace, keep / leg.trace.name)
        log(totals.report((time.monotonic() - start) / 60))
        return totals
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from hil import argtypes

    p = argtypes.Parser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long to inject (default 10)")
    p.add_argument("--seed", type=argtypes.seed, default=19)
    p.add_argument("--gap", type=float, default=2.0, help="mean seconds before a fault is injected (default 2)")
    p.add_argument("--keep", metavar="DIR", help="copy every leg's trace here")
    p.add_argument("--json", metavar="FILE", help="also write the totals as JSON")
    args = p.parse_args(argv)
    if not args.minutes > 0 or not args.gap > 0:
        p.error("argument --minutes/--gap: must be positive")
    totals = soak(args.minutes, args.seed, Path(args.keep) if args.keep else None, args.gap)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "ops": totals.ops, "injected": dict(totals.injected), "survived": dict(totals.survived),
            "infra_retries": totals.infra_retries, "leaked_processes": totals.leaked_processes,
            "leaked_files": totals.leaked_files, "lost_trace_lines": totals.lost_lines,
            "failures": totals.failures,
        }, indent=1))  # fmt: skip
    clean = not totals.failures and sum(totals.injected.values()) == sum(totals.survived.values())
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
