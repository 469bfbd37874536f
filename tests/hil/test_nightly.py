"""`hil nightly` on a real local Dask cluster with real guests under QEMU: the report's numbers
against the traces, a worker killed mid-chunk, an interrupted night resumed, a seeded bug's
night against the default's (`--previous`), and the report opened in headless chromium.

Budgets are small (the machine is shared): the main night runs 40 s instead of the issue's
60 s — every check below holds for any budget that gives each worker a few chunks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from hil.check import Finding
from hil.errors import timeout_scale
from hil.target.elf import GuestElf
from hil.target.machine import leftover_processes
from hil.workflows.report import root_signatures

REPO = Path(__file__).resolve().parents[2]
RUN_TAG = os.environ.get("HIL_RUN_TAG", "")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def nightly_argv(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "hil.cli", "nightly", "--out", str(out), "--progress-interval", "5", *args]


def run_nightly(out: Path, *args: str, budget_s: float) -> subprocess.CompletedProcess[str]:
    # the budget, the shrinking of new root causes, starting and closing the cluster
    deadline = (budget_s + 300) * timeout_scale()
    argv = nightly_argv(out, "--budget", f"{budget_s:.0f}s", *args)
    proc = subprocess.Popen(argv, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # like Ctrl-C: it ends its cluster and every QEMU
        stdout, stderr = proc.communicate(timeout=120 * timeout_scale())
        pytest.fail(f"hil nightly did not end within {deadline:.0f} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def trace_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def events(path: Path) -> list[dict]:
    return [x for x in trace_lines(path) if x["type"] == "event"]


def wait_for(pred, what: str, timeout_s: float, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout_s * timeout_scale()
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"hil nightly ended (status {proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def chunk_processes(out: Path) -> list[tuple[int, int, str]]:
    """(pid, parent pid, chunk id) of running chunk subprocesses of the night in `out`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if "hil.workflows.chunk" in argv and any(a.startswith(str(out / "work")) for a in argv):
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            spec = next(a for a in argv if a.endswith(".spec.json"))
            found.append((int(entry.name), int(fields[1]), Path(spec).name.split(".")[0]))
    return found


def check_against_traces(out: Path, s: dict) -> None:
    """Every number of summary.json recomputed from the chunk traces in DIR/traces."""
    counted = [c for c in s["chunks"] if c["status"] in ("complete", "interrupted")]
    assert len({c["id"] for c in s["chunks"]}) == len(s["chunks"])  # a chunk once, whatever its attempts
    ops = Counter()
    outcomes: Counter = Counter()
    cov: dict[str, Counter] = {"evaluated": Counter(), "exercised": Counter(), "violated": Counter()}
    groups: Counter = Counter()
    first_ops: dict[str, tuple[str, int]] = {}
    known = {tuple(k.split(" ", 2)) for k in s["baseline_signatures"]}
    total = 0
    for c in counted:
        lines = trace_lines(out / "traces" / f"{c['id']}.jsonl")
        head = lines[0]
        assert head["chunk"] == c["id"] and head["seed"] == c["seed"] and head["attempt"] == c["attempt"]
        assert head["guest_build_id"] == s["guest_build_id"]
        evs = [x for x in lines if x["type"] == "event"]
        assert [e["index"] for e in evs] == list(range(len(evs)))  # no op twice, none missing
        assert len(evs) == c["ops"]
        total += len(evs)
        for e in evs:
            ops[e["event"]["op"]] += 1
            outcomes[(e["event"]["op"], e["result"]["status"])] += 1
        end = lines[-1]
        assert end["type"] == "end" and end["ops_done"] == len(evs)
        for part in cov:
            cov[part].update(end["coverage"][part])
        boot = [x for x in lines if x["type"] == "note" and x["what"] == "booted"]
        findings = [f for x in boot for f in x["findings"]] + [f for e in evs for f in e["findings"]]
        for f, sig in zip(findings, root_signatures(findings, known), strict=True):
            key = " ".join(sig)
            groups[key] += 1
            first_ops.setdefault(key, (c["id"], Finding.from_json(f).op_index))
    assert s["totals"]["ops"] == total
    assert s["ops_by_kind"] == dict(ops)
    assert {(k, st): n for k, per in s["outcomes"].items() for st, n in per.items()} == dict(outcomes)
    for clause, v in s["clause_coverage"].items():
        assert v == {part: cov[part].get(clause, 0) for part in cov}, clause
    assert set(s["never_exercised"]) == {c for c, v in s["clause_coverage"].items() if not v["exercised"]}
    assert {f["key"]: f["count"] for f in s["findings"]} == dict(groups)
    assert s["totals"]["findings"] == sum(groups.values())
    for f in s["findings"]:
        in_baseline = tuple(f["key"].split(" ", 2)) in known
        assert (f["status"] == "known") == (in_baseline and f["count"] > f["consequences"]), f


