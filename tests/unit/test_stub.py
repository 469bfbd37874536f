"""The remote-protocol client below the wire: packet framing on split reads, and the client's
state machine against a fake stub on a unix socket (no QEMU)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hil.errors import InfraError, timeout_scale
from hil.target.stub import (
    G_LAYOUT,
    FramingError,
    Stub,
    StubError,
    StubStateError,
    checksum,
    encode_packet,
    split_packets,
)


def test_encode_escapes_and_checksums() -> None:
    assert encode_packet(b"g") == b"$g#67"
    pkt = encode_packet(b"a$b#c}d*")
    body = pkt[1:-3]
    assert b"$" not in body and b"#" not in body
    assert split_packets(pkt) == ([b"a$b#c}d*"], b"")
    assert int(pkt[-2:], 16) == checksum(body)


STREAM = b"+" + encode_packet(b"OK") + b"+" + encode_packet(b"T05thread:01;") + encode_packet(b"00ff" * 100)


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_framing_survives_a_read_split_anywhere(cut: int) -> None:
    first, rest = split_packets(STREAM[:cut])
    second, rest = split_packets(rest + STREAM[cut:])
    assert first + second == [b"OK", b"T05thread:01;", b"00ff" * 100]
    assert rest == b""


def test_framing_byte_by_byte_and_run_length() -> None:
    got: list[bytes] = []
    rest = b""
    # `0* ` = '0' repeated 1 + (ord(' ') - 29) = 4 times
    stream = b"$0* #" + b"%02x" % checksum(b"0* ") + encode_packet(b"x")
    for b in stream:
        pkts, rest = split_packets(rest + bytes((b,)))
        got += pkts
    assert got == [b"0000", b"x"] and rest == b""


def test_bad_checksum_is_a_framing_error() -> None:
    with pytest.raises(FramingError, match="checksum"):
        split_packets(b"$OK#00")


# --- a fake stub ------------------------------------------------------------------------
Handler = Callable[[bytes], list[bytes]]


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[Handler], Path]]:
    """Serve one client on a unix socket; `handler(packet) -> packets to answer`."""
    threads: list[threading.Thread] = []
    servers: list[socket.socket] = []

    def start(handler: Handler) -> Path:
        path = tmp_path / f"stub{len(servers)}.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        srv.listen(1)
        servers.append(srv)

        def serve() -> None:
            conn, _ = srv.accept()
            rest = b""
            with conn, contextlib.suppress(OSError):
                while True:
                    data = conn.recv(4096)
                    if not data:
                        return
                    if b"\x03" in data:
                        conn.sendall(encode_packet(b"T02thread:01;"))
                    pkts, rest = split_packets(rest + data.replace(b"\x03", b""))
                    for pkt in pkts:
                        out = b"+"
                        for reply in handler(pkt):
                            out += encode_packet(reply)
                        # answers in small pieces: the client must reassemble them
                        for i in range(0, len(out), 7):
                            conn.sendall(out[i : i + 7])

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        threads.append(t)
        return path

    yield start
    for srv in servers:
        srv.close()
    for t in threads:
        t.join(timeout=5 * timeout_scale())


def qemu_like(memory: bytearray) -> Handler:
    regs = bytearray(608)
    regs[G_LAYOUT["cr3"][0] : G_LAYOUT["cr3"][0] + 8] = (0x247000).to_bytes(8, "little")

    def handle(pkt: bytes) -> list[bytes]:
        if pkt == b"?":
            return [b"T05thread:01;"]
        if pkt[:1] == b"m":
            addr, size = (int(x, 16) for x in pkt[1:].split(b","))
            if size > 2048:
                return [b"E22"]
            return [memory[addr : addr + size].hex().encode()]
        if pkt[:1] == b"M":
            head, data = pkt[1:].split(b":")
            addr, size = (int(x, 16) for x in head.split(b","))
            memory[addr : addr + size] = bytes.fromhex(data.decode())
            return [b"OK"]
        if pkt[:1] == b"c":
            return [b"T05thread:01;"]
        if pkt == b"g":
            return [regs.hex().encode()]
        if pkt[:1] in (b"Z", b"z", b"Q"):
            return [b"OK"]
        return [b""]

    return handle


def test_client_round_trips_against_a_fake_stub(fake: Callable[[Handler], Path]) -> None:
    memory = bytearray(range(256)) * 64
    stub = Stub()
    stub.connect(fake(qemu_like(memory)), timeout_s=5)
    try:
        stub.insert_breakpoint(0x1000, hardware=True)
        stub.set_physical_mode(True)
        assert stub.read_memory(0x10, 5000) == bytes(memory[0x10 : 0x10 + 5000])  # three `m` packets
        stub.write_memory(0x100, b"\x24\x23\x7d" * 1000)  # escaped bytes, two `M` packets
        assert memory[0x100 : 0x100 + 3000] == b"\x24\x23\x7d" * 1000
        assert stub.register("cr3") == 0x247000
        stub.jump(0x1001)
        assert stub.wait_stop(5).reason == "breakpoint-hit"
    finally:
        stub.close()
    assert not stub.alive()


def test_calls_in_the_wrong_state_are_refused_and_send_nothing(fake: Callable[[Handler], Path]) -> None:
    seen: list[bytes] = []

    def handler(pkt: bytes) -> list[bytes]:
        seen.append(pkt)
        if pkt[:1] == b"Q":
            return [b"OK"]
        return [b"T05thread:01;"] if pkt == b"?" else []  # `c`: the guest runs, no stop yet

    stub = Stub()
    with pytest.raises(StubStateError):
        stub.read_memory(0, 8)  # not connected
    stub.connect(fake(handler), timeout_s=5)
    try:
        with pytest.raises(StubStateError):
            stub.wait_stop(0.1)  # nothing is running
        stub.resume()
        for call in (lambda: stub.read_memory(0, 8), lambda: stub.register("rip"), lambda: stub.jump(0),
                     lambda: stub.insert_breakpoint(0)):  # fmt: skip
            with pytest.raises(StubStateError):
                call()
        with pytest.raises(InfraError, match="did not stop"):
            stub.wait_stop(0.2)
        assert seen == [b"?", b"c"]  # the refused calls sent nothing
        stub.interrupt()
        assert stub.wait_stop(5).reason == "signal-2"
        stub.set_physical_mode(False)  # stopped again: allowed
        assert seen[-1] == b"Qqemu.PhyMemMode:0"
    finally:
        stub.close()


def test_error_replies_and_a_closed_connection_are_infra_errors(fake: Callable[[Handler], Path]) -> None:
    def handler(pkt: bytes) -> list[bytes]:
        if pkt == b"?":
            return [b"T05thread:01;"]
        if pkt[:1] == b"m":
            return [b"E14"]
        if pkt[:1] == b"c":
            return [b"W00"]  # QEMU went away
        return [b""]

    stub = Stub()
    stub.connect(fake(handler), timeout_s=5)
    try:
        with pytest.raises(StubError, match="E14"):
            stub.read_memory(0, 8)
        stub.resume()
        assert stub.wait_stop(5).reason == "exited"
        assert not stub.alive()
        with pytest.raises(StubStateError):
            stub.read_memory(0, 8)
    finally:
        stub.close()


def test_disconnect_leaves_the_guest_stopped_for_another_debugger(fake: Callable[[Handler], Path]) -> None:
    """Our breakpoints removed, physical mode off, no `D` (a detach would resume the guest)."""
    seen: list[bytes] = []
    memory = bytearray(4096)
    handle = qemu_like(memory)

    def handler(pkt: bytes) -> list[bytes]:
        seen.append(pkt)
        return handle(pkt)

    stub = Stub()
    stub.connect(fake(handler), timeout_s=5)
    stub.insert_breakpoint(0x1000)
    stub.insert_breakpoint(0x2000, hardware=True)
    stub.set_physical_mode(True)
    stub.disconnect()
    assert not stub.alive()
    deadline = time.monotonic() + 5 * timeout_scale()
    while len(seen) < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen[4:] == [b"z0,1000,1", b"z1,2000,1", b"Qqemu.PhyMemMode:0"]
    assert b"D" not in seen


def test_a_watchpoint_stop_names_its_address(fake: Callable[[Handler], Path]) -> None:
    """`Z2` in, `watch:ADDR` out (the drive under TCG, guest/hil/op_done.S); a plain SIGTRAP stays
    a breakpoint hit, and a malformed address is a stub error, not a guess."""
    replies = [b"T05thread:01;watch:ffffffff8010c000;", b"T05thread:01;", b"T05thread:01;watch:zz;"]
    seen: list[bytes] = []

    def handler(pkt: bytes) -> list[bytes]:
        seen.append(pkt)
        if pkt == b"?":
            return [b"T05thread:01;"]
        if pkt[:1] in (b"Z", b"z", b"Q"):
            return [b"OK"]
        if pkt == b"c":
            return [replies.pop(0)]
        return [b""]

    stub = Stub()
    stub.connect(fake(handler), timeout_s=5)
    try:
        stub.insert_watchpoint(0xFFFFFFFF8010C000, 8)
        assert seen[-1] == b"Z2,ffffffff8010c000,8"
        stub.resume()
        stop = stub.wait_stop(5)
        assert (stop.reason, stop.raw["watch"]) == ("watchpoint-hit", 0xFFFFFFFF8010C000)
        stub.resume()
        stop = stub.wait_stop(5)
        assert stop.reason == "breakpoint-hit" and "watch" not in stop.raw
        stub.resume()
        with pytest.raises(StubError, match="bad watchpoint address"):
            stub.wait_stop(5)
    finally:
        stub.close()


def test_disconnect_removes_our_watchpoint_too(fake: Callable[[Handler], Path]) -> None:
    seen: list[bytes] = []
    handle = qemu_like(bytearray(4096))

    def handler(pkt: bytes) -> list[bytes]:
        seen.append(pkt)
        return handle(pkt)

    stub = Stub()
    stub.connect(fake(handler), timeout_s=5)
    stub.insert_watchpoint(0x3000, 8)
    stub.disconnect()
    deadline = time.monotonic() + 5 * timeout_scale()
    while b"z2,3000,8" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b"z2,3000,8" in seen and b"D" not in seen
