"""A small client of QEMU's gdb stub speaking the remote serial protocol: the hot path.

One checked op is one exchange: `c` and the stop reply (a write watchpoint on the guest's
hil_doorbell under TCG: guest/hil/op_done.S says why not a breakpoint), against 5 packets
(~1.0-1.4 ms) through gdb/MI (NOTES "gdb and QEMU's gdb stub"). Interactive debugging keeps
using real gdb (`hil.target.gdb`); both implement `Target`, the part of a debugger the Session
calls, so they are interchangeable.

Wire facts of QEMU 7.2 this relies on: no no-ack mode, but in system emulation the stub does
not wait for our `+` (it ignores it in its idle state), so we send acks lazily in front of the
next packet; `m` / `M` carry at most MAX_PACKET_LENGTH/2 = 2 KiB; register numbers are the
64-bit layout (rip 16, cr3 29); a stop is `T05thread:...;` (no PC: a SIGTRAP stop after a
resume at our only breakpoint is that breakpoint; `stop_pc()` reads it when a caller wants to
be sure), `T05thread:...;watch:ADDR;` at a write watchpoint (after the write). The stub runs
one CPU.

States: STOPPED (memory, registers, resume allowed), RUNNING (only `wait_stop`,
`interrupt`), CLOSED (nothing). A call in the wrong state raises `StubStateError` and
sends nothing.
"""

from __future__ import annotations

import enum
import select
import socket
import time
from pathlib import Path
from typing import Any, Protocol

from hil.errors import HilError, InfraError, InfraTimeout, timeout_scale
from hil.target.gdb import Stop  # one stop type for both Targets (pc 0: the reply did not say)

# QEMU 7.2 gdbstub: MAX_PACKET_LENGTH 4096; `m` refuses more than half of it (hex doubles)
READ_CHUNK = 2048
WRITE_CHUNK = 2000  # `M addr,len:` + 2*len hex must fit the stub's 4 KiB input buffer

# Where each register sits in QEMU 7.2's x86-64 `g` reply (gdb-xml/i386-64bit.xml order:
# 16 GPRs, rip, eflags and 6 segment selectors (4 bytes each), fs/gs/kernel-gs base, cr0, cr2,
# cr3, cr4, cr8, efer). We read registers with `g`: QEMU answers `p` only after the client
# has read the target XML, and under KVM `p` can be stale (NOTES "KVM here").
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
G_LAYOUT: dict[str, tuple[int, int]] = {name: (8 * i, 8) for i, name in enumerate(_GPRS)}
G_LAYOUT.update({"rip": (128, 8), "eflags": (136, 4)})
G_LAYOUT.update({seg: (140 + 4 * i, 4) for i, seg in enumerate(("cs", "ss", "ds", "es", "fs", "gs"))})
G_LAYOUT.update({name: (164 + 8 * i, 8) for i, name in enumerate(
    ("fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")
)})  # fmt: skip
SIGTRAP = 5


class Target(Protocol):
    """What a Session needs from a debugger attached to QEMU's stub (gdb/MI or this client)."""

    def insert_breakpoint(self, address: int, *, hardware: bool = False) -> None: ...

    def resume(self) -> None: ...

    def jump(self, address: int) -> None: ...

    def wait_stop(self, timeout_s: float) -> Stop: ...

    def read_memory(self, address: int, size: int) -> bytes: ...

    def write_memory(self, address: int, data: bytes) -> None: ...

    def set_physical_mode(self, on: bool) -> None: ...

    def register(self, name: str) -> int: ...

    def alive(self) -> bool: ...

    def disconnect(self) -> None: ...

    def close(self) -> None: ...


class StubError(InfraError):
    """The stub answered an error (`Exx`) or something we cannot parse."""


class StubStateError(HilError):
    """A call the client's state does not allow (e.g. reading memory while the guest runs)."""


