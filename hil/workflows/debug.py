"""`hil debug TRACE [--at N | --finding K] [--batch CMDS]`: stand in gdb right before one op.

Boots the trace's guest image and profile through Session, replays events 0..N-1 with every
check through the Runner (a difference from the recorded results is an error: the trace does
not replay identically), writes op N into the mailbox, lets the harness's own gdb client go
(QEMU's stub serves one client at a time), and runs a real gdb as a child on the terminal with
the guest's symbols and source, hil/workflows/gdb_commands.py sourced, stopped at the entry of
the guest function that implements op N. When gdb exits, QEMU is ended by PID and its files
removed (no exec: someone must still end QEMU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hil.check import oracles
from hil.errors import timeout_scale
from hil.run.runner import Runner
from hil.run.session import Session
from hil.run.trace import read_trace
from hil.target import abi
from hil.target.machine import DEFAULT_IMAGE, REPO, Profile
from hil.target.proc import die_with_parent, end_process
from hil.workflows import debug_core as core
from model import ops as m

GDB_BINARY = "gdb"
GDB_SCRIPT = Path(__file__).with_name("gdb_commands.py")
GUEST_SRC = REPO / "guest"
BATCH_DEADLINE_S = 300.0
EXIT_OK, EXIT_USAGE = 0, 2


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("debug", help="stop in gdb right before one op of a trace",
                              description="Replay a trace up to op N (all checks), then hand the terminal to gdb "
                                          "stopped at the entry of the guest function of op N, with the hil-* "
                                          "commands loaded.")  # fmt: skip
    p.add_argument("trace")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--at", type=int, metavar="N", help="stop before event N")
    which.add_argument("--finding", type=int, metavar="K", help="stop before the op of the K-th finding (0, the first, "
                                                                "is the default)")  # fmt: skip
    p.add_argument("--batch", metavar="CMDS", help="run these gdb commands (separated by ';') without a terminal, "
                                                   "print their output, quit")  # fmt: skip
    p.add_argument("--image", help="guest ELF (default: the trace's)")
    p.add_argument("--profile", help="machine profile (default: the trace's)")
    p.set_defaults(fn=cmd_debug)


def gdb_env(context: Path) -> dict[str, str]:
    """gdb's embedded Python (Debian gdb 13: 3.11, as ours) imports the harness from the repo
    and its dependencies from our environment's site-packages (an editable install's .pth is
    not read from PYTHONPATH, so the repo goes first)."""
    paths = [str(REPO), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    old = os.environ.get("PYTHONPATH")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + ([old] if old else [])))
    env["HIL_DEBUG_CONTEXT"] = str(context)
    return env


def gdb_argv(image: Path, socket: Path, batch: list[str] | None) -> list[str]:
    argv = [GDB_BINARY, "-q", "-nx"]
    if batch is not None:
        argv += ["-batch", "-ex", "set pagination off"]
    # QEMU 7.2 sends the 64-bit register layout: gdb must think x86-64 (NOTES)
    argv += ["-ex", "set architecture i386:x86-64", "-ex", f"file {image}", "-ex", f"target remote {socket}",
             "-ex", f"source {GDB_SCRIPT}", "-ex", "hil-start"]  # fmt: skip
    for cmd in batch or []:
        argv += ["-ex", cmd]
    return argv


def split_batch(cmds: str) -> list[str]:
    out = [c.strip() for c in cmds.split(";") if c.strip()]
    if not out:
        raise core.DebugInputError("--batch: no commands")
    return out


def _gdb_preexec() -> None:
    # the terminal's Ctrl-C is gdb's (it interrupts the guest): default handling in gdb,
    # while hil ignores it; gdb dies with us
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    die_with_parent()


def _hang_up(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_debug(args: argparse.Namespace) -> int:
    trace_path = Path(args.trace)
    trace = read_trace(trace_path)
    name = str(trace_path)
    index = core.select_index(trace, args.at, args.finding, name)
    batch = split_batch(args.batch) if args.batch is not None else None
    if shutil.which(GDB_BINARY) is None:
        raise core.DebugInputError(f"{GDB_BINARY} not found on PATH (scripts/setup installs it)")
    image = Path(args.image or trace.header.get("image") or DEFAULT_IMAGE)
    profile_arg = args.profile or trace.header.get("profile", "default")
    profile = Profile.load(profile_arg)
    session = Session(image=image, profile=profile)
    recorded_build = trace.header.get("guest_build_id")
    if recorded_build not in (None, session.elf.build_id):
        raise core.DebugInputError(f"{name} was recorded on guest build {recorded_build}, {image} is build "
                                   f"{session.elf.build_id}: debug it with that image (--image)")  # fmt: skip
    op = trace.records[index].event
    assert isinstance(op, m.Op)  # select_index refuses a Poke
    core.implementing_functions(type(op), GUEST_SRC)  # no guest source / dispatcher: say so before booting
    gdb_proc: subprocess.Popen[bytes] | None = None
    # the terminal closed: end gdb and QEMU as on SIGTERM (hil's main handles the interrupt)
    old_hup = signal.signal(signal.SIGHUP, _hang_up)
    try:
        runner = Runner(session)
        runner.start()
        for rec in trace.records[:index]:
            new = runner.step(rec.event)
            diff = core.recorded_difference(rec, new)
            if diff is not None:
                raise core.DebugInputError(f"{name} does not replay identically: {diff}")
        found = sum(len(r.findings) for r in runner.records)
        compared = sum(1 for r in trace.records[:index] if r.result is not None)
        same = f"identical to the {compared} recorded" if compared else "the trace records no results to compare"
        done = (
            f"replayed events 0..{index - 1} of {name} with every check ({found} findings; {same})"
            if index
            else f"{name}: nothing to replay before op 0"
        )
        print(f"hil debug: {done}; op {index} {op!r} is in the mailbox", file=sys.stderr)
        machine, memory, layout = session.machine, session.memory, session.layout
        assert machine is not None and memory is not None and layout is not None and runner.state is not None
        seq = abi.decode_response(memory.read(layout.mailbox, abi.MAILBOX_SIZE)).seq + 1
        # the op's MMU probes go in with its request, as the Runner writes them
        probes = core.PlannedProbes(oracles.MmuProbes(memory, layout))
        if runner.probes is not None:
            probes.arm(runner.state, op)
        view = core.PlannedView(runner.qemu) if runner.qemu is not None else None
        if view is not None:
            view.arm(index, runner.state, op)
        req = abi.encode_request(op, seq)
        memory.write(layout.mailbox + 8, req[8:])
        memory.write(layout.mailbox, req[:8])  # seq last: the guest never sees a torn request
        pickle_path = machine.run_dir / "debug-state.pickle"
        with open(pickle_path, "wb") as fh:
            saved = {"before": dataclasses.replace(runner.state, parent=None), "records": runner.records,
                     "probe_plan": probes.pending, "probes": runner.probes is not None, "qemu": None}  # fmt: skip
            if view is not None:
                # the QEMU oracle goes on in step with the run: its sampling state, and the HMP
                # monitor of this machine (found again by its tag)
                q = view.real
                saved["qemu"] = {"every": q.every, "rng": q.rng.getstate(), "checks": q.checks, "pending": view.pending,
                                 "last": (q.last_index, q.last_lines),
                                 "tag": machine.tag, "profile": profile_arg}  # fmt: skip
            pickle.dump(saved, fh)
        ctx = core.Context(
            trace=str(trace_path.resolve()), index=index, seq=seq, image=str(image.resolve()),
            src_dir=str(GUEST_SRC), shm_path=str(machine.shm_path), ram_size=layout.ram_size,
            layout=dataclasses.asdict(layout), op_done=session.elf.symbol("hil_op_done"),
            exception_handler=session.elf.symbol("exception_handler"),
            state_pickle=str(pickle_path), gdb_socket=str(machine.gdb_socket),
        )  # fmt: skip
        ctx_path = machine.run_dir / "debug-context.json"
        ctx_path.write_text(json.dumps(ctx.to_json()))
        session.release_debugger()
        argv = gdb_argv(image.resolve(), machine.gdb_socket, batch)
        if batch is None:
            print(f"hil debug: {shlex.join(argv)}", file=sys.stderr)
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            gdb_proc = subprocess.Popen(argv, env=gdb_env(ctx_path), preexec_fn=_gdb_preexec)
            try:
                # a person has no deadline; a batch run does
                rc = gdb_proc.wait(timeout=BATCH_DEADLINE_S * timeout_scale() if batch is not None else None)
            except subprocess.TimeoutExpired:
                limit = BATCH_DEADLINE_S * timeout_scale()
                raise machine.infra(f"gdb --batch did not finish within {limit:.0f} s") from None
        finally:
            signal.signal(signal.SIGINT, old_int)
        if rc != 0:
            print(f"hil debug: gdb exited with status {rc} (in --batch: the last command failed)", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK
    finally:
        try:
            if gdb_proc is not None:
                proc = gdb_proc
                end_process(proc, 2.0, lambda: os.kill(proc.pid, signal.SIGTERM))
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            session.close()
            signal.signal(signal.SIGHUP, old_hup)
