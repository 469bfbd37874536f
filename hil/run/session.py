"""One booted guest: boot, apply(op) -> Observation, snapshot() -> State, reset().

Drive: the guest stops at the breakpoint on `hil_op_done` after publishing each response;
we write the next request into the mailbox (through the memory reader: the shared RAM file,
or gdb in physical mode), resume past the 1-byte `nop`, and wait for the next stop with a
deadline. Every process we start is ended by PID on every exit path (`close`).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from hil.errors import AbiError, InfraError
from hil.target import abi
from hil.target.elf import GuestElf
from hil.target.gdb import Gdb
from hil.target.machine import DEFAULT_IMAGE, Machine, Profile
from hil.target.memory import GdbPhysMemory, PhysMemory, SharedRamMemory
from model import ops as m
from model.state import State

BOOT_DEADLINE_S = 20.0
OP_DEADLINE_S = 10.0


@dataclass(frozen=True)
class Observation:
    op: m.Op
    seq: int
    result: m.OpResult
    response: abi.Response
    elapsed_s: float
    disassembly: tuple[str, ...] = ()

    def describe_exception(self) -> str:
        r = self.response
        lines = [
            f"CPU exception vector {r.exc_vector} error code {r.exc_error:#x} at RIP {r.exc_rip:#x}"
            f" (CR2 {r.exc_cr2:#x}) during {self.op!r}"
        ]
        lines += list(self.disassembly)
        return "\n".join(lines)


@dataclass
class Session:
    image: Path = DEFAULT_IMAGE
    profile: Profile = field(default_factory=lambda: Profile.load("default"))
    shared_ram: bool = True
    machine: Machine | None = None
    gdb: Gdb | None = None
    memory: PhysMemory | None = None
    layout: abi.Layout | None = None
    seq: int = 0
    boots: int = 0

    def __post_init__(self) -> None:
        self.elf = GuestElf(self.image)
        self._op_done = self.elf.symbol("hil_op_done")
        self._layout_paddr = self.elf.vaddr_to_paddr(self.elf.symbol("hil_layout"))

    # --- life cycle -----------------------------------------------------------------------
    def boot(self) -> None:
        """Start QEMU + gdb and run the guest to its READY stop. On failure everything
        started is ended and an InfraError carries the command line and log tails."""
        self.close()
        machine = Machine(self.profile, self.image, shared_ram=self.shared_ram)
        self.machine = machine
        try:
            # gdb's own start-up (~0.25 s, its embedded Python) overlaps QEMU's
            self.gdb = Gdb(self.image, on_infra=machine.infra)
            machine.start()
            self.gdb.connect(machine.gdb_socket)
            self.gdb.break_insert(f"*{self._op_done:#x}")
            if self.shared_ram:
                self.memory = SharedRamMemory(machine.shm_path, machine.ram_size)
            else:
                self.gdb.set_physical_mode(True)
                self.memory = GdbPhysMemory(self.gdb, machine.ram_size)
            self.gdb.resume()
            self._wait_op_done(BOOT_DEADLINE_S, "boot to the first READY stop")
            self.layout = self._read_layout()
            resp = self.response()
            if resp.status != m.Status.READY:
                raise machine.infra(f"guest stopped at hil_op_done with status {resp.status.name}, not READY")
            self.seq = resp.seq
            self.boots += 1
        except BaseException:
            self.close()
            raise

    def reset(self) -> None:
        """Reboot: after a PANIC / EXCEPTION, or an infrastructure error."""
        self.boot()

    def close(self) -> None:
        gdb, self.gdb = self.gdb, None
        machine, self.machine = self.machine, None
        memory, self.memory = self.memory, None
        try:
            if memory is not None:
                memory.close()
        finally:
            try:
                if gdb is not None:
                    gdb.close()
            finally:
                if machine is not None:
                    machine.stop()

    def release_debugger(self) -> None:
        """Hand QEMU's gdb stub (one client at a time) to another debugger (`hil debug`): our
        client disconnects without resuming the guest and ends; the memory reader and QEMU stay
        until close()."""
        gdb, self.gdb = self.gdb, None
        if gdb is not None:
            try:
                gdb.disconnect()
            finally:
                gdb.close()

    def __enter__(self) -> Session:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the drive ----------------------------------------------------------------------------
    def _infra(self, what: str) -> InfraError:
        return self.machine.infra(what) if self.machine else InfraError(what)

    def _wait_op_done(self, deadline_s: float, what: str) -> None:
        assert self.gdb is not None
        stop = self.gdb.wait_stop(deadline_s)
        if stop.pc != self._op_done:
            raise self._infra(
                f"{what}: the guest stopped at {stop.pc:#x} ({stop.reason or 'no reason'}), "
                f"not at hil_op_done {self._op_done:#x}"
            )

    def _read_layout(self) -> abi.Layout:
        assert self.memory is not None
        layout = abi.Layout.unpack(self.memory.read(self._layout_paddr, abi.LAYOUT_SIZE))
        if layout.magic != abi.LAYOUT_MAGIC:
            raise AbiError(f"{self.image}: hil_layout magic {layout.magic:#x} != {abi.LAYOUT_MAGIC:#x}")
        if layout.abi_version != abi.ABI_VERSION:
            raise AbiError(
                f"{self.image}: guest ABI version {layout.abi_version}, harness speaks {abi.ABI_VERSION}"
            )
        # the guest counts the RAM the boot loader reports usable (BIOS keeps a little at the top)
        profile_ram = self.profile.memory_mib << 20
        if not profile_ram - (1 << 20) <= layout.ram_size <= profile_ram:
            mib = self.profile.memory_mib
            raise AbiError(f"guest reports {layout.ram_size:#x} bytes of RAM, profile has {mib} MiB")
        return layout

    def mailbox(self) -> bytes:
        assert self.memory is not None and self.layout is not None
        return self.memory.read(self.layout.mailbox, abi.MAILBOX_SIZE)

    def response(self) -> abi.Response:
        return abi.decode_response(self.mailbox())

    def send_raw(self, request: bytes, seq: int, deadline_s: float = OP_DEADLINE_S) -> abi.Response:
        """Write a request (already encoded, seq included), run the guest to its next stop."""
        assert self.gdb is not None and self.memory is not None and self.layout is not None
        if self.machine is None or not self.machine.alive():
            raise self._infra("QEMU is not running")
        # seq is the first word: write the rest first, seq last, so the guest never sees a torn request
        self.memory.write(self.layout.mailbox + 8, request[8:])
        self.memory.write(self.layout.mailbox, request[:8])
        self.gdb.jump(self._op_done + 1)
        self._wait_op_done(deadline_s, f"request seq {seq}")
        resp = self.response()
        if resp.seq != seq:
            raise self._infra(f"guest answered seq {resp.seq}, expected {seq}")
        self.seq = seq
        return resp

    def apply(self, op: m.Op, deadline_s: float = OP_DEADLINE_S) -> Observation:
        seq = self.seq + 1
        t0 = time.perf_counter()
        resp = self.send_raw(abi.encode_request(op, seq), seq, deadline_s)
        elapsed = time.perf_counter() - t0
        disasm: tuple[str, ...] = ()
        if resp.status == m.Status.EXCEPTION:
            disasm = tuple(self.elf.disassemble_around(resp.exc_rip))
        return Observation(op, seq, abi.op_result(op, resp), resp, elapsed, disasm)

    def apply_raw(self, code: int, args: list[int]) -> abi.Response:
        """A request that need not be a valid op (the guest's validation is under test)."""
        seq = self.seq + 1
        return self.send_raw(abi.encode_raw_request(code, args, seq), seq)

    def snapshot(self, prev: State | None = None) -> State:
        from hil.observe.snapshot import read_state

        assert self.memory is not None and self.layout is not None
        return read_state(self.memory, self.layout, prev)

    def poke(self, paddr: int, data: bytes) -> None:
        """Corrupt guest memory on purpose, through the gdb stub (tests, trace `poke` events)."""
        assert self.gdb is not None and self.layout is not None
        if paddr < 0 or paddr + len(data) > self.layout.ram_size:
            raise ValueError(f"poke {paddr:#x}+{len(data)} is outside guest RAM")
        if not self.shared_ram:
            self.gdb.write_memory(paddr, data)
            return
        # gdb is in virtual mode here; write through the linear mapping the guest keeps
        self.gdb.write_memory(self.layout.linear_map_base + paddr, data)

    def cr3(self) -> int:
        assert self.gdb is not None
        return self.gdb.register("cr3")

    def read_u64(self, paddr: int) -> int:
        assert self.memory is not None
        value: int = struct.unpack("<Q", self.memory.read(paddr, 8))[0]
        return value