def build_guest(*make_args: str) -> Path:
    """A guest build of our own (the default build in guest/build/ is rebuilt by others while a
    night runs, and a night refuses a chunk whose image is another build)."""
    build = Path(tempfile.mkdtemp(prefix="hil-nightly-guest-"))
    subprocess.run(["make", "-s", "-C", str(REPO / "guest"), f"B={build}", *make_args], check=True,
                   timeout=300 * timeout_scale(), capture_output=True)  # fmt: skip
    return build


@pytest.fixture(scope="module")
def image() -> Path:
    build = build_guest()
    try:
        yield build / "kernel.elf"
    finally:
        shutil.rmtree(build, ignore_errors=True)


@pytest.fixture(scope="module")
def night(tmp_path_factory, image) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("nightly") / "night"
    proc = run_nightly(out, "--workers", "2", "--chunk-ops", "150", "--shrink-timeout", "120s", "--image", str(image),
                       budget_s=40)  # fmt: skip
    return out, proc


def test_night_numbers_match_the_traces(night, image):
    out, proc = night
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    s = summary_of(out)
    assert s["status"] == "complete" and s["workers"] == 2 and s["scheduler"] == "local"
    assert s["guest_build_id"] == GuestElf(image).build_id
    check_against_traces(out, s)
    t = s["totals"]
    assert t["ops"] > 0 and t["chunks"] >= 2 and t["booted"]
    assert len({c["worker"] for c in s["chunks"]}) == 2  # both workers ran chunks, each with its own QEMU
    assert len({c["seed"] for c in s["chunks"]}) == len(s["chunks"])
    # the default image meets only the shipped baseline's findings... or reports what is new, shrunk
    assert (proc.returncode == 1) == (t["new"] > 0)
    for f in s["findings"]:
        if f["status"] == "new":
            assert f.get("minimal_trace") or f.get("shrink_error"), f
    # the plain progress lines (stderr is not a terminal here) and the closing line
    assert "nightly: " in proc.stderr and "budget left" in proc.stderr
    assert f"{t['ops']} ops in {t['chunks']} chunks" in proc.stdout
    # junit: one case per root cause and one for the infrastructure; new ones fail
    suite = ET.parse(out / "junit.xml").getroot()
    assert len(suite.findall("testcase")) == len(s["findings"]) + 1
    assert int(suite.get("failures")) == t["new"]
    assert leftover_processes(RUN_TAG) == []


def _chromium(url: str, tmp: Path) -> tuple[str, str]:
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp}", "--enable-logging=stderr", "--v=0", "--dump-dom", url]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120 * timeout_scale())
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, p.stderr


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is installed by scripts/setup")
def test_report_in_a_real_browser(night, tmp_path):
    from html.parser import HTMLParser

    out, _ = night
    s = summary_of(out)
    dom, log = _chromium((out / "report.html").as_uri(), tmp_path / "profile")
    consoles = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert consoles == [], consoles  # no error, no warning, no log at all
    assert 'id="findings"' in dom

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.table, self.rows, self.plots, self.loaded, self.cells, self.numbers = None, 0, 0, None, [], {}
            self._key = None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "body":
                self.loaded = a.get("data-plots-loaded")
            if tag == "table":
                self.table = a.get("id")
            if tag == "tr" and self.table == "findings":
                self.rows += 1
            if tag == "img" and "plot" in (a.get("class") or ""):
                self.plots += 1
            if tag == "td" and a.get("data-key"):
                self._key = a["data-key"]

        def handle_data(self, data):
            if self._key:
                self.numbers[self._key] = data
                self._key = None

    r = Rows()
    r.feed(dom)
    # the page's own load handler counted the plots that decoded (naturalWidth > 0)
    assert r.plots == 3 and r.loaded == "3/3"
    assert r.rows == 1 + len(s["findings"])
    assert r.numbers["checked ops"] == str(s["totals"]["ops"])
    assert r.numbers["root causes"] == str(len(s["findings"]))