class State(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    CLOSED = "closed"


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def encode_packet(payload: bytes) -> bytes:
    """`$payload#cs`, escaping the protocol's special characters (RSP §E.1)."""
    out = bytearray()
    for b in payload:
        if b in b"$#}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return b"$" + bytes(out) + b"#%02x" % checksum(bytes(out))


def _unescape(body: bytes) -> bytes:
    if b"}" not in body and b"*" not in body:
        return body
    out = bytearray()
    i = 0
    while i < len(body):
        b = body[i]
        if b == 0x7D and i + 1 < len(body):
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A and out and i + 1 < len(body):  # run-length: repeat the last byte
            out += bytes((out[-1],)) * (body[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


class FramingError(HilError):
    """A packet whose checksum does not match (the wire is not what we think it is)."""


def split_packets(buf: bytes) -> tuple[list[bytes], bytes]:
    """Split what arrived so far into complete packet payloads and the unconsumed rest.

    Acks (`+`), nacks (`-`) and noise between packets are dropped; a packet cut anywhere
    (even between `#` and its two checksum digits) stays in the rest for the next read. A bad
    checksum raises FramingError: on a local socket it means a desync, never line noise."""
    packets: list[bytes] = []
    i = 0
    n = len(buf)
    while i < n:
        start = buf.find(b"$", i)
        if start < 0:
            return packets, b""
        hash_at = buf.find(b"#", start + 1)
        if hash_at < 0 or hash_at + 3 > n:
            return packets, buf[start:]
        body = buf[start + 1 : hash_at]
        try:
            want = int(buf[hash_at + 1 : hash_at + 3], 16)
        except ValueError:
            raise FramingError(f"bad checksum digits {buf[hash_at + 1 : hash_at + 3]!r}") from None
        if checksum(body) != want:
            raise FramingError(f"checksum {checksum(body):02x} != {want:02x} for packet {body[:60]!r}")
        packets.append(_unescape(body))
        i = hash_at + 3
    return packets, b""


class Stub:
    """One connection to QEMU's gdb stub (unix socket). Not thread-safe."""

    def __init__(self, *, on_infra: Any = None):
        self._on_infra = on_infra or (lambda what: InfraError(what))
        self._sock: socket.socket | None = None
        self._rest = b""
        self._queue: list[bytes] = []
        self._ack = b""  # owed `+`, sent in front of our next packet
        self.state = State.CLOSED
        self.exchanges = 0  # packets sent (bench / tests)
        self._phys: bool | None = None
        self._breakpoints: set[tuple[int, bool]] = set()
        self._watchpoints: set[tuple[int, int]] = set()

    # --- plumbing -----------------------------------------------------------------------
    def infra(self, what: str) -> InfraError:
        err: InfraError = self._on_infra(what)
        return err

    def _need(self, *states: State) -> None:
        if self.state not in states:
            want = " or ".join(s.value for s in states)
            raise StubStateError(f"stub client is {self.state.value}; this call needs it {want}")

    def connect(self, path: Path, timeout_s: float = 10.0) -> Stop:
        """Connect (retrying until the socket accepts) and ask why the CPU is stopped."""
        if self.state is not State.CLOSED:
            raise StubStateError("stub client is already connected")
        deadline = time.monotonic() + timeout_s * timeout_scale()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise self.infra(f"cannot connect to the gdb stub at {path}: {exc}") from None
                time.sleep(0.002)
        # blocking sends with a deadline; receives wait in select() first
        sock.settimeout(10.0 * timeout_scale())
        self._sock = sock
        self.state = State.STOPPED
        reply = self._exchange(b"?", deadline)
        return self._parse_stop(reply)

    def _send(self, payload: bytes) -> None:
        assert self._sock is not None
        data = self._ack + encode_packet(payload)
        self._ack = b""
        self.exchanges += 1
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self.state = State.CLOSED
            raise self.infra(f"gdb stub connection lost (sending {payload[:20]!r}): {exc}") from None

    def _recv_packet(self, deadline: float) -> bytes:
        """The next packet from the stub, waiting at most until `deadline` (monotonic)."""
        assert self._sock is not None
        while not self._queue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InfraTimeout("the gdb stub did not answer before its deadline")
            ready, _, _ = select.select([self._sock], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = self._sock.recv(1 << 16)
            except OSError as exc:
                self.state = State.CLOSED
                raise self.infra(f"gdb stub connection lost: {exc}") from None
            if not chunk:
                self.state = State.CLOSED
                raise self.infra("QEMU closed the gdb stub connection (did QEMU exit?)")
            try:
                packets, self._rest = split_packets(self._rest + chunk)
            except FramingError as exc:  # garbage on the connection: infrastructure, retried
                self.state = State.CLOSED
                raise self.infra(f"garbage on the gdb stub connection: {exc}") from None
            self._queue += packets
        self._ack = b"+"
        return self._queue.pop(0)

    def _exchange(self, payload: bytes, deadline: float | None = None) -> bytes:
        self._need(State.STOPPED)
        if deadline is None:
            deadline = time.monotonic() + 10.0 * timeout_scale()
        self._send(payload)
        try:
            reply = self._recv_packet(deadline)
        except InfraTimeout:
            raise self.infra(f"the gdb stub did not answer {payload[:20]!r} in time") from None
        if len(reply) == 3 and reply[:1] == b"E" and reply[1:].isalnum():
            raise StubError(f"gdb stub refused {payload[:40]!r}: {reply.decode()}")
        return reply

    def _ok(self, payload: bytes) -> None:
        reply = self._exchange(payload)
        if reply != b"OK":
            raise StubError(f"gdb stub answered {reply[:40]!r} to {payload[:40]!r}, not OK")

    @staticmethod
    def _parse_stop(reply: bytes) -> Stop:
        if reply[:1] in (b"T", b"S") and len(reply) >= 3:
            sig = int(reply[1:3], 16)
            raw: dict[str, Any] = {"reply": reply.decode("ascii", "replace")}
            reason = "breakpoint-hit" if sig == SIGTRAP else f"signal-{sig}"
            for field in reply[3:].split(b";"):
                key, _, value = field.partition(b":")
                if sig == SIGTRAP and key in (b"watch", b"rwatch", b"awatch"):
                    try:
                        raw["watch"] = int(value, 16)
                    except ValueError:
                        raise StubError(f"bad watchpoint address in stop reply {reply[:60]!r}") from None
                    reason = "watchpoint-hit"
            return Stop(reason, 0, raw)
        if reply[:1] in (b"W", b"X"):
            return Stop("exited", 0, {"reply": reply.decode("ascii", "replace")})
        raise StubError(f"not a stop reply: {reply[:60]!r}")

    # --- Target -------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.state is not State.CLOSED

    def insert_breakpoint(self, address: int, *, hardware: bool = False) -> None:
        """`Z0` (software, TCG checks it at translation) or `Z1` (hardware: what KVM accepts
        before the kernel's VA is mapped, NOTES "Measured later")."""
        self._ok(b"Z%d,%x,1" % (1 if hardware else 0, address))
        self._breakpoints.add((address, hardware))

    def remove_breakpoint(self, address: int, *, hardware: bool = False) -> None:
        self._ok(b"z%d,%x,1" % (1 if hardware else 0, address))
        self._breakpoints.discard((address, hardware))

    def insert_watchpoint(self, address: int, size: int) -> None:
        """`Z2`: stop after a write to [address, address + size) (a virtual address). QEMU
        reports it as `watch:ADDR` and, unlike a breakpoint stop, keeps its translated code."""
        self._ok(b"Z2,%x,%x" % (address, size))
        self._watchpoints.add((address, size))

    def remove_watchpoint(self, address: int, size: int) -> None:
        self._ok(b"z2,%x,%x" % (address, size))
        self._watchpoints.discard((address, size))

    def disconnect(self) -> None:
        """Leave the stub to another debugger with the guest stopped where it is: remove our
        breakpoints, back to virtual addressing, drop the connection (a `D` would resume)."""
        for address, hardware in sorted(self._breakpoints):
            self.remove_breakpoint(address, hardware=hardware)
        for address, size in sorted(self._watchpoints):
            self.remove_watchpoint(address, size)
        if self._phys:
            self.set_physical_mode(False)
        self.close()

    def resume(self) -> None:
        self._need(State.STOPPED)
        self._send(b"c")
        self.state = State.RUNNING

    def jump(self, address: int) -> None:
        """Resume at `address` (`c<addr>`): steps past hil_op_done's 1-byte nop in one packet
        (a plain `c` at a breakpoint PC re-hits it under TCG)."""
        self._need(State.STOPPED)
        self._send(b"c%x" % address)
        self.state = State.RUNNING

    def wait_stop(self, timeout_s: float) -> Stop:
        self._need(State.RUNNING)
        deadline = time.monotonic() + timeout_s * timeout_scale()
        while True:
            try:
                reply = self._recv_packet(deadline)
            except InfraTimeout:
                raise self.infra(f"the guest did not stop within {timeout_s * timeout_scale():.1f} s") from None
            if reply[:1] != b"O":  # `O...`: console output, not a stop
                break
        stop = self._parse_stop(reply)
        self.state = State.CLOSED if stop.reason == "exited" else State.STOPPED
        return stop

    def interrupt(self) -> None:
        """Ask a running guest to stop (^C); the stop arrives through wait_stop."""
        self._need(State.RUNNING)
        assert self._sock is not None
        self._sock.send(b"\x03")

    def stop_pc(self) -> int:
        return self.register("rip")

    def read_memory(self, address: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            n = min(READ_CHUNK, size - len(out))
            reply = self._exchange(b"m%x,%x" % (address + len(out), n))
            try:
                data = bytes.fromhex(reply.decode("ascii"))
            except ValueError:
                raise StubError(f"bad `m` reply at {address + len(out):#x}: {reply[:40]!r}") from None
            if len(data) != n:
                raise StubError(f"gdb stub returned {len(data)} of {n} bytes at {address + len(out):#x}")
            out += data
        return bytes(out)

    def write_memory(self, address: int, data: bytes) -> None:
        for off in range(0, len(data), WRITE_CHUNK):
            part = data[off : off + WRITE_CHUNK]
            self._ok(b"M%x,%x:" % (address + off, len(part)) + part.hex().encode())

    def set_physical_mode(self, on: bool) -> None:
        """QEMU's extension: every memory access uses physical addresses."""
        if self._phys is on:
            return
        self._ok(b"Qqemu.PhyMemMode:%d" % (1 if on else 0))
        self._phys = on

    def register(self, name: str) -> int:
        where = G_LAYOUT.get(name)
        if where is None:
            raise ValueError(f"unknown register {name!r} (known: {', '.join(sorted(G_LAYOUT))})")
        raw = self.read_registers()
        off, size = where
        if len(raw) < off + size:
            raise StubError(f"`g` reply of {len(raw)} bytes has no {name}")
        return int.from_bytes(raw[off : off + size], "little")

    def read_registers(self) -> bytes:
        """Every register in `g` order (QEMU's 64-bit layout), raw."""
        reply = self._exchange(b"g")
        try:
            return bytes.fromhex(reply.decode("ascii"))
        except ValueError:
            raise StubError(f"bad `g` reply: {reply[:40]!r}") from None

    def write_registers(self, raw: bytes) -> None:
        """`G`: every register at once (control registers included: a CR3 write flushes
        QEMU's TLB)."""
        self._ok(b"G" + raw.hex().encode())

    def close(self) -> None:
        """Close the socket (no `D`: a detach resumes the guest). Safe to call twice."""
        sock, self._sock = self._sock, None
        self.state = State.CLOSED
        if sock is not None:
            sock.close()
