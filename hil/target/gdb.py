"""A gdb/MI session over QEMU's gdb stub.

We own the gdb process and its pipes and match replies by MI token; pygdbmi is used only for
its table-driven record parser. (pygdbmi's `GdbController.write()` waits 0.2 s after every
command for its output window, NOTES "gdb and QEMU's gdb stub".) Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pygdbmi import gdbmiparser

from hil.errors import InfraError, InfraTimeout, timeout_scale
from hil.target.proc import die_with_parent, end_process, signals_held

GDB_BINARY = "gdb"


@dataclass(frozen=True)
class Stop:
    """A `*stopped` record: why and where."""

    reason: str
    pc: int
    raw: dict[str, Any]


class Gdb:
    def __init__(self, elf: Path, *, on_infra: Any = None):
        self.elf = elf
        self._token = 100
        self._buf = b""
        self._pending: list[dict[str, Any]] = []
        # callable(what, kind) -> InfraError, so failures carry the QEMU command line and logs
        self._on_infra = on_infra or (lambda what, kind=InfraError: kind(what))
        try:
            with signals_held():
                self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                    [GDB_BINARY, "--nx", "--quiet", "--interpreter=mi3"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=die_with_parent,
                )  # fmt: skip
        except OSError as exc:
            raise InfraError(f"cannot start {GDB_BINARY}: {exc} (scripts/setup installs it)") from exc
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def infra(self, what: str, kind: type[InfraError] = InfraError) -> InfraError:
        err: InfraError = self._on_infra(what, kind) if kind is not InfraError else self._on_infra(what)
        return err

    # --- low-level I/O ---------------------------------------------------------------
    def _records(self, deadline: float) -> dict[str, Any]:
        """Next parsed MI record, waiting at most until `deadline` (monotonic)."""
        if self._pending:
            return self._pending.pop(0)
        assert self.proc is not None and self.proc.stdout is not None
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.infra("gdb did not answer before its deadline", InfraTimeout)
            if not self._sel.select(timeout=remaining):
                continue
            chunk = self.proc.stdout.read(1 << 20)
            if chunk == b"":
                raise self.infra(f"gdb exited (status {self.proc.poll()})")
            if chunk:
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        text = line.decode("utf-8", "replace").rstrip("\r")
        if not text or text == "(gdb) ":
            return {"type": "prompt"}
        try:
            rec: dict[str, Any] = gdbmiparser.parse_response(text)
        except Exception as exc:  # the parser's own errors on a garbled line (garbage on the pipe)
            raise self.infra(f"gdb sent a line that is not gdb/MI: {text[:200]!r} ({exc})") from exc
        return rec

    def _send(self, cmd: str) -> int:
        """Write one MI command with a fresh token (one broken-pipe guard for every command)."""
        if self.proc is None or self.proc.stdin is None:
            raise self.infra(f"gdb is closed (sending {cmd!r})")
        self._token += 1
        try:
            self.proc.stdin.write(f"{self._token}{cmd}\n".encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise self.infra(f"gdb is gone (status {self.proc.poll()}, writing {cmd!r})") from exc
        return self._token

    def command(self, cmd: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Send one MI command; return its result record (`^done`/`^running`/`^connected`).
        `^error` raises InfraError with gdb's message."""
        token = self._send(cmd)
        deadline = time.monotonic() + timeout_s * timeout_scale()
        early: list[dict[str, Any]] = []
        while True:
            rec = self._records(deadline)
            if rec.get("type") == "result" and rec.get("token") == token:
                self._pending = early + self._pending
                if rec.get("message") == "error":
                    msg = (rec.get("payload") or {}).get("msg", "")
                    raise self.infra(f"gdb command {cmd!r} failed: {msg}")
                return rec
            if rec.get("type") == "notify" and rec.get("message") == "stopped":
                early.append(rec)  # keep async stops for wait_stop

    def console(self, cli: str, timeout_s: float = 10.0) -> str:
        """Run a CLI command through MI and return what it printed to the console."""
        escaped = cli.replace("\\", "\\\\").replace('"', '\\"')
        token = self._send(f'-interpreter-exec console "{escaped}"')
        deadline = time.monotonic() + timeout_s * timeout_scale()
        out: list[str] = []
        early: list[dict[str, Any]] = []
        while True:
            rec = self._records(deadline)
            if rec.get("type") in ("console", "target") and isinstance(rec.get("payload"), str):
                out.append(rec["payload"])
            elif rec.get("type") == "result" and rec.get("token") == token:
                self._pending = early + self._pending
                if rec.get("message") == "error":
                    raise self.infra(f"gdb command {cli!r} failed: {(rec.get('payload') or {}).get('msg')}")
                return "".join(out)
            elif rec.get("type") == "notify" and rec.get("message") == "stopped":
                early.append(rec)  # keep async stops for wait_stop

    def wait_stop(self, timeout_s: float) -> Stop:
        """Wait for the next `*stopped` record (after a resume)."""
        deadline = time.monotonic() + timeout_s * timeout_scale()
        while True:
            try:
                rec = self._records(deadline)
            except InfraTimeout:
                raise self.infra(
                    f"the guest did not stop within {timeout_s * timeout_scale():.1f} s", InfraTimeout
                ) from None
            if rec.get("type") == "notify" and rec.get("message") == "thread-group-exited":
                # QEMU went away (or closed its stub) while the guest ran: no stop will come
                raise self.infra("the connection to QEMU's gdb stub was lost while the guest ran")
            if rec.get("type") == "notify" and rec.get("message") == "stopped":
                payload = rec.get("payload") or {}
                frame = payload.get("frame") or {}
                pc = int(frame.get("addr", "0"), 16) if frame.get("addr") else 0
                return Stop(str(payload.get("reason", "")), pc, payload)

    # --- the operations the harness needs ---------------------------------------------
    def connect(self, socket_path: Path, timeout_s: float = 10.0, *, symbols: bool = False) -> None:
        """QEMU 7.2 always sends the 64-bit register layout, so gdb must think x86-64 (NOTES).
        The checker needs no symbols (it has the ELF's addresses), and loading them costs
        ~0.3 s per boot; interactive debugging asks for them."""
        if symbols:
            self.command(f'-file-exec-and-symbols "{self.elf}"')
        self.command("-gdb-set architecture i386:x86-64")
        self.command("-gdb-set pagination off")
        self.command("-gdb-set confirm off")
        # breakpoints stay in guest memory while it runs: fewer packets per stop (NOTES)
        self.command("-gdb-set breakpoint always-inserted on")
        self.command(f"-target-select remote {socket_path}", timeout_s)

    def break_insert(self, location: str) -> int:
        rec = self.command(f"-break-insert {location}")
        return int(rec["payload"]["bkpt"]["number"])

    def insert_breakpoint(self, address: int, *, hardware: bool = False) -> None:
        """hil.target.stub.Target: `hardware` = `hbreak` (remote Z1), what KVM accepts at -S."""
        self.break_insert(f"{'-h ' if hardware else ''}*{address:#x}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _drop_stale_stops(self) -> None:
        # e.g. the stop that `target remote` reports for the halted CPU: not ours to wait for
        self._pending = [r for r in self._pending if not (r.get("type") == "notify" and r.get("message") == "stopped")]

    def resume(self) -> None:
        self._drop_stale_stops()
        self.command("-exec-continue")

    def jump(self, address: int) -> None:
        """Resume at `address`: used to step past the 1-byte `nop` of hil_op_done without the
        step-over dance a continue at a breakpoint costs (NOTES)."""
        self._drop_stale_stops()
        self.command(f"-exec-jump *{address:#x}")

    def interrupt(self) -> None:
        self.command("-exec-interrupt")

    def disconnect(self) -> None:
        """Leave the stub to another debugger with the guest stopped where it is: remove our
        breakpoints, then drop the connection. (A detach would resume the guest.)"""
        self.command("-break-delete")
        self.command("-target-disconnect")

    def read_memory(self, address: int, size: int) -> bytes:
        rec = self.command(f"-data-read-memory-bytes {address:#x} {size}", timeout_s=60.0)
        out = bytearray()
        for block in rec["payload"]["memory"]:
            begin = int(block["begin"], 16)
            if begin != address + len(out):
                raise self.infra(f"gdb returned a gap in memory at {begin:#x}")
            out += bytes.fromhex(block["contents"])
        if len(out) != size:
            raise self.infra(f"gdb returned {len(out)} of {size} bytes at {address:#x}")
        return bytes(out)

    def write_memory(self, address: int, data: bytes) -> None:
        self.command(f"-data-write-memory-bytes {address:#x} {data.hex()}")

    def set_physical_mode(self, on: bool) -> None:
        """QEMU's gdb stub extension: every memory access uses physical addresses."""
        self.console(f"maintenance packet Qqemu.PhyMemMode:{1 if on else 0}")

    def register(self, name: str) -> int:
        rec = self.command(f'-data-evaluate-expression "(unsigned long)${name}"')
        value = rec["payload"]["value"]
        # e.g. "0x1000" or "[ PG WP ... ]" for flag registers; cr3 is a plain number
        with contextlib.suppress(ValueError):
            return int(value.split()[0], 0)
        raise self.infra(f"cannot parse register {name}: {value!r}")

    def set_register(self, name: str, value: int) -> None:
        self.command(f"-gdb-set ${name}={value:#x}")

    def close(self, grace_s: float = 2.0) -> None:
        """End gdb by PID and reap it. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stdin = proc.stdin

        def ask() -> None:
            if stdin is not None:
                stdin.write(b"-gdb-exit\n")
                stdin.flush()

        try:
            end_process(proc, grace_s, ask)
        finally:
            with contextlib.suppress(Exception):
                self._sel.close()
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(Exception):
                    if stream:
                        stream.close()
