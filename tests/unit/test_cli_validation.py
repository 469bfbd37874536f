"""Every `hil` argument is checked before anything starts: a bad one is a one-line usage error
naming it (exit 2), and nothing is created or started (no trace file, no QEMU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hil import cli
from hil.target.machine import DEFAULT_IMAGE, leftover_files, leftover_processes


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own (a default trace would land in traces/) and a run tag."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HIL_RUN_TAG", f"cv{os.getpid()}")
    return tmp_path


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, not the whole usage block
    return err


ELF_HEADER_X86_64 = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x02\x00\x3e\x00"


@pytest.mark.parametrize(
    "argv, names",
    [
        (["run", "--ops", "-5"], ["--ops", "-5", "positive"]),
        (["run", "--ops", "0"], ["--ops", "positive"]),
        (["run", "--ops", "many"], ["--ops", "integer"]),
        (["run", "--seed", "-1"], ["--seed"]),
        (["run", "--seed", "1.5"], ["--seed", "integer"]),
        (["run", "--error-rate", "2"], ["--error-rate", "0..1"]),
        (["run", "--error-rate", "nan"], ["--error-rate"]),
        (["run", "--profile", "nope"], ["--profile", "no machine profile 'nope'"]),
        (["run", "--image", "/nonexistent/kernel.elf"], ["--image", "no such file"]),
        (["run", "--image", "/etc"], ["--image", "not a regular file"]),
        (["run", "--trace", "/"], ["--trace", "is a directory"]),
        (["run", "--resume", "/nonexistent.jsonl"], ["--resume", "no such file"]),
        (["replay", "/nonexistent.jsonl"], ["trace", "no such file"]),
        (["shrink", "/nonexistent.jsonl"], ["trace", "no such file"]),
        (["bogus"], ["invalid choice"]),
    ],
)
def test_bad_arguments_are_one_line_usage_errors_naming_them(
    isolated: Path, capsys: pytest.CaptureFixture[str], argv: list[str], names: list[str]
) -> None:
    err = usage_error(capsys, argv)
    for n in names:
        assert n in err, err
    assert list(isolated.iterdir()) == []  # no trace written, no traces/ directory made


def test_an_image_that_is_not_an_elf_is_refused_up_front(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = isolated / "kernel.elf"
    text.write_text("not an ELF at all\n")
    err = usage_error(capsys, ["run", "--image", str(text), "--ops", "1"])
    assert "--image" in err and "not an ELF file" in err
    arm = isolated / "arm.elf"
    arm.write_bytes(b"\x7fELF\x01\x01\x01" + b"\0" * 9 + b"\x02\x00\x28\x00")
    assert "not a 64-bit little-endian x86-64 ELF" in usage_error(capsys, ["run", "--image", str(arm)])
    no_bin = isolated / "nobin.elf"
    no_bin.write_bytes(ELF_HEADER_X86_64)
    assert "boot image" in usage_error(capsys, ["run", "--image", str(no_bin)])
    assert sorted(p.name for p in isolated.iterdir()) == ["arm.elf", "kernel.elf", "nobin.elf"]


def test_a_profile_with_unknown_keys_is_refused_naming_them(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prof = isolated / "mine.toml"
    prof.write_text('memory_mib = 64\nmemroy_mib = 128\n')
    err = usage_error(capsys, ["run", "--profile", str(prof)])
    assert "--profile" in err and "unknown keys ['memroy_mib']" in err
    prof.write_text("memory_mib = [\n")
    assert "--profile" in usage_error(capsys, ["run", "--profile", str(prof)])
    prof.write_text("memory_mib = 5\n")
    assert "memory_mib must be an integer" in usage_error(capsys, ["run", "--profile", str(prof)])


def test_the_default_image_passes_the_image_check() -> None:
    from hil import argtypes

    if not DEFAULT_IMAGE.is_file():
        pytest.skip("guest not built")
    assert argtypes.guest_image(str(DEFAULT_IMAGE)) == str(DEFAULT_IMAGE)


def test_nothing_was_started(isolated: Path) -> None:
    tag = os.environ["HIL_RUN_TAG"]
    assert leftover_processes(tag) == [] and leftover_files(tag) == []


def test_other_commands_refuse_bad_input_in_one_line(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """hil ci (a config with unknown keys), hil nightly (counts), hil debug (a missing trace)."""
    cfg = isolated / "ci.toml"
    cfg.write_text('profiles = ["default"]\nseedz = [1]\n[images.default]\npath = "kernel.elf"\n')
    cases = [
        (["ci", "--config", str(cfg)], "unknown keys ['seedz']"),
        (["nightly", "--out", str(isolated / "n"), "--workers", "-1"], "--workers"),
        (["nightly", "--out", str(isolated / "n"), "--budget", "0s"], "--budget"),
        (["debug", str(isolated / "missing.jsonl")], "missing.jsonl"),
    ]
    for argv, needle in cases:
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code  # type: ignore[assignment]
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (argv, code, err)
    assert sorted(p.name for p in isolated.iterdir()) == ["ci.toml"]
