"""One booted guest: boot, apply(op) -> Observation, snapshot() -> State, reset().

Drive: the guest stops in `hil_op_done` after publishing each response (our stub under TCG:
a write watchpoint on `hil_doorbell`, the stop after the write; gdb/MI and KVM: a breakpoint
on `hil_op_done`, resumed past its 1-byte `nop`; guest/hil/op_done.S says why); we write the
next request into the mailbox (through the memory reader: the shared RAM file, or the stub in
physical mode), resume, and wait for the next stop with a deadline. Every process we start
is ended by PID on every exit path (`close`).

The debugger on the hot path is `hil.target.stub.Stub` (one remote-protocol exchange per op);
`driver="gdb"` uses gdb/MI instead (both are `Target`s). Under KVM the breakpoint is a
hardware one (Z1 / hbreak): KVM refuses a software breakpoint on a kernel VA at -S.

Snapshot: with a previous State, only the last op's footprint is read (hil.observe.snapshot
`Footprint`: what the op can have written, plus every poked byte), and every `full_every`
snapshots everything is read too; what the footprints missed becomes an UNLOGGED anomaly.

Reset (after a PANIC / EXCEPTION) goes back to the reset point (the READY stop, or
`mark_reset_point`) without a new QEMU: the guest recovers from a panic or exception itself
and stops at hil_op_done, so the harness writes back what changed since (the slots and registry
entries the snapshots saw change, kernel .data/.bss, the page-table pool pages seen as nodes
plus a margin) from the reset point's bytes, and every register from the `g` taken there
(CR3 too: QEMU flushes its TLB). The result is byte-identical to a fresh boot
(tests/hil/test_perf_reset.py). `reset()` reboots instead when it cannot (QEMU gone, gdb/MI
driver, a poke where the reset point's bytes are not kept, gdb-only ops no snapshot saw).
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hil.errors import AbiError, InfraError
from hil.observe.snapshot import (
    Footprint,
    cached_bytes,
    compare_states,
    fork_state,
    raw_changes,
    read_state,
    runs,
    take_raw_meta,
)  # fmt: skip
from hil.target import abi
from hil.target.elf import GuestElf
from hil.target.gdb import Gdb
from hil.target.machine import DEFAULT_IMAGE, Machine, Profile
from hil.target.memory import GdbPhysMemory, PhysMemory, SharedRamMemory
from hil.target.stub import Stub, Target
from model import ops as m
from model.state import State

BOOT_DEADLINE_S = 20.0
OP_DEADLINE_S = 10.0
KERNEL_LOAD_PADDR = 0x100000  # guest/linker.ld: the image (boot tables, .data, .bss) starts here
DRIVERS = ("stub", "gdb")
PT_POOL_MARGIN = 64 * 4096  # restored past the highest page-table node seen (see reset)
PT_POOL_MARGIN_SLOW = 2 * 4096  # the same through `M` packets (gdb-only)


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
    driver: str = "stub"
    machine: Machine | None = None
    gdb: Target | None = None  # the debugger on QEMU's stub (name kept: tests and tools use it)
    memory: PhysMemory | None = None
    layout: abi.Layout | None = None
    seq: int = 0
    boots: int = 0
    resets: int = 0  # fast resets (no new QEMU)
    # every Nth snapshot also reads everything and reports what the footprints missed (0: never;
    # 1: every op, for tests)
    full_every: int = 200
    # the exec the caller's model follows (abi.EXEC_NAMES); None: whatever the image was built for
    exec_name: str | None = None

    def __post_init__(self) -> None:
        if self.driver not in DRIVERS:
            raise ValueError(f"driver must be one of {DRIVERS}, not {self.driver!r}")
        self.elf = GuestElf(self.image)
        self._op_done = self.elf.symbol("hil_op_done")
        # where an op's stop comes (guest/hil/op_done.S): our stub under TCG watches the write
        # to hil_doorbell (QEMU keeps its translated code then; a breakpoint stop flushes it all)
        # and the guest stops after it, at hil_op_done_rung; gdb/MI and KVM keep the breakpoint
        # on hil_op_done (so does an image built before the doorbell)
        doorbell, rung = self.elf.symbols.get("hil_doorbell"), self.elf.symbols.get("hil_op_done_rung")
        watch = doorbell and rung and self.driver == "stub" and self.profile.accel == "tcg"
        self._doorbell = doorbell[0] if watch and doorbell else None
        self._stop_pc = rung[0] if watch and rung else self._op_done
        self._layout_paddr = self.elf.vaddr_to_paddr(self.elf.symbol("hil_layout"))
        # the reset point (the READY stop, or mark_reset_point): registers, kernel .data/.bss,
        # the pool's nodes then, the State (its cache never consumed: forked before each use)
        # and its metadata / registry bytes
        self._boot_regs: bytes | None = None
        self._boot_ram: list[tuple[int, bytes]] = []
        self._boot_meta = b""
        self._boot_registry = b""
        self._reset_pt_high = 0
        self._pt_high = 0  # end of the highest page-table-pool node seen since boot
        # what changed since the reset point (what a fast reset writes back)
        self._dirty_slots: set[int] = set()
        self._dirty_entries: set[int] = set()
        self._dirty_all = False
        self._seen_nodes: set[int] = set()
        self._unrestorable = False  # a poke where the reset point's bytes are not kept: reboot
        self._reset_slots: frozenset[int] = frozenset()
        self._untouched = False  # nothing ran since the reset point was read
        self._reset_status = m.Status.READY
        self._ops_since_snapshot = 0  # ops no snapshot has looked at (their writes are unknown)
        self._last_state: State | None = None  # the latest snapshot (its metadata bytes, for reset)
        self._reset_meta: bytearray | None = None
        self._poked: list[tuple[int, int]] = []  # (paddr, size) written by poke() since the last snapshot
        self._last_op: m.Op | None = None
        self._in_flight: tuple[m.Op, int, float] | None = None  # begin() sent it, finish() not yet
        self._force_full = False
        self._boot_state: State | None = None  # the READY state, its snapshot cache unconsumed
        self._fresh_reset = False
        self._since_full = 0
        self.full_reads = 0
        self.unlogged = 0  # footprint misses found by full reads

    @property
    def stub(self) -> Stub | None:
        return self.gdb if isinstance(self.gdb, Stub) else None

    # --- life cycle -----------------------------------------------------------------------
    def boot(self) -> None:
        """Start QEMU + gdb and run the guest to its READY stop. On failure everything
        started is ended and an InfraError carries the command line and log tails."""
        self._in_flight = None
        self.close()
        machine = Machine(self.profile, self.image, shared_ram=self.shared_ram)
        self.machine = machine
        try:
            if self.driver == "gdb":
                # gdb's own start-up (~0.25 s, its embedded Python) overlaps QEMU's
                gdb = Gdb(self.image, on_infra=machine.infra)
                self.gdb = gdb
                machine.start()
                gdb.connect(machine.gdb_socket)
            else:
                stub = Stub(on_infra=machine.infra)
                self.gdb = stub
                machine.start()
                stub.connect(machine.gdb_socket)
            if self._doorbell is not None:
                assert isinstance(self.gdb, Stub)
                self.gdb.insert_watchpoint(self._doorbell, 8)
            else:
                self.gdb.insert_breakpoint(self._op_done, hardware=self.profile.accel == "kvm")
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
            self._pt_high = self.layout.pt_pool_start
            self._set_reset_point(read_state(self.memory, self.layout))
        except BaseException:
            self.close()
            raise

    # --- fast reset ---------------------------------------------------------------------
    def _set_reset_point(self, state: State) -> None:
        """The guest as it is now (`state` = its snapshot, cache unconsumed) becomes what a fast
        reset returns to. Kept: registers, kernel .data/.bss (the mailbox is its first page,
        the registry follows .bss), the pool's nodes (free pool pages are zero at boot), and the
        State with the metadata and registry bytes it read."""
        assert self.layout is not None and self.memory is not None
        lay = self.layout
        self._boot_state = fork_state(state)
        self._boot_meta, self._boot_registry = cached_bytes(state)
        self._reset_status = self.response().status  # READY at boot
        self._last_state = None
        self._reset_meta = None
        self._reset_pt_high = max(self._pt_high, lay.pt_pool_start)
        self._clear_dirty()
        self._untouched = True
        self._boot_regs = None
        self._boot_ram = []
        if isinstance(self.gdb, Stub):
            self._boot_regs = self.gdb.read_registers()
            start = KERNEL_LOAD_PADDR if self.shared_ram else lay.mailbox
            self._boot_ram = [(start, self.memory.read(start, lay.registry_base - start))]
            if self._reset_pt_high > lay.pt_pool_start:
                size = self._reset_pt_high - lay.pt_pool_start
                self._boot_ram.append((lay.pt_pool_start, self.memory.read(lay.pt_pool_start, size)))

    def _clear_dirty(self) -> None:
        self._dirty_slots.clear()
        self._dirty_entries.clear()
        self._dirty_all = self._unrestorable = False
        self._seen_nodes.clear()

    def mark_reset_point(self, state: State) -> None:
        """Make the guest as it is now the target of later fast resets (e.g. a benchmark's
        prepared state). `state` must be the snapshot just taken (its cache unconsumed)."""
        self._set_reset_point(state)

    def note_nodes(self, node_paddrs: Iterable[int]) -> None:
        """Page-table nodes seen in a snapshot: the pool pages a reset writes back."""
        assert self.layout is not None
        lo, hi = self.layout.pt_pool_start, self.layout.pt_pool_end
        for p in node_paddrs:
            if lo <= p < hi:
                self._seen_nodes.add(p)
                self._pt_high = max(self._pt_high, p + 4096)

    def _note_snapshot(self, state: State) -> None:
        slots, entries = raw_changes(state)
        if slots is None or entries is None:
            self._dirty_all = True
        else:
            self._dirty_slots.update(slots)
            self._dirty_entries.update(entries)
        for view in (*state.vm_spaces.values(), *state.leaked.values()):
            self.note_nodes(view.nodes)

    def _note_poke(self, paddr: int, size: int) -> None:
        """A fast reset restores kernel data, registry, metadata and pool pages; a poke
        elsewhere below the data pool (kernel tables, boot code) makes the next reset a reboot."""
        assert self.layout is not None
        lay = self.layout
        kernel_data = KERNEL_LOAD_PADDR if self.shared_ram else lay.mailbox
        for page in range(paddr & ~0xFFF, paddr + size, 4096):
            if lay.pt_pool_start <= page < lay.pt_pool_end:
                self._seen_nodes.add(page)
            elif kernel_data <= page < lay.registry_base + lay.registry_entries * lay.registry_entry_size:
                continue  # kernel data (always restored) or the registry (the snapshot marks it)
            elif lay.meta_base <= page < lay.meta_base + lay.slot_count * lay.slot_size:
                continue  # the next snapshot reads the poked slots and marks them
            elif page < lay.pt_pool_start:
                self._unrestorable = True

    def can_fast_reset(self) -> bool:
        return (
            self._boot_regs is not None
            and self._boot_state is not None
            and not self._unrestorable
            and isinstance(self.gdb, Stub)
            and self.gdb.alive()
            and self.memory is not None
            and self.machine is not None
            and self.machine.alive()
        )

    def reset(self, *, reboot: bool = False) -> None:
        """Back to the reset point (the booted guest): after a PANIC / EXCEPTION write back
        what changed since (same QEMU, both modes), or reboot (`reboot=True`, an
        infrastructure error, or no fast path: gdb/MI driver, an unrestorable poke)."""
        blind = self._ops_since_snapshot > 0  # ops whose writes no snapshot has seen
        reboot = reboot or self._in_flight is not None  # an op sent and never waited for
        if reboot or not self.can_fast_reset() or (blind and not self.shared_ram):
            self.boot()
            return
        assert isinstance(self.gdb, Stub) and self.memory is not None and self.layout is not None
        assert self._boot_regs is not None
        lay, mem = self.layout, self.memory
        if blind:
            self._dirty_all = True
        for start, data in self._boot_ram[:1]:  # kernel .data/.bss: stacks, globals, mailbox
            mem.write(start, data)
        es, n_entries = lay.registry_entry_size, lay.registry_entries
        entries = range(n_entries) if self._dirty_all else self._dirty_entries
        for lo, hi in runs(i for i in entries if 0 <= i < n_entries):
            mem.write(lay.registry_base + es * lo, self._boot_registry[es * lo : es * hi])
        slots = range(lay.slot_count) if self._dirty_all else self._dirty_slots
        restored: set[int] = set()
        # the latest snapshot's metadata bytes differ from the reset point's only where the
        # slots were written back: patched, they are the reset point's (no copy of the region)
        latest = take_raw_meta(self._last_state) if self._last_state is not None and not self._dirty_all else None
        for lo, hi in runs(i for i in slots if 0 <= i < lay.slot_count):
            mem.write(lay.meta_base + 64 * lo, self._boot_meta[64 * lo : 64 * hi])
            if latest is not None:
                latest[64 * lo : 64 * hi] = self._boot_meta[64 * lo : 64 * hi]
            restored.update(range(lo, hi))
        self._reset_meta = latest
        # the pool: the nodes seen since, and a margin past the highest (a node allocated and
        # freed inside one op is never seen); bytes of the reset point, zeros past its nodes
        saved = self._boot_ram[1][1] if len(self._boot_ram) > 1 else b""
        margin = PT_POOL_MARGIN if self.shared_ram else PT_POOL_MARGIN_SLOW
        top = min(max(self._pt_high, self._reset_pt_high, lay.pt_pool_start) + margin, lay.pt_pool_end)
        pages = set(range(max(self._pt_high, self._reset_pt_high, lay.pt_pool_start), top, 4096))
        pages |= self._seen_nodes
        if self.shared_ram:
            pages = set(range(lay.pt_pool_start, lay.pt_pool_end if blind else top, 4096))
        for lo, hi in runs(p // 4096 for p in pages):
            a, b = lo * 4096, hi * 4096
            off = a - lay.pt_pool_start
            data = saved[off : off + (b - a)]
            mem.write(a, data + bytes(b - a - len(data)))
        self.gdb.write_registers(self._boot_regs)
        self._pt_high = self._reset_pt_high
        self._clear_dirty()
        self._poked.clear()
        self._reset_slots = frozenset(restored)
        self._fresh_reset = True
        self._ops_since_snapshot = 0
        resp = self.response()
        if resp.status != self._reset_status:
            raise self._infra(f"after the reset the mailbox says {resp.status.name}, not {self._reset_status.name}")
        self.seq = resp.seq
        self.resets += 1

    def close(self) -> None:
        self._boot_regs = None
        self._boot_ram = []
        self._boot_state = None
        self._boot_meta = self._boot_registry = b""
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
        if stop.pc == 0 and isinstance(self.gdb, Stub):
            if self._doorbell is None and stop.reason == "breakpoint-hit":
                return  # a SIGTRAP after a resume: our only breakpoint (the seq echo is checked too)
            rang = stop.reason == "watchpoint-hit" and stop.raw.get("watch") == self._doorbell
            if self._doorbell is not None and rang:
                return  # our only watchpoint: the guest rang after publishing its response
            if self.gdb.alive():
                stop = type(stop)(stop.reason, self.gdb.stop_pc(), stop.raw)
        if stop.pc != self._stop_pc:
            where = "hil_op_done_rung" if self._doorbell is not None else "hil_op_done"
            raise self._infra(
                f"{what}: the guest stopped at {stop.pc:#x} ({stop.reason or 'no reason'}), "
                f"not at {where} {self._stop_pc:#x}"
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
        if self.exec_name is not None and layout.exec_name != self.exec_name:
            raise AbiError(f"{self.image} is an EXEC={layout.exec_name} build; exec {self.exec_name} needs an "
                           f"EXEC={self.exec_name} build (make -C guest EXEC={self.exec_name} "
                           f"B=build-{self.exec_name})")
        return layout

    def mailbox(self) -> bytes:
        assert self.memory is not None and self.layout is not None
        return self.memory.read(self.layout.mailbox, abi.MAILBOX_SIZE)

    def response(self) -> abi.Response:
        if self.shared_ram:
            return abi.decode_response(self.mailbox())
        # through the stub each 2 KiB costs an exchange: the response words, then the flush log
        # only as far as it is filled (the rest of the page is the probe oracle's, read by it)
        assert self.memory is not None and self.layout is not None
        page = bytearray(abi.MAILBOX_SIZE)
        page[: abi.OFF_FLUSH_LOG] = self.memory.read(self.layout.mailbox, abi.OFF_FLUSH_LOG)
        n = min(int.from_bytes(page[abi.OFF_FLUSH_LOG_LEN : abi.OFF_FLUSH_LOG_LEN + 8], "little"), abi.FLUSH_LOG_CAP)
        if n:
            log = self.memory.read(self.layout.mailbox + abi.OFF_FLUSH_LOG, 8 * n)
            page[abi.OFF_FLUSH_LOG : abi.OFF_FLUSH_LOG + 8 * n] = log
        return abi.decode_response(bytes(page))

    def send_raw(self, request: bytes, seq: int, deadline_s: float = OP_DEADLINE_S) -> abi.Response:
        """Write a request (already encoded, seq included), run the guest to its next stop."""
        self._send_request(request)
        return self._await_response(seq, deadline_s)

    def _send_request(self, request: bytes) -> None:
        assert self.gdb is not None and self.memory is not None and self.layout is not None
        if self.machine is None or not self.machine.alive():
            raise self._infra("QEMU is not running")
        self._untouched = False
        self._ops_since_snapshot += 1
        # one write: the guest is stopped at hil_op_done(_rung) and reads the request only once resumed
        self.memory.write(self.layout.mailbox, request)
        if self._doorbell is not None:
            self.gdb.resume()  # after the doorbell's write: on to hil_op_done's `ret`
        else:
            self.gdb.jump(self._op_done + 1)

    def _await_response(self, seq: int, deadline_s: float) -> abi.Response:
        self._wait_op_done(deadline_s, f"request seq {seq}")
        resp = self.response()
        if resp.seq != seq:
            raise self._infra(f"guest answered seq {resp.seq}, expected {seq}")
        self.seq = seq
        return resp

    @property
    def can_overlap(self) -> bool:
        """Whether the harness may work while the guest runs an op (`begin` ... `finish`): only
        with the stub client (its continue returns at once) and the shared RAM file (nothing
        the checks read goes through the stub, which answers nothing while the guest runs)."""
        return self.shared_ram and isinstance(self.gdb, Stub)

    def begin(self, op: m.Op) -> None:
        """Send `op` and return while the guest runs it; `finish` waits for its stop."""
        self._in_flight = (op, self.seq + 1, time.perf_counter())
        self._last_op = op
        self._send_request(abi.encode_request(op, self.seq + 1))

    def finish(self, deadline_s: float = OP_DEADLINE_S) -> Observation:
        assert self._in_flight is not None, "finish() without begin()"
        op, seq, t0 = self._in_flight
        self._in_flight = None
        resp = self._await_response(seq, deadline_s)
        elapsed = time.perf_counter() - t0
        disasm: tuple[str, ...] = ()
        if resp.status == m.Status.EXCEPTION:
            disasm = tuple(self.elf.disassemble_around(resp.exc_rip))
        return Observation(op, seq, abi.op_result(op, resp), resp, elapsed, disasm)

    def apply(self, op: m.Op, deadline_s: float = OP_DEADLINE_S) -> Observation:
        self.begin(op)
        return self.finish(deadline_s)

    def apply_raw(self, code: int, args: list[int]) -> abi.Response:
        """A request that need not be a valid op (the guest's validation is under test)."""
        seq = self.seq + 1
        self._last_op = None
        self._force_full = True  # a raw request can do anything: the next snapshot reads all
        return self.send_raw(abi.encode_raw_request(code, args, seq), seq)

    def footprint(self) -> Footprint:
        """What the next snapshot must read besides what it derives itself (hil.observe.snapshot
        `Footprint`): the last op's own arguments and every poked byte."""
        assert self.layout is not None
        lay = self.layout
        slots: set[int] = set()
        pages: set[int] = set()
        op = self._last_op
        if isinstance(op, (m.FrameFromUnused, m.FrameFromInUse)):
            slots.add(op.paddr // 4096)
        elif isinstance(op, m.SegmentFromUnused) and 0 <= op.start <= op.end <= lay.ram_size:
            slots.update(range(op.start // 4096, -(-op.end // 4096)))
        elif isinstance(op, m.Activate) and lay.exec_name == "upstream":
            slots.add(lay.kernel_root // 4096)  # the CPU's reference moves to / from the kernel root
        # PTEs are written through a cursor by map / unmap / protect (within its barrier); a
        # probe that writes may hit a page-table node mapped as data: every node is re-read
        cursors = (op.cursor,) if isinstance(op, (m.Map, m.Unmap, m.ProtectNext)) else ()
        all_nodes = isinstance(op, m.Probe) and bool(op.write)
        # EXEC=upstream: open allocates the nodes down to its guard node (lock_range), activate
        # may free a dropped VmSpace's tree
        all_nodes = all_nodes or (lay.exec_name == "upstream" and isinstance(op, (m.OpenCursor, m.OpenCursorMut,
                                                                                     m.Activate)))  # fmt: skip
        full_registry = False
        meta_end = lay.meta_base + lay.slot_size * lay.slot_count
        reg_end = lay.registry_base + lay.registry_entries * lay.registry_entry_size
        for paddr, size in self._poked:
            end = paddr + size
            if paddr < meta_end and end > lay.meta_base:
                first = (max(paddr, lay.meta_base) - lay.meta_base) // 64
                slots.update(range(first, (min(end, meta_end) - lay.meta_base + 63) // 64))
            if paddr < reg_end and end > lay.registry_base:
                full_registry = True
            pages.update(range(paddr & ~0xFFF, end, 4096))
        return Footprint(
            slots=frozenset(slots), all_nodes=all_nodes,
            registry_prefix=not self.shared_ram and not full_registry, pt_pool=(lay.pt_pool_start, lay.pt_pool_end),
            cursors=cursors, pages=frozenset(pages), merge_gap=4 if self.shared_ram else 32,
        )  # fmt: skip

    def snapshot(self, prev: State | None = None, *, full: bool = False) -> State:
        """The guest's State. With `prev`, read only what the last op can have changed (its
        footprint) and, every `full_every` snapshots (or with `full`), everything too: what the
        footprints missed becomes an UNLOGGED anomaly and the full read is the result. Right
        after a fast reset, the State is read against the saved boot State (exact)."""
        assert self.memory is not None and self.layout is not None
        lay = self.layout
        if prev is None and self._untouched and self._boot_state is not None:
            return fork_state(self._boot_state)  # read at the reset point, nothing ran since
        if prev is None and self._fresh_reset and self._boot_state is not None:
            # what the reset wrote back, against the reset point's State
            fp = Footprint(slots=self._reset_slots, all_nodes=self.shared_ram, registry_prefix=not self.shared_ram,
                           pt_pool=(lay.pt_pool_start, lay.pt_pool_end))  # fmt: skip
            meta, self._reset_meta = self._reset_meta, None
            state = read_state(self.memory, lay, fork_state(self._boot_state, raw_meta=meta), footprint=fp)
            state = dataclasses.replace(state, parent=None, changed=None)
        elif prev is None:
            state = read_state(self.memory, lay)
        else:
            self._since_full += 1
            # the footprint names the last op's writes: with several ops since prev, read all
            verify = full or self._force_full or self._ops_since_snapshot > 1
            verify = verify or (self.full_every > 0 and self._since_full >= self.full_every)
            fp = self.footprint()
            if prev.held_nodes and isinstance(self._last_op, (m.FrameDrop, m.UniqueDrop)):  # upstream: on_drop
                leaves = {e & 0x000F_FFFF_FFFF_F000 for n in prev.held_nodes.values() if n.level == 1
                          for e in n.entries if e & 1}  # fmt: skip
                fp = dataclasses.replace(fp, slots=fp.slots | {p // 4096 for p in leaves})
            try:
                # the full read compares every byte with prev's cached bytes (decoding only what
                # differs): a private copy of the cache, as the footprint read hands prev's on
                base = fork_state(prev) if verify else prev
            except ValueError:
                base = None  # prev's cache is spent (a second snapshot from it): from scratch
            partial = read_state(self.memory, self.layout, prev, footprint=fp)
            state = partial
            if verify:
                self._since_full = 0
                self.full_reads += 1
                if base is None:
                    whole = read_state(self.memory, self.layout, prev)
                else:
                    whole = dataclasses.replace(read_state(self.memory, self.layout, base), parent=prev)
                missed = compare_states(partial, whole)
                if missed:
                    self.unlogged += 1
                    state = dataclasses.replace(whole, anomalies=whole.anomalies + tuple(missed))
        self._fresh_reset = self._force_full = False
        self._poked.clear()
        self._last_op = None
        self._ops_since_snapshot = 0
        self._note_snapshot(state)
        self._last_state = state
        return state

    def poke(self, paddr: int, data: bytes) -> None:
        """Corrupt guest memory on purpose, through the gdb stub (tests, trace `poke` events)."""
        assert self.gdb is not None and self.layout is not None
        if paddr < 0 or paddr + len(data) > self.layout.ram_size:
            raise ValueError(f"poke {paddr:#x}+{len(data)} is outside guest RAM")
        self._poked.append((paddr, len(data)))  # the next snapshot reads these bytes whatever the op wrote
        self._untouched = False
        self._note_poke(paddr, len(data))
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