def test_killed_worker_loses_only_its_chunk(tmp_path, image):
    out = tmp_path / "night"
    argv = nightly_argv(out, "--budget", "40s", "--workers", "2", "--chunk-ops", "1000", "--no-shrink",
                        "--image", str(image))  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def running_chunk():
            for pid, ppid, cid in chunk_processes(out):
                live = out / "work" / f"{cid}.a1.jsonl"
                if live.exists() and len(events(live)) >= 20:
                    return pid, ppid, cid
            return None

        pid, worker_pid, victim = wait_for(running_chunk, "a chunk 20 ops in", 60, proc)
        qemus_before = set(leftover_processes(RUN_TAG))
        os.kill(worker_pid, signal.SIGKILL)  # the Dask worker process, in the middle of its chunk
        stdout, stderr = proc.communicate(timeout=(40 + 240) * timeout_scale())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, 1), stderr[-3000:]
    s = summary_of(out)
    retry = [r for r in s["retries"] if r["chunk"] == victim]
    assert [r["reason"] for r in retry] == ["worker lost"], s["retries"]
    mine = [c for c in s["chunks"] if c["id"] == victim]
    assert len(mine) == 1 and mine[0]["attempt"] == 2 and mine[0]["status"] == "complete"
    # the redo ran the chunk's whole seed again on a fresh machine; the lost part counts nowhere
    redo = trace_lines(out / "traces" / f"{victim}.jsonl")
    assert redo[0]["attempt"] == 2
    assert len(events(out / "traces" / f"{victim}.jsonl")) == mine[0]["ops"]
    check_against_traces(out, s)
    assert "worker lost" in (out / "report.html").read_text()
    # the killed chunk's QEMU died with it; nothing of the night is left running
    assert not (qemus_before & set(leftover_processes(RUN_TAG)))
    assert leftover_processes(RUN_TAG) == []
    assert chunk_processes(out) == []


