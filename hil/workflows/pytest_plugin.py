"""pytest plugin (entry point `pytest11: hil`): the checker inside a kernel project's own pytest run.

    pytest --hil-image=build/kernel.elf [--hil-profile=default] [--hil-baseline=hil-baseline.json]

Fixtures: `hil_session` (a booted guest, one per module), `hil_runner` (a checked Runner on a
freshly booted guest, judged against the baseline), `hil_check` (run a list of ops, fail the
test on a finding not in the baseline). A test using any of them is marked `hil`.
The scenario suite and seeded random runs come as parametrised tests; two lines add them:

    # tests/test_hil.py
    from hil.workflows.pytest_plugin import test_hil_scenario, test_hil_seeded_run  # noqa: F401

JUnit comes from pytest's own `--junitxml`. Without --hil-image these tests are skipped.
Heavy imports (the harness, QEMU drive) happen inside fixtures, never at plugin load.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from hil.run.baseline import Baseline, Verdict
    from hil.run.runner import Runner
    from hil.run.session import Session
    from hil.target.machine import Profile

BOOTING_FIXTURES = ("hil_session", "hil_runner", "hil_check")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "ostd-hil: the page-table checker against a guest image under QEMU")
    group.addoption("--hil-image", metavar="ELF", help="guest image (64-bit ELF with the hil ABI, .bin beside it)")
    group.addoption("--hil-profile", metavar="P", default="default", help="machine profile name or .toml path")
    group.addoption("--hil-baseline", metavar="FILE", help="known findings (a run fails only on a new one)")
    group.addoption("--hil-seeds", metavar="S,S", default="1", help="seeds of test_hil_seeded_run (default 1)")
    group.addoption("--hil-ops", metavar="N", type=int, default=200, help="ops per seeded run (default 200)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hil: boots a guest under QEMU (ostd-hil)")
    # machines started by this test session carry the tag (leak census, concurrent runs apart)
    os.environ.setdefault("HIL_RUN_TAG", f"pytest{os.getpid()}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in BOOTING_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.hil)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hil_scenario" in metafunc.fixturenames:
        from hil.workflows.scenarios import SCENARIOS

        names: list[str] = list(SCENARIOS)
        baseline_path = metafunc.config.getoption("--hil-baseline")
        if baseline_path:
            # every known finding's minimal trace too: one that no longer shows it is "fixed"
            from hil.run.baseline import Baseline

            b = Baseline.load(baseline_path)
            names += [f"known:{b.trace_path(e)}" for _k, e in sorted(b.entries.items())]
        metafunc.parametrize("hil_scenario", names, ids=[_scenario_id(n) for n in names])
    if "hil_seed" in metafunc.fixturenames:
        seeds = [int(s) for s in str(metafunc.config.getoption("--hil-seeds")).split(",") if s.strip()]
        metafunc.parametrize("hil_seed", seeds, ids=[f"seed{s}" for s in seeds])


def _scenario_id(name: str) -> str:
    return "known-" + Path(name.removeprefix("known:")).stem if name.startswith("known:") else name


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def hil_image(request: pytest.FixtureRequest) -> Path:
    image = request.config.getoption("--hil-image")
    if not image:
        pytest.skip("no guest image: pass --hil-image=ELF")
    path = Path(image)
    if not path.is_file():
        raise pytest.UsageError(f"--hil-image {path}: not found")
    return path


@pytest.fixture(scope="session")
def hil_profile(request: pytest.FixtureRequest) -> Profile:
    from hil.target.machine import Profile

    return Profile.load(request.config.getoption("--hil-profile"))


@pytest.fixture(scope="session")
def hil_baseline(request: pytest.FixtureRequest) -> Baseline:
    from hil.run.baseline import Baseline

    path = request.config.getoption("--hil-baseline")
    return Baseline.load(path) if path else Baseline()


@pytest.fixture(scope="module")
def hil_session(hil_image: Path, hil_profile: Profile) -> Iterator[Session]:
    """One booted guest per test module; call `.reset()` for a fresh one."""
    from hil.run.session import Session

    s = Session(image=hil_image, profile=hil_profile)
    s.boot()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def hil_runner(hil_session: Session, hil_baseline: Baseline) -> Runner:
    """A checked Runner on a freshly booted guest (boot-state findings checked too)."""
    from hil.run.runner import Runner

    runner = Runner(hil_session, baseline=hil_baseline)
    boot = runner.start()
    _fail_on_new(hil_baseline, boot, "boot state")
    return runner


def _fail_on_new(baseline: Baseline, findings: Sequence[Any], what: str) -> Verdict:
    verdict = baseline.compare(findings, report_fixed=False)
    if not verdict.passed:
        pytest.fail(f"new finding(s) in {what} (not in the baseline):\n{verdict.describe()}", pytrace=False)
    return verdict


@pytest.fixture
def hil_check(hil_runner: Runner, hil_baseline: Baseline) -> Callable[..., Verdict]:
    """`hil_check(ops)` runs the ops checked; fails the test on a finding not in the baseline."""

    def check(events: Sequence[Any], what: str = "these ops") -> Verdict:
        found = hil_runner.run(list(events))
        return _fail_on_new(hil_baseline, found, what)

    return check


# --- the shipped tests (import them into a test module to collect them) ----------------------------
def test_hil_scenario(hil_scenario: str, hil_runner: Runner, hil_baseline: Baseline) -> None:
    """One scenario of the fixed suite, or a baseline entry's minimal trace (known:PATH)."""
    from hil.run.baseline import signature

    if hil_scenario.startswith("known:"):
        from hil.run.baseline import read_trace_signature
        from hil.run.trace import read_trace

        path = Path(hil_scenario.removeprefix("known:"))
        if not path.is_file():
            pytest.skip(f"the baseline names {path}, which is missing: update the baseline (hil baseline update)")
        found = hil_runner.run(read_trace(path).events)
        _fail_on_new(hil_baseline, found, path.name)
        got = read_trace_signature(path)
        if got is not None and not any(signature(f) == got[0] for f in found):
            pytest.skip(f"fixed? {' '.join(got[0])} no longer shows on its minimal trace {path}")
        return
    from hil.workflows.scenarios import SCENARIOS

    assert hil_runner.session.layout is not None
    found = hil_runner.run(SCENARIOS[hil_scenario](hil_runner.session.layout))
    _fail_on_new(hil_baseline, found, f"scenario {hil_scenario}")


def test_hil_seeded_run(hil_seed: int, hil_runner: Runner, hil_baseline: Baseline,
                        request: pytest.FixtureRequest) -> None:  # fmt: skip
    """A seeded random workload of --hil-ops checked ops."""
    from hil.run.workload import Workload

    assert hil_runner.session.layout is not None
    ops = int(request.config.getoption("--hil-ops"))
    found = hil_runner.run(Workload(hil_seed, hil_runner.session.layout), count=ops)
    _fail_on_new(hil_baseline, found, f"seed {hil_seed} ({ops} ops)")
