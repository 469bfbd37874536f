"""Faults injected for real, each ending cleanly: exit status, one clear message (what failed, the
QEMU command line, the log tails), the trace complete up to the last finished op and marked, and
a census of QEMU / gdb processes and run files before and after (nothing leaked).

The guest faults (a hang, a triple fault, a panic with no recovery) come from test builds of
the guest (`make -C guest FAULT_TEST=K FAULT_AT=N`), never from the default build.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hil.errors import InfraError, env_timeout_scale, timeout_scale
from hil.run.session import Session
from hil.run.trace import read_trace
from hil.target.machine import Machine, Profile, leftover_files, leftover_gdbs, leftover_processes
from model import ops as m

REPO = Path(__file__).resolve().parents[2]
HANG, TRIPLE, PANIC = 1, 2, 3
_tags = itertools.count()
RUN_TAG = os.environ["HIL_RUN_TAG"]  # set by tests/conftest.py for the whole session


# --- helpers ------------------------------------------------------------------------------
def new_tag() -> str:
    return f"{RUN_TAG}-f{next(_tags)}"  # under the suite's tag: its census counts these too


def assert_nothing_left(tag: str, seconds: float = 10.0) -> None:
    """The census: no QEMU, no gdb, no run directory or shared RAM file of run `tag`."""
    deadline = time.monotonic() + seconds * timeout_scale()
    while leftover_processes(tag) or leftover_gdbs(tag):
        assert time.monotonic() < deadline, f"left running: QEMU {leftover_processes(tag)}, gdb {leftover_gdbs(tag)}"
        time.sleep(0.02)
    assert leftover_files(tag) == [], leftover_files(tag)


@contextlib.contextmanager
def census(tag: str) -> Iterator[None]:
    assert not leftover_processes(tag) and not leftover_gdbs(tag) and not leftover_files(tag)
    yield
    assert_nothing_left(tag)


@dataclass
class Done:
    rc: int
    out: str
    err: str
    trace: Path

    def lines(self) -> list[dict]:
        return [json.loads(x) for x in self.trace.read_text().splitlines()]

    def events(self) -> list[dict]:
        return [x for x in self.lines() if x["type"] == "event"]

    def end(self) -> dict:
        return self.lines()[-1]


def env_for(tag: str, scale: float = 1.0, **extra: str) -> dict[str, str]:
    # the child scales by the load itself: pass on only the user's factor
    return {**os.environ, "HIL_RUN_TAG": tag, "HIL_TIMEOUT_SCALE": str(scale * env_timeout_scale()), **extra}


def hil(args: list[str], env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hil.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout * timeout_scale())  # fmt: skip


def run(tmp_path: Path, tag: str, *args: str, scale: float = 1.0, env: dict[str, str] | None = None) -> Done:
    trace = tmp_path / f"{tag}.jsonl"
    p = hil(["run", "--show", "none", "--trace", str(trace), *args], env or env_for(tag, scale))
    return Done(p.returncode, p.stdout, p.stderr, trace)


def start(tmp_path: Path, tag: str, *args: str, scale: float = 1.0) -> tuple[subprocess.Popen[str], Path]:
    trace = tmp_path / f"{tag}.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "hil.cli", "run", "--show", "none", "--trace", str(trace), *args],
                            cwd=REPO, env=env_for(tag, scale), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    return proc, trace


def wait_for(cond, what: str, seconds: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds * timeout_scale()
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def trace_events(trace: Path) -> int:
    try:
        return sum(1 for x in trace.read_text().splitlines() if '"type": "event"' in x)
    except FileNotFoundError:
        return 0


def assert_one_paragraph(err: str, *needles: str) -> None:
    """What failed, the QEMU command line and the log tails, in one message."""
    for n in needles:
        assert n in err, f"{n!r} not in:\n{err}"


@pytest.fixture(scope="session")
def fault_build(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """make -C guest B=DIR FAULT_TEST=K FAULT_AT=N -> DIR/kernel.elf (built once per session)."""
    root = tmp_path_factory.mktemp("fault-builds")
    built: dict[tuple[int, int], Path] = {}

    def build(kind: int, at: int) -> Path:
        if (kind, at) not in built:
            out = root / f"k{kind}-at{at}"
            subprocess.run(["make", "-s", "-C", str(REPO / "guest"), f"B={out}", f"FAULT_TEST={kind}",
                            f"FAULT_AT={at}"], check=True, capture_output=True)  # fmt: skip
            built[(kind, at)] = out / "kernel.elf"
        return built[(kind, at)]

    return build


# --- QEMU ---------------------------------------------------------------------------------
def test_qemu_killed_mid_op_is_retried_and_the_counts_match_the_trace(tmp_path: Path, fault_build) -> None:
    """The guest spins inside its 5th op; QEMU is SIGKILLed there. The run reboots and goes on:
    the op that was lost is not counted, the trace has every op once, numbered without a gap."""
    tag = new_tag()
    with census(tag):
        proc, trace = start(tmp_path, tag, "--ops", "8", "--image", str(fault_build(HANG, 5)), scale=3)
        wait_for(lambda: trace_events(trace) == 4 and leftover_processes(tag), "4 ops done")
        # the 5th request is in the guest now (or about to be): it never finishes on its own
        time.sleep(0.2)
        assert trace_events(trace) == 4
        (qemu,) = leftover_processes(tag)
        os.kill(qemu, signal.SIGKILL)
        out, err = proc.communicate(timeout=60 * timeout_scale())
    assert proc.returncode in (0, 1), err
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    events = [x for x in lines if x["type"] == "event"]
    assert [e["index"] for e in events] == list(range(8))
    (note,) = [x for x in lines if x["type"] == "note"]
    assert note["what"] == "infra-retry" and note["index"] == 4 and note["lost"] is not None
    assert "QEMU was killed by SIGKILL (not sent by the harness)" in note["error"]
    assert lines[-1]["type"] == "end" and lines[-1]["status"] == "complete" and lines[-1]["ops_done"] == 8
    assert "8 ops," in out and "1 infrastructure retries" in out


@pytest.mark.parametrize("what", ["bad profile", "missing qemu", "socket in use"])
def test_qemu_refusing_to_start_is_exit_2_with_the_reason(tmp_path: Path, what: str) -> None:
    tag = new_tag()
    env = env_for(tag)
    args = ["--ops", "5"]
    with contextlib.ExitStack() as stack:
        if what == "bad profile":
            prof = tmp_path / "bad.toml"
            prof.write_text('cpu = "no-such-cpu"\n')
            args += ["--profile", str(prof)]
            needles = ["QEMU exited with status 1", "no-such-cpu", "QEMU command line:"]
        elif what == "socket in use":
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            prof = tmp_path / "busy.toml"
            chardev = f"socket,id=busy,host=127.0.0.1,port={port},server=on,wait=off"
            prof.write_text(f'extra_args = ["-chardev", "{chardev}"]\n')
            args += ["--profile", str(prof)]
            needles = ["QEMU exited with status 1", "Address already in use", "QEMU command line:"]
        else:
            env["PATH"] = str(tmp_path)  # no QEMU there
            needles = ["qemu-system-x86_64 not found on PATH"]
        with census(tag):
            done = run(tmp_path, tag, *args, env=env)
    assert done.rc == 2, done.err
    assert_one_paragraph(done.err, *needles)
    assert "Traceback" not in done.err
    assert done.end()["status"] == "infra-error" and done.events() == []
    # the boot was tried twice (a machine that does not come up gets one more try)
    assert [x["what"] for x in done.lines() if x["type"] == "note"] == ["infra-retry"]


def test_a_missing_gdb_is_an_infra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from hil.target import gdb as gdb_mod

    monkeypatch.setattr(gdb_mod, "GDB_BINARY", "/nonexistent/gdb")
    tag = new_tag()
    monkeypatch.setenv("HIL_RUN_TAG", tag)
    with census(tag):
        session = Session(driver="gdb")
        with pytest.raises(InfraError, match="cannot start /nonexistent/gdb"):
            session.boot()


def test_a_machine_refuses_a_second_start_and_a_taken_run_directory(tmp_path: Path) -> None:
    tag = new_tag()
    with census(tag):
        first = Machine(Profile.load("default"), tag=f"{tag}-{os.getpid()}-same")
        first.start()
        try:
            with pytest.raises(InfraError, match="already running"):
                first.start()
            twin = Machine(Profile.load("default"), tag=first.tag)  # same sockets, same RAM file
            with pytest.raises(InfraError, match="cannot create the run directory"):
                twin.start()
            assert first.alive()  # the twin did not touch the first machine's files
        finally:
            first.stop()
    # QEMU ends on our SIGTERM with status 0, or dies of it (seen once with three suites at once
    # on 2 cores), or of our SIGKILL after the grace time; either way the status is kept after stop()
    assert first.returncode in (0, -signal.SIGTERM, -signal.SIGKILL), first.fate()
    assert "not sent by the harness" not in first.fate()


def test_logs_are_kept_in_the_log_dir_after_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tag = new_tag()
    monkeypatch.setenv("HIL_RUN_TAG", tag)
    monkeypatch.setenv("HIL_LOG_DIR", str(tmp_path / "logs"))
    with census(tag):
        session = Session()
        try:
            session.boot()
            machine = session.machine
            assert machine is not None
        finally:
            session.close()
    kept = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert kept == [f"{machine.tag}-qemu.log", f"{machine.tag}-serial.log"]
    assert "hil: READY" in (tmp_path / "logs" / f"{machine.tag}-serial.log").read_text()


def test_shared_ram_file_deleted_under_a_running_guest(tmp_path: Path) -> None:
    """The mapping outlives the name: the run goes on to the end, and nothing is left."""
    tag = new_tag()
    with census(tag):
        proc, trace = start(tmp_path, tag, "--ops", "150")
        wait_for(lambda: trace_events(trace) >= 20, "20 ops")
        shm = [p for p in leftover_files(tag) if p.suffix == ".ram"]
        assert shm
        for p in shm:
            p.unlink()
        out, err = proc.communicate(timeout=120 * timeout_scale())
    assert proc.returncode in (0, 1), err
    t = read_trace(trace)
    assert len(t.records) == 150 and t.end is not None and t.end["status"] == "complete"


# --- the debugger -------------------------------------------------------------------------
@pytest.mark.parametrize("driver", ["gdb", "stub"])
def test_debugger_killed_mid_op_is_an_infra_error_then_a_reboot_works(fault_build, driver: str) -> None:
    tag = new_tag()
    os.environ["HIL_RUN_TAG"], saved = tag, os.environ["HIL_RUN_TAG"]
    try:
        with census(tag):
            session = Session(image=fault_build(HANG, 2), driver=driver)
            try:
                session.boot()
                session.apply(m.Nop(1))
                gdb = session.gdb
                assert gdb is not None
                killer = threading.Timer(0.3, _kill_debugger, args=(session, driver))
                killer.start()
                with pytest.raises(InfraError) as exc:
                    session.apply(m.Nop(2), deadline_s=30)  # spins in the guest until the kill
                killer.join()
                msg = exc.value.describe()
                assert "gdb exited" in msg if driver == "gdb" else "connection" in msg, msg
                assert "QEMU command line:" in msg and "fault test: injecting" in msg
                session.reset()  # a fresh machine: the drive works again
                assert session.apply(m.Nop(3)).result.get("value") == 3
            finally:
                session.close()
    finally:
        os.environ["HIL_RUN_TAG"] = saved


def _kill_debugger(session: Session, driver: str) -> None:
    if driver == "gdb":
        os.kill(session.gdb.pid, signal.SIGKILL)  # type: ignore[union-attr]
    else:  # the stub client lives in this process: its connection is what dies
        session.gdb._sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]


def test_garbage_on_the_stub_connection_is_an_infra_error() -> None:
    """A 'QEMU' whose gdb stub answers noise: the client gives up at its deadline, cleanly."""
    from hil.target.gdb import Gdb
    from hil.target.stub import Stub

    tag = new_tag()
    path = Path("/tmp") / f"ostd-hil-{tag}-{os.getpid()}-garbage.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()
    stop = threading.Event()

    def serve() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            srv.settimeout(0.1)
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(0.05)
                while not stop.is_set():
                    with contextlib.suppress(OSError):
                        conn.sendall(bytes(rng.randrange(256) for _ in range(64)) + b"$zz#00}{*")
                    time.sleep(0.01)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    saved = os.environ["HIL_RUN_TAG"]
    os.environ["HIL_RUN_TAG"] = tag
    try:
        for client in (Stub(), Gdb(Path("/nonexistent"))):
            try:
                with pytest.raises(InfraError):
                    client.connect(path, timeout_s=1.0)  # type: ignore[attr-defined]
            finally:
                # gdb stuck in the remote protocol ignores -gdb-exit: no need to wait long for it
                client.close(grace_s=0.2) if isinstance(client, Gdb) else client.close()
    finally:
        os.environ["HIL_RUN_TAG"] = saved
        stop.set()
        th.join()
        srv.close()
        path.unlink()
    assert_nothing_left(tag)


# --- the guest ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, needles",
    [
        (HANG, ["the guest did not stop within", "fault test: injecting"]),
        (TRIPLE, ["QEMU exited with status 0 (under -no-reboot, a guest triple fault"]),
        (PANIC, ["the guest did not stop within", "panic: fault test: panic outside any op recovery"]),
    ],
    ids=["hang", "triple-fault", "panic"],
)
def test_guest_fault_in_the_first_op_twice_is_exit_2(tmp_path: Path, fault_build, kind: int, needles) -> None:
    """The fault comes back after the retry's fresh machine: the run ends, exit 2, one paragraph
    (what, the QEMU command line, the serial log tail), the trace marked infra-error."""
    tag = new_tag()
    with census(tag):
        done = run(tmp_path, tag, "--ops", "5", "--image", str(fault_build(kind, 1)), scale=0.1)
    assert done.rc == 2, done.err
    assert_one_paragraph(done.err, "infrastructure error (not a finding)", "QEMU command line:",
                         "--- tail of serial log ---", *needles)  # fmt: skip
    assert "Traceback" not in done.err
    lines = done.lines()
    assert [x["what"] for x in lines if x["type"] == "note"] == ["infra-retry"]
    assert done.events() == [] and done.end()["status"] == "infra-error"


def test_guest_fault_mid_run_is_survived(tmp_path: Path, fault_build) -> None:
    tag = new_tag()
    with census(tag):
        done = run(tmp_path, tag, "--ops", "7", "--image", str(fault_build(TRIPLE, 3)))
    assert done.rc in (0, 1), done.err
    # every machine runs two ops and triple-faults in its 3rd request: ops 2, 4 and 6 are each
    # lost once and run again on a fresh machine
    notes = [x for x in done.lines() if x["type"] == "note"]
    assert [n["index"] for n in notes] == [2, 4, 6]
    assert all("triple fault" in n["error"] for n in notes)
    assert [e["index"] for e in done.events()] == list(range(7)) and done.end()["ops_done"] == 7


# --- signals and harness errors -------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_at_random_moments_ends_the_run_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    """From the moment the trace has its header (boot) to well into the ops."""
    rng = random.Random(sig)
    for delay in [0.0, rng.uniform(0, 0.3), rng.uniform(0.3, 1.5)]:
        tag = new_tag()
        with census(tag):
            proc, trace = start(tmp_path, tag, "--ops", "100000")
            wait_for(lambda: trace.exists() and trace.stat().st_size > 0, "the trace header")  # noqa: B023
            time.sleep(delay)
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=60 * timeout_scale())
        assert proc.returncode == 130, (delay, proc.returncode, err)
        assert "Traceback" not in err
        t = read_trace(trace)  # every line whole
        assert t.end is not None and t.end["status"] == "interrupted" and t.end["ops_done"] == len(t.records)


def run_patched(tag: str, patch: str, trace: Path, ops: int) -> subprocess.CompletedProcess[str]:
    """`hil run` in a Python that first runs `patch` (a fault planted in the harness)."""
    code = patch + ("import sys, hil.cli\n"
                    f"sys.exit(hil.cli.main(['run', '--ops', '{ops}', '--show', 'none', '--trace', {str(trace)!r}]))\n")
    with census(tag):
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env_for(tag), capture_output=True,
                              text=True, timeout=120 * timeout_scale())  # fmt: skip


@pytest.mark.parametrize("where", ["header", "end"])
def test_a_signal_while_the_trace_header_or_end_is_written_still_ends_the_trace(tmp_path: Path, where: str) -> None:
    """The header and the end line come as a pair: SIGINT right after the header is written
    (before the run's try; suite-rounds once hit that window) or while the end line of a complete
    run is written, and the trace still ends, with its true status."""
    tag = new_tag()
    trace = tmp_path / "t.jsonl"
    patch = (
        "import os, signal, hil.run.trace as t\n"
        "real_init, real_close = t.TraceWriter.__init__, t.TraceWriter.close\n"
        "def init(self, *a, **k):\n"
        "    real_init(self, *a, **k)\n"
        f"    if {where == 'header'}: os.kill(os.getpid(), signal.SIGINT)\n"
        "def close(self, *a, **k):\n"
        f"    if {where == 'end'}: os.kill(os.getpid(), signal.SIGINT)\n"
        "    real_close(self, *a, **k)\n"
        "t.TraceWriter.__init__, t.TraceWriter.close = init, close\n"
    )
    p = run_patched(tag, patch, trace, 5)
    assert "Traceback" not in p.stderr, p.stderr
    t = read_trace(trace)
    assert t.end is not None, "the trace has no end line"
    if where == "header":  # acted on before the guest booted
        assert p.returncode == 130, p.stderr
        assert t.end["status"] == "interrupted" and t.end["ops_done"] == 0 and not t.records
    else:  # the run had finished: its end line and its exit status say so (1: findings, 0: none)
        assert p.returncode in (0, 1), p.stderr
        assert t.end["status"] == "complete" and t.end["ops_done"] == len(t.records) == 5


def test_any_exception_inside_the_harness_is_exit_2_with_the_trace_kept(tmp_path: Path) -> None:
    tag = new_tag()
    trace = tmp_path / "t.jsonl"
    patch = (
        # the workload is harness code outside the checks (whose own exceptions are findings)
        "import hil.run.workload as w\n"
        "real, n = w.Workload.__call__, [0]\n"
        "def call(self, state):\n"
        "    n[0] += 1\n"
        "    if n[0] == 11: raise RuntimeError('injected harness bug')\n"
        "    return real(self, state)\n"
        "w.Workload.__call__ = call\n"
    )
    p = run_patched(tag, patch, trace, 50)
    assert p.returncode == 2, p.stderr
    assert "internal error (not a finding): RuntimeError: injected harness bug" in p.stderr
    assert "Traceback" not in p.stderr and str(trace) in p.stderr
    t = read_trace(trace)
    assert len(t.records) == 10 and t.end is not None and t.end["status"] == "error"
    assert "injected harness bug" in t.end["error"]


# --- the trace --------------------------------------------------------------------------------
def test_full_disk_while_writing_the_trace(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    tag = new_tag()
    try:
        with census(tag):
            trace = mnt / "t.jsonl"
            p = hil(["run", "--ops", "400", "--show", "none", "--trace", str(trace)], env_for(tag))
            assert p.returncode == 2, p.stderr
            assert "No space left on device" in p.stderr and "Traceback" not in p.stderr
            # the part of a line the failed write left is cut: the trace reads, and can be resumed
            t = read_trace(trace)
            assert 10 < len(t.records) < 400 and t.end is None
            # room again: the run goes on where it stopped
            subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
            p = hil(["run", "--resume", str(trace), "--show", "none"], env_for(tag))
        assert p.returncode in (0, 1), p.stderr
        t = read_trace(trace)
        assert [r.index for r in t.records] == list(range(400))
        assert t.end is not None and t.end["status"] == "complete"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_resume_continues_an_interrupted_run_as_if_never_stopped(tmp_path: Path) -> None:
    tag = new_tag()
    with census(tag):
        proc, trace = start(tmp_path, tag, "--ops", "120", "--seed", "5")
        wait_for(lambda: trace_events(trace) >= 50, "50 ops")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60 * timeout_scale())
        assert proc.returncode == 130
        stopped_at = len(read_trace(trace).records)
        assert stopped_at < 120
        p = hil(["run", "--resume", str(trace), "--show", "none"], env_for(tag))
        assert p.returncode in (0, 1), p.stderr
        assert f"resumed {trace} after op {stopped_at - 1}" in p.stderr
        straight = run(tmp_path, tag, "--ops", "120", "--seed", "5")
        assert straight.rc == p.returncode
    resumed = read_trace(trace)
    again = read_trace(straight.trace)
    key = lambda t: [(r.index, r.event, r.result) for r in t.records]  # noqa: E731
    assert key(resumed) == key(again)
    assert resumed.end is not None and resumed.end["status"] == "complete"
    # a complete run is not resumed again, and nothing is appended to it
    size = trace.stat().st_size
    p = hil(["run", "--resume", str(trace)], env_for(tag))
    assert p.returncode == 2 and "the run is complete" in p.stderr and trace.stat().st_size == size


def test_a_trace_from_another_guest_build(tmp_path: Path) -> None:
    tag = new_tag()
    with census(tag):
        done = run(tmp_path, tag, "--ops", "20")
        other = tmp_path / "other.jsonl"
        lines = done.trace.read_text().splitlines()
        header = json.loads(lines[0])
        header["guest_build_id"] = "0" * 40
        other.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
        p = hil(["replay", str(other)], env_for(tag))
        assert p.returncode in (0, 1), p.stderr  # replayed, with a note; the results still agree here
        assert "recorded on guest build 0000000000000000000000000000000000000000" in p.stderr
        assert "replayed 20 events: 0 differences" in p.stdout
        # resuming needs the very build: the run could not be rebuilt op for op
        interrupted = tmp_path / "interrupted.jsonl"
        end = json.loads(lines[-1])
        end["status"] = "interrupted"
        interrupted.write_text("\n".join([json.dumps(header)] + lines[1:-1] + [json.dumps(end)]) + "\n")
        p = hil(["run", "--resume", str(interrupted)], env_for(tag))
    assert p.returncode == 2 and "a run resumes only on its own build" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# --- many runs at once ------------------------------------------------------------------------
def test_three_runs_at_once_do_not_talk_to_each_other(tmp_path: Path) -> None:
    """Same seed, same guest: three concurrent runs must write the same trace; cross-talk
    (one run driving another's QEMU or reading its RAM) would break that."""
    tags = [new_tag() for _ in range(3)]
    procs = [start(tmp_path, t, "--ops", "150", "--seed", "3") for t in tags]
    for proc, _ in procs:
        proc.communicate(timeout=180 * timeout_scale())
    for t in tags:
        assert_nothing_left(t)
    assert {proc.returncode for proc, _ in procs} <= {0, 1}
    traces = [read_trace(trace) for _, trace in procs]
    first = [(r.event, r.result, [f.signature() for f in r.findings]) for r in traces[0].records]
    assert len(first) == 150
    for t in traces[1:]:
        assert [(r.event, r.result, [f.signature() for f in r.findings]) for r in t.records] == first


# --- hil ci and hil nightly under signals -----------------------------------------------------
def _traces_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jsonl"))


def _wait_for_ops(root: Path, n: int, what: str, seconds: float = 120.0) -> None:
    wait_for(lambda: any(trace_events(t) >= n for t in _traces_under(root)), what, seconds)


def test_hil_ci_ends_cleanly_on_a_signal(tmp_path: Path) -> None:
    """SIGTERM (SIGINT takes the same path in `hil`'s main) while the cells run."""
    sig = signal.SIGTERM
    tag = new_tag()
    out = tmp_path / "ci"
    with census(tag):
        proc = subprocess.Popen(
            [sys.executable, "-m", "hil.cli", "ci", "--config", str(REPO / "docs/ci/hil-ci.toml"),
             "--image", str(REPO / "guest/build/kernel.elf"), "--profile", "default", "--seeds", "1,2",
             "--ops", "100000", "--scenarios", "none", "--no-build", "--no-shrink", "--out", str(out)],
            cwd=REPO, env=env_for(tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _wait_for_ops(out, 1 + random.Random(sig).randrange(40), "a cell's first ops")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60 * timeout_scale())
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    for t in _traces_under(out):
        trace = read_trace(t)
        assert trace.end is None or trace.end["status"] in ("interrupted", "complete"), (t, trace.end)


def test_hil_nightly_ends_cleanly_on_sigint(tmp_path: Path) -> None:
    tag = new_tag()
    out = tmp_path / "night"
    with census(tag):
        proc = subprocess.Popen(
            [sys.executable, "-m", "hil.cli", "nightly", "--budget", "10m", "--workers", "1", "--out", str(out),
             "--no-shrink", "--chunk-ops", "2000", "--progress-interval", "1"],
            cwd=REPO, env=env_for(tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _wait_for_ops(out, 20, "the first chunk's ops")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120 * timeout_scale())
    assert proc.returncode == 130, err
    for t in _traces_under(out / "traces"):
        read_trace(t)  # every line whole
