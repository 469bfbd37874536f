"""The gdb script of `hil debug` loaded into the real gdb, with no guest: the commands register
with their parsers' help, and every user error is a gdb error that leaves gdb running (the next
command still runs). The commands on a live guest are tested in tests/hil/test_debug.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hil.errors import timeout_scale
from hil.workflows import debug

COMMANDS = ("hil-pt", "hil-slot", "hil-diff", "hil-step", "hil-ops", "hil-disas", "hil-start")


def _gdb(tmp_path: Path, *cmds: str, context: Path | None = None) -> str:
    env = debug.gdb_env(context or tmp_path / "none.json")
    if context is None:
        del env["HIL_DEBUG_CONTEXT"]
    argv = ["gdb", "-q", "-nx", "-batch", "-ex", f"source {debug.GDB_SCRIPT}"]
    for c in cmds:
        argv += ["-ex", c, "-ex", "echo --\\n"]
    out = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=60 * timeout_scale())  # fmt: skip
    return out.stdout


def test_commands_register_with_their_parser_help(tmp_path: Path) -> None:
    text = _gdb(tmp_path, *(f"help {c}" for c in COMMANDS))
    for c in COMMANDS:
        assert f"usage: {c} [-h]" in text, text
    assert "VS: a VmSpace id, 'kernel' or 'cr3'" in text


def test_user_errors_are_gdb_errors_and_gdb_goes_on(tmp_path: Path) -> None:
    text = _gdb(tmp_path, "hil-pt", "hil-slot zz", "hil-ops --around", "hil-pt -h", "hil-start")
    blocks = text.split("--\n")
    assert "no hil debug session here: start gdb through `hil debug TRACE`" in blocks[0]
    assert "hil-slot: argument paddr: not an integer: 'zz'" in blocks[1]
    assert "hil-ops: argument --around: expected one argument" in blocks[2]
    assert "usage: hil-pt [-h] [vs] [va]" in blocks[3]  # -h prints the help, no error
    assert "HIL_DEBUG_CONTEXT is not set" in blocks[4]
    assert "Traceback" not in text


def test_a_missing_context_file_is_an_error(tmp_path: Path) -> None:
    env_file = tmp_path / "none.json"
    assert not env_file.exists()
    text = _gdb(tmp_path, "hil-start", context=env_file)
    assert f"cannot read the hil debug context {env_file}" in text and "Python Exception" not in text
