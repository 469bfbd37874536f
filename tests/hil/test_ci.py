"""`hil ci` on the shipped config, the baseline in `hil run`, and the pytest plugin in a
throwaway project (real QEMU, real guest; op counts small)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hil.errors import timeout_scale
from hil.run.baseline import SHIPPED_BASELINE, Baseline
from hil.target.machine import DEFAULT_IMAGE

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "docs" / "ci" / "hil-ci.toml"


def hil(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # deadlines grow with the machine's load (three suites on two cores), never shrink
    return subprocess.run([sys.executable, "-m", "hil.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout * timeout_scale())  # fmt: skip


def junit_cases(path: Path) -> list[ET.Element]:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    return list(root.iter("testcase"))


def build_seeded(tmp: Path, bug: int) -> Path:
    out = tmp / f"bug{bug}"
    subprocess.run(["make", "-s", "-C", str(REPO / "guest"), f"B={out}", f"SEEDED_BUG={bug}"], check=True,
                   capture_output=True, timeout=300 * timeout_scale())  # fmt: skip
    return out / "kernel.elf"


def ci(tmp: Path, name: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    xml = tmp / f"{name}.xml"
    res = hil("ci", "--config", str(SHIPPED_CONFIG), "--junit", str(xml), "--out", str(tmp / name), "--no-build",
              "--profile", "default", "--seeds", "1", "--ops", "40", "--jobs", "2", *extra)  # fmt: skip
    return res, xml


def test_ci_passes_on_the_current_guest_and_fails_on_a_seeded_bug(tmp_path: Path) -> None:
    res, xml = ci(tmp_path, "clean", "--image", str(DEFAULT_IMAGE))
    assert res.returncode == 0, res.stdout + res.stderr
    cases = junit_cases(xml)
    names = {c.get("name") for c in cases}
    # one case per scenario, per baseline entry's minimal trace, per seed
    assert {"scenario map", "scenario unmap", "scenario segment", "seed 1 (40 ops)"} <= names
    assert sum(1 for n in names if n and n.startswith("known ")) == len(Baseline.load(SHIPPED_BASELINE).entries)
    assert not [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    # the known findings were met and judged known (read back from the guest, not assumed)
    outs = [c.findtext("system-out") or "" for c in cases if c.get("name") == "scenario vm_space"]
    assert outs and "known findings: " in outs[0] and "SPEC VS-NEW-1 inv 2x" in outs[0], outs

    bad, bad_xml = ci(tmp_path, "bug3", "--image", str(build_seeded(tmp_path, 3)), "--scenarios", "map",
                      "--max-shrinks", "1")  # fmt: skip
    assert bad.returncode == 1, bad.stdout + bad.stderr
    failures = [(c.get("name"), c.find("failure")) for c in junit_cases(bad_xml) if c.find("failure") is not None]
    assert failures, "the seeded bug left no failure in the JUnit file"
    by_name = dict(failures)
    assert "scenario map" in by_name
    f = by_name["scenario map"]
    assert f is not None and "IMPL SLOT rc" in (f.get("message") or "")  # query forgets the rc bump
    body = f.text or ""
    assert "[IMPL]" in body and "minimal trace:" in body and "hil debug " in body
    min_trace = Path(body.split("minimal trace: ")[1].split(" (")[0])
    header = json.loads(min_trace.read_text().splitlines()[0])
    assert header["finding"][:2] == ["IMPL", "SLOT"] and len(min_trace.read_text().splitlines()) <= 8
    assert "NEW IMPL SLOT rc" in bad.stdout


def test_a_known_finding_no_longer_seen_is_reported_fixed(tmp_path: Path) -> None:
    # a baseline whose MAP-2 entry points at a trace that no longer produces MAP-2
    findings = tmp_path / "findings"
    findings.mkdir()
    (findings / "spec-MAP-2.jsonl").write_text(
        json.dumps({"type": "header", "version": 1, "finding": ["SPEC", "MAP-2", "rc"]}) + "\n"
        + json.dumps({"type": "event", "index": 0, "event": {"op": "NewVmSpace"}, "findings": []}) + "\n"
        + json.dumps({"type": "end", "status": "complete"}) + "\n"
    )  # fmt: skip
    (tmp_path / "b.json").write_text(json.dumps({"version": 1, "entries": [
        {"kind": "SPEC", "clause": "MAP-2", "field": "slot", "trace": "findings/spec-MAP-2.jsonl", "reason": "x"},
        {"kind": "SPEC", "clause": "VS-NEW-1", "field": "inv", "trace": "findings/spec-MAP-2.jsonl", "reason": "y"},
        {"kind": "INVARIANT", "clause": "S1/R2", "field": "slots", "trace": "findings/spec-MAP-2.jsonl", "reason": "z"},
    ]}))  # fmt: skip
    res, xml = ci(tmp_path, "fixed", "--image", str(DEFAULT_IMAGE), "--baseline", str(tmp_path / "b.json"),
                  "--scenarios", "frame", "--seeds", "")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fixed? SPEC MAP-2 slot" in res.stdout
    outs = {c.get("name"): c.findtext("system-out") or "" for c in junit_cases(xml)}
    assert "fixed? SPEC MAP-2 slot" in outs["known SPEC MAP-2 slot"]
    assert "fixed?" not in outs["known SPEC VS-NEW-1 inv"]  # its trace (NewVmSpace) still shows it

    # hil run --baseline: known findings pass, exit 0; the unseen entry is named
    run = hil("run", "--ops", "5", "--seed", "1", "--show", "none", "--trace", str(tmp_path / "r.jsonl"),
              "--baseline", str(tmp_path / "b.json"))  # fmt: skip
    assert "fixed? SPEC MAP-2 slot not seen in this run" in run.stdout, run.stdout + run.stderr


def test_run_with_the_shipped_baseline_and_stop_on_new(tmp_path: Path) -> None:
    trace = tmp_path / "r.jsonl"
    res = hil("run", "--ops", "60", "--seed", "1", "--show", "none", "--trace", str(trace), "--baseline",
              str(SHIPPED_BASELINE), "--stop-on-finding", "new")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert sum(1 for x in lines if x["type"] == "event") == 60  # known findings did not stop it
    assert any(x.get("findings") for x in lines if x["type"] == "event")
    # plain --stop-on-finding still means "any": the first NewVmSpace's VS-NEW-1 stops it
    res = hil("run", "--ops", "60", "--seed", "1", "--show", "none", "--trace", str(trace), "--stop-on-finding")
    assert res.returncode == 1
    events = [json.loads(x) for x in trace.read_text().splitlines() if '"type": "event"' in x]
    assert events[-1]["findings"] and len(events) < 60
    bad = hil("run", "--ops", "5", "--stop-on-finding", "new")
    assert bad.returncode == 2 and "needs --baseline" in bad.stderr


def test_pytest_plugin_in_a_throwaway_project(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_kernel="from hil.workflows.pytest_plugin import test_hil_scenario, test_hil_seeded_run  # noqa: F401\n",
        test_own=(
            "from model import ops as m\n\n"
            "def test_my_kernel_maps(hil_check, hil_runner):\n"
            "    verdict = hil_check([m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=1 << 21)])\n"
            "    assert verdict.known  # VmSpace::new meets the known VS-NEW-1 finding\n"
            "    assert 1 in hil_runner.state.vm_spaces  # read back from the guest\n"
        ),
    )  # fmt: skip
    result = pytester.runpytest_subprocess(
        f"--hil-image={DEFAULT_IMAGE}", "--hil-profile=default", f"--hil-baseline={SHIPPED_BASELINE}",
        "--hil-ops=30", "-m", "hil", "-p", "no:cacheprovider", "--junitxml=junit.xml", timeout=240 * timeout_scale(),
    )  # fmt: skip
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()
    # 8 scenarios + 1 seed + 1 own test (all selected by -m hil: marked by their fixtures)
    assert outcomes.get("passed", 0) >= 10, result.stdout.str()
    names = {c.get("name") for c in junit_cases(pytester.path / "junit.xml")}
    assert {"test_hil_scenario[map]", "test_hil_seeded_run[seed1]", "test_my_kernel_maps"} <= names
    # without --hil-image the checker's tests skip, saying what to pass
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", timeout=120 * timeout_scale())
    assert result.parseoutcomes().get("skipped", 0) >= 10
    result.stdout.fnmatch_lines(["*--hil-image=ELF*"])


def test_an_image_without_an_abi_symbol_or_of_another_abi_version_is_one_line_naming_it(tmp_path: Path) -> None:
    import shutil
    import struct

    from hil.errors import AbiError
    from hil.run.session import Session
    from hil.target import abi

    stripped = tmp_path / "kernel.elf"
    subprocess.run(["objcopy", "--strip-symbol=hil_op_done", str(DEFAULT_IMAGE), str(stripped)], check=True)
    shutil.copy(DEFAULT_IMAGE.with_suffix(".bin"), tmp_path / "kernel.bin")
    res = hil("run", "--ops", "1", "--image", str(stripped), "--trace", str(tmp_path / "t.jsonl"))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "hil_op_done" in res.stderr, res.stderr
    res = hil("ci", "--config", str(SHIPPED_CONFIG), "--no-build", "--image", str(stripped), "--out", str(tmp_path))
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"hil: {stripped}: guest image lacks the ABI symbol(s) hil_op_done"], res.stderr
    # another ABI version in the guest's layout block: refused, naming both versions
    s = Session()
    s.boot()
    try:
        assert s.memory is not None
        s.memory.write(s._layout_paddr + 8, struct.pack("<Q", abi.ABI_VERSION + 1))
        want = f"guest ABI version {abi.ABI_VERSION + 1}, harness speaks {abi.ABI_VERSION}"
        with pytest.raises(AbiError, match=want):
            s._read_layout()
    finally:
        s.close()


def test_sigterm_ends_every_cell_and_its_qemu(tmp_path: Path) -> None:
    import signal
    import time

    from hil.target.machine import leftover_gdbs, leftover_processes

    tag = os.environ["HIL_RUN_TAG"]
    before, before_gdbs = set(leftover_processes(tag)), set(leftover_gdbs(tag))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hil.cli", "ci", "--config", str(SHIPPED_CONFIG), "--no-build", "--out",
         str(tmp_path / "out"), "--image", str(DEFAULT_IMAGE), "--ops", "3000", "--scenarios", "none", "--jobs", "2",
         "--junit", str(tmp_path / "j.xml")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60 * timeout_scale()
        while len(set(leftover_processes(tag)) - before) < 2:  # two cells, each its own QEMU
            assert proc.poll() is None and time.monotonic() < deadline, "the cells did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60 * timeout_scale())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    # the JUnit file still says what happened
    assert any(c.find("error") is not None and c.get("name") == "interrupted" for c in junit_cases(tmp_path / "j.xml"))
    assert not set(leftover_processes(tag)) - before, "a cell's QEMU outlived hil ci"
    assert not set(leftover_gdbs(tag)) - before_gdbs, "a cell's gdb outlived hil ci"


@pytest.mark.skipif(not (os.environ.get("HIL_TEST_KVM") and os.access("/dev/kvm", os.R_OK | os.W_OK)),
                    reason="opt-in (HIL_TEST_KVM=1, /dev/kvm): the KVM profile is opt-in (a software backend here)")
def test_kvm_profile_boots_and_runs_a_scenario() -> None:
    from hil.run.runner import Runner
    from hil.run.session import Session
    from hil.target.machine import Profile
    from hil.workflows.scenarios import SCENARIOS

    s = Session(profile=Profile.load("kvm"))
    runner = Runner(s, baseline=Baseline.load(SHIPPED_BASELINE))
    try:
        runner.start()  # a hardware breakpoint on hil_op_done: KVM refuses a software one at -S
        assert s.layout is not None and runner.state is not None
        found = runner.run(SCENARIOS["map"](s.layout))
        assert runner.baseline is not None and runner.baseline.compare(found, report_fixed=False).passed
        assert sorted(runner.state.vm_spaces[1].mappings()) == [0, 4096]  # read back from guest memory
    finally:
        s.close()