def test_interrupted_night_resumes(tmp_path, image):
    out = tmp_path / "night"
    # chunks long enough (at up to ~500 ops/s; a stop lands within ~0.5 s) to stop one in the middle
    args = ("--workers", "1", "--chunk-ops", "1500", "--no-shrink", "--image", str(image))
    proc = subprocess.Popen(nightly_argv(out, "--budget", "90s", *args), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        def one_done_one_running():
            done = list((out / "chunks").glob("*.json")) if (out / "chunks").exists() else []
            running = [cid for _, _, cid in chunk_processes(out) if (out / "work" / f"{cid}.a1.jsonl").exists()
                       and len(events(out / "work" / f"{cid}.a1.jsonl")) >= 10]  # fmt: skip
            return done and running and running[0]

        partial = wait_for(one_done_one_running, "a finished chunk and one 10 ops in", 120, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120 * timeout_scale())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert leftover_processes(RUN_TAG) == [] and chunk_processes(out) == []
    first = summary_of(out)
    assert first["status"] == "interrupted"
    check_against_traces(out, first)
    by_id = {c["id"]: c for c in first["chunks"]}
    assert by_id[partial]["status"] == "interrupted" and 10 <= by_id[partial]["ops"] < 1500, by_id[partial]
    done_before = {cid: c for cid, c in by_id.items() if c["status"] == "complete"}
    assert done_before
    spent = json.loads((out / "nightly.json").read_text())["spent_s"]

    # the same command; its budget only what keeps the test short (the night gets what is left)
    again = run_nightly(out, *args, budget_s=int(spent) + 20)
    assert again.returncode in (0, 1), again.stderr[-3000:]
    second = summary_of(out)
    assert second["status"] == "complete" and second["legs"] == 2
    check_against_traces(out, second)
    by_id2 = {c["id"]: c for c in second["chunks"]}
    for cid, c in done_before.items():
        assert by_id2[cid] == c  # kept as it was, not run again
    assert by_id2[partial]["status"] == "complete"  # redone under its own id
    assert by_id2[partial]["ops"] == len(events(out / "traces" / f"{partial}.jsonl")) > by_id[partial]["ops"]
    assert second["totals"]["ops"] == sum(c["ops"] for c in by_id2.values())
    assert second["totals"]["ops"] >= first["totals"]["ops"] - by_id[partial]["ops"] + by_id2[partial]["ops"]
    state = json.loads((out / "nightly.json").read_text())
    assert len(state["legs"]) == 2 and state["spent_s"] > spent
    assert leftover_processes(RUN_TAG) == []


@pytest.fixture(scope="module")
def seeded_image() -> Path:
    build = build_guest("SEEDED_BUG=3")
    try:
        yield build / "kernel.elf"
    finally:
        shutil.rmtree(build, ignore_errors=True)


def test_seeded_bug_is_new_against_the_default_night(night, seeded_image, tmp_path):
    prev_out, _ = night
    prev = summary_of(prev_out)
    out = tmp_path / "bug3"
    # seed 20 meets the bug at op 11 (the default seeds only near op 100): a short minimisation
    proc = run_nightly(out, "--workers", "1", "--chunk-ops", "150", "--seed", "20", "--previous", str(prev_out),
                       "--image", str(seeded_image), "--shrink-timeout", "120s", budget_s=20)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    s = summary_of(out)
    check_against_traces(out, s)
    assert s["previous"] == str(prev_out)
    prev_keys = {f["key"] for f in prev["findings"]}
    new = [f for f in s["findings"] if f["status"] == "new"]
    assert new, s["findings"]
    for f in new:
        assert f["since_previous"] == "new" and f["key"] not in prev_keys
        assert f"NEW {f['key']}" in proc.stdout
    # query's clone forgets the rc bump: the rc accounting no longer adds up
    assert any(f["kind"] in ("IMPL", "INVARIANT") for f in new), new
    shrunk = [f for f in new if f.get("minimal_trace")]
    assert shrunk, new
    for f in shrunk:
        mt = out / f["minimal_trace"]
        head = trace_lines(mt)[0]
        # a facet (another new signature first seen at the same op) shares its lead's minimal trace
        lead = f.get("facet_of") or f["key"]
        assert head["finding"][:2] == lead.split(" ")[:2]
        assert 0 < f["minimal_events"] == len(events(mt))
        assert f["debug"] == f"hil debug {mt} --finding 0"
    for f in s["findings"]:
        assert f["since_previous"] == ("unchanged" if f["key"] in prev_keys else "new")
    assert {x["key"] for x in s["fixed"]} == prev_keys - {f["key"] for f in s["findings"]}
    page = (out / "report.html").read_text()
    assert 'id="since-previous"' in page and all(f["key"] in page for f in new)
    assert leftover_processes(RUN_TAG) == []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_existing_cluster_via_scheduler(tmp_path, image):
    """`dask scheduler` + `dask worker` started by hand, as the README says; the night runs there."""
    from hil.target.proc import end_process

    dask_cli = str(Path(sys.executable).parent / "dask")
    addr = f"tcp://127.0.0.1:{_free_port()}"
    procs: list[subprocess.Popen] = []
    try:
        with open(tmp_path / "scheduler.log", "wb") as log:
            procs.append(subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port",
                                           addr.rsplit(":", 1)[1], "--no-dashboard"], stdout=log, stderr=log))
        with open(tmp_path / "worker.log", "wb") as log:
            procs.append(subprocess.Popen([dask_cli, "worker", addr, "--nthreads", "1", "--nworkers", "1",
                                           "--no-dashboard"], cwd=REPO, stdout=log, stderr=log))  # fmt: skip
        out = tmp_path / "night"
        proc = run_nightly(out, "--scheduler", addr, "--chunk-ops", "100", "--no-shrink", "--image", str(image),
                           budget_s=15)  # fmt: skip
        assert proc.returncode in (0, 1), proc.stderr[-3000:]
        s = summary_of(out)
        assert s["scheduler"] == addr and s["totals"]["ops"] > 0
        check_against_traces(out, s)  # the traces came back as data: the workers share no directory with us
        assert not (out / "work").exists() or not list((out / "work").iterdir())
    finally:
        for p in reversed(procs):
            end_process(p, 20, lambda p=p: p.send_signal(signal.SIGTERM))
    assert leftover_processes(RUN_TAG) == []


def test_no_guest_ever_boots_exits_2(tmp_path, image):
    # the ELF gdb reads is fine, the image QEMU boots is empty: every chunk fails at start-up
    bad = tmp_path / "img"
    bad.mkdir()
    shutil.copy(image, bad / "kernel.elf")
    (bad / "kernel.bin").write_bytes(b"")
    out = tmp_path / "night"
    proc = run_nightly(out, "--workers", "1", "--no-shrink", "--image", str(bad / "kernel.elf"), budget_s=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no guest ever booted" in proc.stderr
    s = summary_of(out)  # the report of what was tried is written all the same
    assert s["totals"]["ops"] == 0 and not s["totals"]["booted"] and s["totals"]["chunks_lost"] >= 2
    assert all("QEMU" in c["error"] for c in s["chunks"])
    assert "QEMU" in (out / "report.html").read_text()
    assert leftover_processes(RUN_TAG) == []
