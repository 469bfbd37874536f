"""Suite-wide: a census of QEMU processes and shared RAM files before and after the run.

Every process the harness starts must be ended by PID and its files removed, on every exit
path; a leak fails the suite."""

from __future__ import annotations

import pytest

from hil.machine import leftover_files, leftover_processes


@pytest.fixture(scope="session", autouse=True)
def no_leaks():
    before_pids = set(leftover_processes())
    before_files = set(leftover_files())
    yield
    leaked_pids = set(leftover_processes()) - before_pids
    leaked_files = set(leftover_files()) - before_files
    assert not leaked_pids, f"QEMU processes left running: {sorted(leaked_pids)}"
    assert not leaked_files, f"files left behind: {sorted(map(str, leaked_files))}"
