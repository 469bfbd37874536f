"""The gdb/MI client against a fake gdb: token-matched replies, deadlines, a dying gdb."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from hil.errors import InfraError
from hil.target import gdb as gdb_mod

FAKE = Path(__file__).with_name("fake_gdb.py")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    def make(mode: str) -> gdb_mod.Gdb:
        monkeypatch.setenv("FAKE_GDB_MODE", mode)
        monkeypatch.setattr(gdb_mod, "GDB_BINARY", sys.executable)
        orig = gdb_mod.subprocess.Popen

        def popen(argv, **kw):  # type: ignore[no-untyped-def]
            return orig([sys.executable, str(FAKE)], **kw)

        monkeypatch.setattr(gdb_mod.subprocess, "Popen", popen)
        return gdb_mod.Gdb(Path("/nonexistent.elf"))

    made: list[gdb_mod.Gdb] = []

    def factory(mode: str) -> gdb_mod.Gdb:
        g = make(mode)
        made.append(g)
        return g

    yield factory
    for g in made:
        pid = g.pid
        g.close()
        if pid:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


@pytest.mark.parametrize("mode", ["ok", "noisy"])
def test_replies_matched_by_token_and_stops_awaited(fake, mode: str) -> None:
    g = fake(mode)
    assert g.break_insert("*0x1000") == 1
    g.jump(0x1001)
    stop = g.wait_stop(5)
    assert stop.pc == 0x1000 and stop.reason == "breakpoint-hit"
    assert g.read_memory(0x10, 4) == bytes([0x10, 0x11, 0x12, 0x13])
    assert g.register("cr3") == 4096
    assert "console says hi" in g.console("info registers")


def test_error_reply_is_an_infra_error(fake) -> None:
    g = fake("ok")
    with pytest.raises(InfraError, match="Undefined MI command"):
        g.command("-bogus")


def test_a_stop_that_never_comes_hits_its_deadline(fake) -> None:
    g = fake("hang")
    g.resume()
    with pytest.raises(InfraError, match="did not stop within"):
        g.wait_stop(0.3)


def test_a_dying_gdb_is_an_infra_error(fake) -> None:
    g = fake("die")
    with pytest.raises(InfraError, match="gdb (exited|is gone)"):
        g.resume()
        g.wait_stop(2)


def test_a_stop_queued_before_a_command_is_kept_but_never_loops(fake) -> None:
    g = fake("ok")
    g.command("-target-select remote /nowhere")  # queues the initial *stopped
    assert "console says hi" in g.console("maintenance packet Qqemu.PhyMemMode:1")
    g.resume()  # the stale initial stop is dropped: we wait for the real one
    assert g.wait_stop(5).pc == 0x1000
