"""Suite-wide: a census of QEMU processes and shared RAM files before and after the run.

Every process the harness starts must be ended by PID and its files removed, on every exit
path; a leak fails the suite."""

from __future__ import annotations

import os

import pytest

from hil.target.machine import leftover_files, leftover_gdbs, leftover_processes

# every machine this test session starts (in this process or in `hil` subprocesses) carries
# this tag, so a concurrent run on the same machine is not counted as our leak
RUN_TAG = f"t{os.getpid()}"
os.environ["HIL_RUN_TAG"] = RUN_TAG


@pytest.fixture(scope="session", autouse=True)
def no_leaks():
    before_gdbs = set(leftover_gdbs(RUN_TAG))
    before_pids = set(leftover_processes(RUN_TAG))
    before_files = set(leftover_files(RUN_TAG))
    yield
    leaked_pids = set(leftover_processes(RUN_TAG)) - before_pids
    leaked_files = set(leftover_files(RUN_TAG)) - before_files
    leaked_gdbs = set(leftover_gdbs(RUN_TAG)) - before_gdbs
    assert not leaked_gdbs, f"gdb processes left running: {sorted(leaked_gdbs)}"
    assert not leaked_pids, f"QEMU processes left running: {sorted(leaked_pids)}"
    assert not leaked_files, f"files left behind: {sorted(map(str, leaked_files))}"


@pytest.fixture
def run_events_fn():
    """Boot a guest, run a list of events with all checks, return every finding (used by the
    regression and findings cases written by `hil shrink`)."""
    from hil.run.runner import Runner
    from hil.run.session import Session

    def run(events):
        session = Session()
        runner = Runner(session)
        try:
            runner.start()
            return runner.run(events)
        finally:
            session.close()

    return run
