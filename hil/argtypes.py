"""argparse types for the `hil` command: every argument is checked before anything starts, and
a bad one is a usage error naming it (argparse prints "argument --ops: ...", exit 2)."""

from __future__ import annotations

import argparse
import os
import signal
import typing
from pathlib import Path

from hil.errors import ConfigError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, EM_X86_64 = 2, 1, 62


def positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..2**64-1, not {text!r}")
    return value


def rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in 0..1, not {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number in 0..1, not {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None


def readable_file(text: str) -> str:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a regular file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable")
    return text


def guest_image(text: str) -> str:
    """A 64-bit x86-64 ELF with the flat boot image (.bin) QEMU boots beside it. Whether it
    speaks our ABI is checked when it is opened (AbiError, naming the missing symbols)."""
    readable_file(text)
    try:
        check_elf(Path(text))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    boot = Path(text).with_suffix(".bin")
    if not boot.is_file():
        raise argparse.ArgumentTypeError(f"{text}: its boot image {boot} is missing (make -C guest builds both)")
    return text


def check_elf(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            ident = fh.read(20)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    if ident[:4] != ELF_MAGIC:
        raise ConfigError(f"{path}: not an ELF file (a guest image is guest/build/kernel.elf)")
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or int.from_bytes(ident[18:20], "little") != EM_X86_64:
        raise ConfigError(f"{path}: not a 64-bit little-endian x86-64 ELF")


def output_file(text: str) -> str:
    """A file we will create or overwrite: not a directory, its directory creatable and writable."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {parent}")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: not writable")
    return text


def profile(text: str) -> str:
    """A profile name (qemu/NAME.toml) or a path; loaded, so unknown keys are refused up front."""
    from hil.target.machine import Profile

    try:
        Profile.load(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def name(text: str) -> str:
    """A plain name used in a file name (e.g. a regression test)."""
    if not text or not text.replace("_", "").isalnum() or text[0].isdigit():
        raise argparse.ArgumentTypeError(f"must be a Python identifier (letters, digits, _), not {text!r}")
    return text


class Parser(argparse.ArgumentParser):
    """A usage error is one line naming the argument (not the whole usage block), exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


held: list[int] = []  # SIGINT / SIGTERM that came while `hil` was still loading


def hold_signals(is_cli: bool) -> None:
    """Remember a Ctrl-C or SIGTERM that comes while `hil` loads (seconds on a busy machine):
    Python's default would print a traceback (SIGINT) or die silently (SIGTERM). main() exits
    130 when one was held, before it starts anything."""
    if not is_cli:
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: held.append(signum))
