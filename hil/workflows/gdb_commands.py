"""The gdb side of `hil debug`: sourced by the gdb that `hil debug` starts (never imported by
the harness). Thin `gdb.Command`s over hil/workflows/debug_core.py and the harness's own
walker, decoder, model and Runner; guest memory is read through the machine's shared RAM file.

Commands: hil-pt, hil-slot, hil-diff, hil-step, hil-ops, hil-disas (`help hil-pt` ...), and
hil-start, which `hil debug` runs once to stop at the entry of op N's guest function.
The session's context comes from the JSON file named by HIL_DEBUG_CONTEXT.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import gdb  # gdb's embedded Python provides it

from hil.check import oracles
from hil.errors import HilError
from hil.observe.snapshot import read_state
from hil.run.runner import REBOOT_STATUSES, Runner
from hil.run.session import Observation, Session
from hil.run.trace import Poke, read_trace
from hil.target import abi
from hil.target.elf import GuestElf
from hil.target.machine import Machine, Profile
from hil.target.memory import SharedRamMemory
from hil.workflows import debug_core as core
from model import ops as m
from model.state import State

ENV_CONTEXT = "HIL_DEBUG_CONTEXT"
MASK64 = (1 << 64) - 1
# guest/boot/cpu.c `struct frame`: what isr_common pushed, then the CPU's exception frame
FRAME_FIELDS = ("r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8", "rbp", "rdi", "rsi", "rdx", "rcx",
                "rbx", "rax", "vector", "error_code", "rip", "cs", "rflags", "rsp", "ss")  # fmt: skip
VECTOR_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 6: "#UD", 8: "#DF", 13: "#GP", 14: "#PF", 17: "#AC", 18: "#MC"}


def _reg(name: str) -> int:
    return int(gdb.parse_and_eval(f"(unsigned long)${name}")) & MASK64


class GdbDrive:
    """What Runner.step calls on a Session, served inside gdb. hil-step has already run the
    guest to hil_op_done, so apply() only reads the response the op left in the mailbox."""

    # the Runner attaches its oracles to a Session's reader and layout after a reboot; this
    # drive has none (hil debug arms the MMU probes itself, see PlannedProbes)
    memory = None
    layout = None

    def __init__(self, dbg: Debugger):
        self.dbg = dbg
        self._op: m.Op | None = None

    def begin(self, op: m.Op) -> None:
        self._op = op  # already run by hil-step

    def finish(self, deadline_s: float = 0.0) -> Observation:
        assert self._op is not None
        op, self._op = self._op, None
        return self.apply(op, deadline_s)

    def apply(self, op: m.Op, deadline_s: float = 0.0) -> Observation:
        resp = self.dbg.response()
        if resp.seq != self.dbg.seq:
            raise core.DebugInputError(f"the guest answered seq {resp.seq}, expected {self.dbg.seq}")
        disasm: tuple[str, ...] = ()
        if resp.status == m.Status.EXCEPTION:
            disasm = tuple(self.dbg.elf.disassemble_around(resp.exc_rip))
        return Observation(op, resp.seq, abi.op_result(op, resp), resp, 0.0, disasm)

    def snapshot(self, prev: State | None = None) -> State:
        return read_state(self.dbg.mem, self.dbg.layout, prev)

    def reset(self, *, reboot: bool = False) -> None:
        # a PANIC / EXCEPTION needs a new machine: not from inside gdb (see hil-step)
        self.dbg.needs_reboot = True

    def poke(self, paddr: int, data: bytes) -> None:
        self.dbg.mem.write(paddr, data)


class ExceptionStop(gdb.Breakpoint):
    """At the entry of the guest's exception_handler: stop once per fault (not for the #PF an
    MMU probe expects); the stop handler then puts the CPU back at the faulting instruction."""

    def __init__(self, dbg: Debugger, address: int):
        super().__init__(f"*{address:#x}", internal=True)
        self.dbg = dbg

    def stop(self) -> bool:
        frame_va = _reg("rdi")
        words = struct.unpack(
            f"<{len(FRAME_FIELDS)}Q", bytes(gdb.selected_inferior().read_memory(frame_va, 8 * len(FRAME_FIELDS)))
        )
        frame = dict(zip(FRAME_FIELDS, words, strict=True))
        if frame["vector"] == 14 and int(gdb.parse_and_eval("probe_armed")):
            return False
        key = (frame["vector"], frame["rip"])
        if self.dbg.exception is not None and self.dbg.exception["key"] == key:
            return False  # the fault again, after the person resumed at it: let the guest report it
        self.dbg.exception = {"key": key, "frame": frame, "cr2": _reg("cr2"), "shown": False}
        return True


class Debugger:
    def __init__(self, ctx: core.Context):
        self.ctx = ctx
        self.layout = ctx.abi_layout()
        self.mem = SharedRamMemory(Path(ctx.shm_path), ctx.ram_size)
        self.elf = GuestElf(Path(ctx.image))
        self.trace = read_trace(Path(ctx.trace))
        with open(ctx.state_pickle, "rb") as fh:
            saved = pickle.load(fh)  # written by hil debug for this session (a private run dir)
        self.runner = Runner(cast(Session, GdbDrive(self)))
        # MMU probes are planned and written with each request (hil debug did op N's), so the
        # Runner gets them through PlannedProbes and never attaches its own
        self.runner.probes_enabled = False
        self.runner.qemu_every = 0  # (QEMU's monitor is the harness's, not gdb's)
        self.probes: core.PlannedProbes | None = None
        if saved["probes"]:
            self.probes = core.PlannedProbes(oracles.MmuProbes(self.mem, self.layout), saved["probe_plan"])
            self.runner.probes = cast(oracles.MmuProbes, self.probes)
        self.view: core.PlannedView | None = None
        q = saved.get("qemu")
        if q is not None:
            machine = Machine(Profile.load(q["profile"]), Path(ctx.image), tag=q["tag"])  # never started: its HMP
            real = oracles.QemuTranslation(self.mem, self.layout, machine.hmp, every=q["every"])
            real.rng.setstate(q["rng"])
            real.checks = q["checks"]
            real.last_index, real.last_lines = q["last"]
            self.view = core.PlannedView(real, q["pending"])
            self.runner.qemu = cast(oracles.QemuTranslation, self.view)
        self.runner.state = saved["before"]
        self.runner.records = list(saved["records"])
        self.runner.index = ctx.index
        self.index = ctx.index
        self.seq = ctx.seq
        self.needs_reboot = False
        self.exception: dict[str, Any] | None = None
        self.op_done_bp = gdb.Breakpoint(f"*{ctx.op_done:#x}", internal=True)
        self.exc_bp = ExceptionStop(self, ctx.exception_handler)
        gdb.events.stop.connect(self._on_stop)

    # --- state ------------------------------------------------------------------------
    @property
    def before(self) -> State:
        assert self.runner.state is not None
        return self.runner.state

    def op(self) -> m.Op:
        event = self.trace.records[self.index].event
        assert isinstance(event, m.Op)
        return event

    def now(self) -> State:
        return read_state(self.mem, self.layout, self.before)

    def response(self) -> abi.Response:
        return abi.decode_response(self.mem.read(self.layout.mailbox, abi.MAILBOX_SIZE))

    def finished(self) -> bool:
        return _reg("pc") == self.ctx.op_done and self.response().seq == self.seq

    def _require_op(self) -> None:
        if self.needs_reboot:
            raise core.DebugInputError(
                f"op {self.index - 1} ended in {self.runner.records[-1].result!r}: the guest needs a reboot; "
                f"quit and run: hil debug {self.ctx.trace} --at {self.index}"
            )
        if self.index >= len(self.trace.records):
            raise core.DebugInputError(f"the trace ends at op {len(self.trace.records) - 1}")

    # --- driving -----------------------------------------------------------------------
    def _resume(self, quiet: bool = False) -> str:
        # at hil_op_done: past its 1-byte nop (the harness's breakpoint spot), as the harness does
        cmd = f"jump *{self.ctx.op_done + 1:#x}" if _reg("pc") == self.ctx.op_done else "continue"
        return gdb.execute(cmd, to_string=quiet) or ""

    def enter_op(self) -> str:
        """The request of op `index` is in the mailbox: run to the entry of its function."""
        chain = core.implementing_functions(type(self.op()), Path(self.ctx.src_dir))
        target = None
        for name in reversed(chain):
            try:
                gdb.decode_line(name)
            except gdb.error:
                continue
            target = name
            break
        if target is None:
            raise core.DebugInputError(f"none of {chain} is known to gdb (symbols not loaded?)")
        bp = gdb.Breakpoint(target, temporary=True)
        self._resume()
        if bp.is_valid():  # still there: it was not hit
            bp.delete()
            if self.finished():
                # e.g. an argument error returned before the op's function was called
                resp = self.response()
                return (f"{' -> '.join(chain)}: the op returned (status {resp.status.name}, code {resp.code}) "
                        f"without reaching {target}; hil-step checks it")  # fmt: skip
            raise core.DebugInputError(f"op {self.index}: stopped at {_reg('pc'):#x} before reaching {target}")
        return " -> ".join(chain)

    def write_request(self) -> None:
        req = abi.encode_request(self.op(), self.seq)
        # seq is the first word: written last, so the guest never sees a torn request
        self.mem.write(self.layout.mailbox + 8, req[8:])
        self.mem.write(self.layout.mailbox, req[:8])

    def run_to_op_done(self) -> bool:
        """Finish the op in progress; False if the guest stopped elsewhere first (a breakpoint
        of the person's, a CPU exception): that stop is shown, the person looks first."""
        if self.finished():
            return True
        # the stop at hil_op_done is no news; any other stop is shown
        exc_before = self.exception
        gdb.execute("set suppress-cli-notifications on")
        try:
            out = self._resume(quiet=True)
        finally:
            gdb.execute("set suppress-cli-notifications off")
        if self.finished():
            return True
        print(out, end="")
        if self.exception is exc_before:  # (a new fault's report shows the frame already)
            print(gdb.execute("frame", to_string=True), end="")
        return False

    def _on_stop(self, event: Any) -> None:
        if isinstance(event, gdb.BreakpointEvent) and self.op_done_bp in event.breakpoints:
            if self.response().seq == self.seq and not self.needs_reboot:
                print(f"op {self.index} finished: hil-step checks it and stops before the next op")
            return
        exc = self.exception
        if not isinstance(event, gdb.BreakpointEvent) or self.exc_bp not in event.breakpoints or exc is None:
            return
        if exc["shown"]:
            return
        frame = exc["frame"]
        # back to the faulting instruction with the registers it faulted with (CR2 stays set);
        # resuming re-executes it, and the repeated fault goes to the guest's handler
        for name in FRAME_FIELDS[:15]:
            gdb.execute(f"set ${name} = {frame[name]:#x}", to_string=True)
        gdb.execute(f"set $eflags = {frame['rflags']:#x}", to_string=True)
        gdb.execute(f"set $rsp = {frame['rsp']:#x}", to_string=True)
        gdb.execute(f"set $rip = {frame['rip']:#x}", to_string=True)
        exc["shown"] = True
        print(self.describe_exception())
        print(
            "back at the faulting instruction (registers as they were at the fault); "
            "hil-step (or continue) lets the guest report it:"
        )
        print(gdb.execute("frame", to_string=True), end="")

    def describe_exception(self) -> str:
        exc = self.exception
        if exc is None:
            return "no CPU exception in this op"
        f = exc["frame"]
        name = VECTOR_NAMES.get(f["vector"], "")
        lines = [f"CPU exception vector {f['vector']} {name} error code {f['error_code']:#x} at RIP {f['rip']:#x}"
                 f" CR2 {exc['cr2']:#x} during op {self.index} {self.op()!r}"]  # fmt: skip
        lines += self.elf.disassemble_around(f["rip"])
        return "\n".join(lines)

    def step(self) -> None:
        self._require_op()
        if not self.run_to_op_done():
            print(f"op {self.index} is not finished; hil-step again to go on")
            return
        event = self.trace.records[self.index].event
        recorded = self.trace.records[self.index]
        probes_run = self.probes.real.probes_run if self.probes is not None else 0
        qemu_lines = self.view.real.lines if self.view is not None else 0
        qemu_checks = self.view.real.checks if self.view is not None else 0
        rec = self.runner.step(event)
        res = f" -> {rec.result!r}" if rec.result is not None else ""
        print(f"op {rec.index} {rec.event!r}{res}")
        print(core.format_findings(rec.findings, "no findings"))
        checked = "checked: model, spec clauses, invariants"
        if self.probes is not None and self.probes.real.probes_run > probes_run:
            checked += f", {self.probes.real.probes_run - probes_run} MMU probes"
        if self.view is not None and self.view.real.checks > qemu_checks:
            checked += f", QEMU's info tlb ({self.view.real.lines - qemu_lines} lines)"
        if rec.result is not None and rec.result.status not in REBOOT_STATUSES:
            print(checked)
        diff = core.recorded_difference(recorded, rec)
        if diff is not None:
            print(f"differs from the trace: {diff}")
        self.exception = None
        self.index = self.runner.index
        while self.index < len(self.trace.records) and isinstance(self.trace.records[self.index].event, Poke):
            self.runner.step(self.trace.records[self.index].event)
            print(f"event {self.index} {self.trace.records[self.index].event!r} applied")
            self.index = self.runner.index
        if self.needs_reboot:
            print(f"the guest needs a reboot after this op: to go on, quit and run "
                  f"hil debug {self.ctx.trace} --at {self.index}")  # fmt: skip
            return
        if self.index >= len(self.trace.records):
            print("end of the trace")
            return
        self.seq += 1
        if self.probes is not None:
            self.probes.arm(self.before, self.op())
        if self.view is not None:
            self.view.arm(self.index, self.before, self.op())
        self.write_request()
        chain = self.enter_op()
        print(f"stopped before op {self.index} {self.op()!r} in {chain}")


_DBG: Debugger | None = None


def dbg() -> Debugger:
    if _DBG is None:
        raise core.DebugInputError("no hil debug session here: start gdb through `hil debug TRACE`")
    return _DBG


# --- commands: one argparse parser each, registered by one decorator ---------------------------------
_REGISTERED: set[str] = set()


def hil_command(parser: core.CommandParser, *, advances: bool = False) -> Callable[[Callable[..., None]], Any]:
    """Register `parser.prog` as a gdb command whose help is the parser's. Argument errors and
    the harness's own errors become gdb errors (the session goes on); commands that move the
    guest are not repeated by a bare Enter."""

    def register(fn: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        name = parser.prog
        if name in _REGISTERED:
            raise ValueError(f"gdb command {name} registered twice")
        _REGISTERED.add(name)

        def invoke(self: gdb.Command, argument: str, from_tty: bool) -> None:
            if advances:
                self.dont_repeat()
            try:
                args = parser.parse_args(gdb.string_to_argv(argument))
            except core.HelpShown:
                return
            except core.UsageError as exc:
                raise gdb.GdbError(str(exc)) from None
            try:
                fn(args)
            except (core.UsageError, HilError) as exc:
                raise gdb.GdbError(str(exc)) from None

        cls = type(name.replace("-", "_"), (gdb.Command,), {"__doc__": parser.format_help(), "invoke": invoke})
        cls(name, gdb.COMMAND_USER)
        return fn

    return register


_start = core.CommandParser("hil-start", "Load the hil debug session (run once by `hil debug`) and stop "
                            "at the entry of the guest function of its op.")  # fmt: skip


@hil_command(_start, advances=True)
def _cmd_start(args: argparse.Namespace) -> None:
    global _DBG
    if _DBG is not None:
        raise core.DebugInputError("the hil debug session is already loaded")
    path = os.environ.get(ENV_CONTEXT)
    if not path:
        raise core.DebugInputError(f"{ENV_CONTEXT} is not set: start gdb through `hil debug TRACE`")
    try:
        with open(path, encoding="utf-8") as fh:
            ctx = core.Context.from_json(json.load(fh))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise core.DebugInputError(f"cannot read the hil debug context {path}: {exc}") from None
    _DBG = d = Debugger(ctx)
    chain = d.enter_op()
    recorded = d.trace.records[d.index]
    print(f"hil debug: stopped before op {d.index} {d.op()!r} in {chain}")
    if recorded.result is not None:
        print(f"recorded: {recorded.result!r}")
    for f in recorded.findings:
        print(f"recorded: {f.describe()}")
    if d.trace.header.get("description") and d.index == len(d.trace.records) - 1:
        print(f"this minimal trace was shrunk for (op numbers of its original run): {d.trace.header['description']}")
    print("commands: hil-pt [VS [VA]], hil-slot PADDR, hil-diff, hil-step, hil-ops, hil-disas [ADDR] (help hil-pt...)")


_pt = core.CommandParser("hil-pt", "The page table as the harness reads it: without arguments every VmSpace; "
                         "with VS its mappings; with VS and VA the per-level walk of VA (each entry, its decoded "
                         "flags, where the walk stopped). VS: a VmSpace id, 'kernel' or 'cr3'.")  # fmt: skip
_pt.add_argument("vs", nargs="?")
_pt.add_argument("va", nargs="?", type=core.parse_int)


@hil_command(_pt)
def _cmd_pt(args: argparse.Namespace) -> None:
    d = dbg()
    now = d.now()
    cr3 = _reg("cr3")
    if args.vs is None:
        print(core.pt_overview(now, cr3))
        return
    label, root = core.resolve_root(now, args.vs, cr3)
    if args.va is None:
        if not label.startswith("vs "):
            raise core.UsageError(f"hil-pt {args.vs}: give a VA to walk (the mapping list is per VmSpace)")
        print(core.pt_mappings(now, core.parse_int(args.vs)))
        return
    print(core.pt_walk(d.mem, label, root, args.va & MASK64))


_slot = core.CommandParser(
    "hil-slot",
    "The decoded metadata slot of PADDR: before the op, in the guest now, and "
    "as the model expects it after the op ('!' marks a field where guest and model differ).",
)
_slot.add_argument("paddr", type=core.parse_int)


@hil_command(_slot)
def _cmd_slot(args: argparse.Namespace) -> None:
    d = dbg()
    now = d.now()
    print(core.slot_table(args.paddr, d.before, now, core.predict(d.before, now, d.op())))


_diff = core.CommandParser(
    "hil-diff",
    "The findings the checker would report if the op in progress ended now "
    "(guest vs model, the spec clauses of the op, the invariants).",
)


@hil_command(_diff)
def _cmd_diff(args: argparse.Namespace) -> None:
    d = dbg()
    d._require_op()
    now = d.now()
    found = core.findings_if_ended_now(d.index, d.op(), d.before, now, core.predict(d.before, now, d.op()))
    print(f"if op {d.index} {d.op()!r} ended now:")
    print(core.format_findings(found))


_step = core.CommandParser(
    "hil-step",
    "Finish the op in progress, run every check on it, print its findings, "
    "and stop at the entry of the next op's guest function.",
)


@hil_command(_step, advances=True)
def _cmd_step(args: argparse.Namespace) -> None:
    dbg().step()


_ops = core.CommandParser("hil-ops", "The trace around the op in progress, with results and findings.")
_ops.add_argument("--around", type=int, default=5, help="events before and after (default 5)")


@hil_command(_ops)
def _cmd_ops(args: argparse.Namespace) -> None:
    d = dbg()
    events = [r.event for r in d.trace.records]
    note = "(next; needs a reboot)" if d.needs_reboot else "(in progress)"
    print(core.ops_listing(events, d.runner.records, d.trace.records, d.index, max(0, args.around), note))


_disas = core.CommandParser(
    "hil-disas",
    "Capstone disassembly around ADDR, or around the RIP of the CPU exception this op raised, or around RIP.",
)
_disas.add_argument("addr", nargs="?", type=core.parse_int)


@hil_command(_disas)
def _cmd_disas(args: argparse.Namespace) -> None:
    d = dbg()
    if args.addr is not None:
        addr = args.addr & MASK64
    elif d.exception is not None:
        addr = d.exception["frame"]["rip"]
    else:
        addr = _reg("pc")
    print("\n".join(d.elf.disassemble_around(addr)))
