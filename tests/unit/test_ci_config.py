"""`hil ci` without QEMU: the matrix config, which new findings get shrunk, the JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hil.check import Finding, Kind
from hil.errors import ConfigError
from hil.run.baseline import Baseline, Entry
from hil.workflows import junit
from hil.workflows.ci import CaseResult, Config, Image, Matrix, case_to_junit, summarize

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_config_has_two_images_and_two_profiles() -> None:
    cfg = Config.load(REPO / "docs" / "ci" / "hil-ci.toml")
    assert [i.label for i in cfg.images] == ["default", "O0"]
    assert cfg.images[1].build and "OPT=-O0" in cfg.images[1].build
    assert len(cfg.profiles) >= 2 and cfg.baseline == REPO / "tests" / "data" / "baseline.json"
    assert cfg.scenarios and cfg.seeds


@pytest.mark.parametrize("text, needle", [
    ("images = {a = 'x'}\nbogus = 1", "unknown keys ['bogus']"),
    ("profiles = ['default']", "must name at least one image"),
    ("images = {a = 'x'}\nscenarios = ['nope']", "scenarios must be"),
    ("images = {a = 'x'}\nops = 'many'", "ops must be int"),
    ("images = {a = {path = 'x', colour = 'red'}}", "image 'a' must be a path or a table"),
    ("images = {a = 'x'}\nseeds = [1, 'two']", "seeds must be a list of integers"),
    ("images = [", "ci config"),
])  # fmt: skip
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "ci.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as exc:
        Config.load(path)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def _case(name: str, findings: list[Finding], baseline: Baseline) -> CaseResult:
    c = CaseResult(name, Image("img", Path("/x/kernel.elf")), "default", Path(f"/tmp/{name}.jsonl"))
    c.verdict = baseline.compare(findings, report_fixed=False)
    return c


def test_each_new_signature_is_shrunk_once_from_its_earliest_case(tmp_path: Path) -> None:
    b = Baseline({("SPEC", "MAP-2", "slot"): Entry("SPEC", "MAP-2", "slot", "t", "r")})
    slot = Finding(Kind.IMPL, 7, "SLOT", "rc")
    derived = Finding(Kind.IMPL, 7, "Q-4", "rc")
    late_slot = Finding(Kind.IMPL, 90, "SLOT", "rc")
    seed = _case("seed", [late_slot, Finding(Kind.SPEC, 3, "MAP-2", "rc")], b)
    scen = _case("scenario", [derived, slot], b)
    cfg = Config(images=[], profiles=["default"], max_shrinks=1)
    plan = Matrix(cfg, tmp_path, b, log=lambda s: None).shrink_plan([seed, scen])
    # SLOT rc first appeared at op 7 of the scenario; the guest-vs-model difference goes before
    # the clause the guest violates because of it; max_shrinks = 1
    assert [(c.name, sig) for c, sig, _f in plan] == [("scenario", ("IMPL", "SLOT", "rc"))]


def test_junit_failure_names_the_finding_its_minimal_trace_and_hil_debug(tmp_path: Path) -> None:
    b = Baseline()
    c = _case("scenario map", [Finding(Kind.IMPL, 7, "SLOT", "rc", slot=3, guest=1, model=2)], b)
    c.shrunk[("IMPL", "SLOT", "rc")] = (tmp_path / "min.jsonl", "")
    (tmp_path / "min.jsonl").write_text("h\n" + "e\n" * 8 + "end\n")
    ok = _case("scenario unmap", [], b)
    ok.fixed_note = "fixed? SPEC X slot: \x07bell"
    infra = CaseResult("seed 1", ok.image, "default", infra="hil run exited 2")
    xml = tmp_path / "j.xml"
    junit.write(xml, [junit.Suite("img/default", [case_to_junit(x) for x in (c, ok, infra)])])
    root = ET.parse(xml).getroot()
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("3", "1", "1")
    fail = root.find(".//testcase[@name='scenario map']/failure")
    assert fail is not None and "IMPL SLOT rc" in (fail.get("message") or "")
    assert f"minimal trace: {tmp_path / 'min.jsonl'} (8 events)" in (fail.text or "")
    assert f"hil debug {tmp_path / 'min.jsonl'} --at 7" in (fail.text or "")
    out = root.findtext(".//testcase[@name='scenario unmap']/system-out") or ""
    assert "fixed? SPEC X slot" in out and "\\x07" in out  # control characters escaped, XML stays valid
    text, code = summarize([c, ok, infra], b)
    assert code == 1 and "NEW IMPL SLOT rc" in text
    assert summarize([ok, infra], b)[1] == 2 and summarize([ok], b)[1] == 0
