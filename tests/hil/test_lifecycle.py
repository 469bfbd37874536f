"""Processes and files end with the run that started them, whatever ends the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hil.errors import timeout_scale
from hil.target.machine import leftover_files, leftover_gdbs, leftover_processes, sweep_stale_files

REPO = Path(__file__).resolve().parents[2]


def _start_run(tmp_path: Path, tag: str) -> tuple[subprocess.Popen[bytes], Path]:
    trace = tmp_path / "run.jsonl"
    env = {**os.environ, "HIL_RUN_TAG": tag}
    proc = subprocess.Popen([sys.executable, "-m", "hil.cli", "run", "--ops", "1000000", "--show", "none",
                             "--trace", str(trace)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30 * timeout_scale()
    while not (trace.exists() and len(trace.read_text().splitlines()) > 20):
        assert time.monotonic() < deadline and proc.poll() is None, "the run did not get going"
        time.sleep(0.05)
    return proc, trace


def _wait_gone(tag: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds * timeout_scale()
    while leftover_processes(tag) or leftover_gdbs(tag):
        assert time.monotonic() < deadline, (leftover_processes(tag), leftover_gdbs(tag))
        time.sleep(0.05)


def test_sigterm_ends_everything_and_keeps_the_trace(tmp_path: Path) -> None:
    tag = f"term{os.getpid()}"
    proc, trace = _start_run(tmp_path, tag)
    assert leftover_processes(tag)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30 * timeout_scale()) == 130
    _wait_gone(tag)
    assert leftover_files(tag) == []
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert lines[-1]["type"] == "end" and lines[-1]["status"] == "interrupted"
    assert all(x["type"] == "event" for x in lines[1:-1])


def test_sigkill_of_the_harness_takes_qemu_and_gdb_with_it(tmp_path: Path) -> None:
    tag = f"kill{os.getpid()}"
    proc, trace = _start_run(tmp_path, tag)
    proc.kill()
    proc.wait(timeout=10 * timeout_scale())
    _wait_gone(tag)  # PR_SET_PDEATHSIG
    # nothing could clean up after SIGKILL; the next machine to start (ours below, or another
    # run's on a shared machine) sweeps the files of dead harnesses
    sweep_stale_files()
    assert set(leftover_files(tag)) == set()
    # every line written before the kill is intact
    for line in trace.read_text().splitlines()[:-1]:
        json.loads(line)
