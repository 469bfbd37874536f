"""`hil debug` on the real guest: an interactive gdb driven through pexpect as a person would,
--batch on a CPU exception, `hil run`'s summary line to gdb in one command, and bad input.

Every expectation is computed here, independently, from a separate Session + Runner replaying
the same trace (its snapshot, its model prediction, its findings): the gdb commands must show
what that run read from guest memory and what the model predicted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from hil.errors import timeout_scale
from hil.observe.snapshot import translate
from hil.run.runner import QEMU_EVERY, Runner
from hil.run.session import Session
from hil.run.trace import TraceWriter, read_trace
from hil.target.machine import DEFAULT_IMAGE, leftover_files, leftover_gdbs, leftover_processes
from model import ops as m
from model.store import apply
from model.types import PageProperty

REPO = Path(__file__).resolve().parents[2]
HIL = str(Path(sys.executable).with_name("hil"))
MAP2 = REPO / "tests" / "data" / "findings" / "spec-MAP-2.jsonl"
PROMPT = "(gdb) "
DATA = 0x75B000  # a free data frame at boot (the one spec-MAP-2.jsonl maps)
RUN_TAG = os.environ["HIL_RUN_TAG"]  # set by tests/conftest.py for the whole session


def _census() -> tuple[list[int], list[int], list[Path]]:
    return leftover_processes(RUN_TAG), leftover_gdbs(RUN_TAG), leftover_files(RUN_TAG)


def _reference(events: list[m.Op], upto: int) -> tuple[Session, Runner]:
    """A separate booted run of events 0..upto-1 (the caller closes the session)."""
    session = Session()
    runner = Runner(session)
    runner.start()
    for e in events[:upto]:
        runner.step(e)
    return session, runner


def _no_ad(walk: str) -> str:
    """A walk's text without the Accessed / Dirty bits the MMU sets as it walks."""
    walk = re.sub(r"0x([0-9a-f]{16})", lambda mo: f"0x{int(mo.group(1), 16) & ~0x60:016x}", walk)
    return re.sub(r" [AD](?=[\] ])", "", walk)


class Gdb:
    """A person at gdb's prompt: type a line, read what it printed up to the next prompt."""

    def __init__(self, child: pexpect.spawn):
        self.child = child

    def run(self, line: str) -> str:
        self.child.sendline(line)
        self.child.expect_exact(PROMPT)
        text = self.child.before.replace("\r", "")
        first, _, rest = text.partition("\n")  # the terminal's echo of the line
        assert first.strip() == line
        return rest


def test_interactive_debug_session_before_a_spec_finding(tmp_path: Path) -> None:
    trace = read_trace(MAP2)
    events = [r.event for r in trace.records]
    n = len(events) - 1  # the minimal trace's finding comes from its last op
    op = events[n]
    assert isinstance(op, m.Map)
    census = _census()

    # --- the expectations, from an independent run of the same ops -------------------------------
    session, runner = _reference(events, n)  # type: ignore[arg-type]
    try:
        assert session.memory is not None and runner.state is not None
        before = runner.state
        root = before.vm_spaces[1].root
        walk_before = translate(session.memory, root, 0)
        old_frame = walk_before.pa
        assert old_frame == 0x75B000
        pred_result, pred = apply(before, op, lambda level: 0)
        rec = runner.step(op)
        walk_after = translate(session.memory, root, 0)
        expected_findings = [f.describe() for f in rec.findings]
        assert any(f.clause == "MAP-2" for f in rec.findings)
    finally:
        session.close()

    # --- a person: hil debug TRACE, then each command at the gdb prompt ------------------------------
    env = dict(os.environ, TERM="dumb")
    child = pexpect.spawn(HIL, ["debug", str(MAP2)], cwd=str(REPO), env=env, encoding="utf-8",
                          timeout=60 * timeout_scale(), dimensions=(500, 400))  # fmt: skip
    try:
        child.expect_exact(PROMPT)
        banner = child.before.replace("\r", "")
        # stopped at the entry of the guest function of op N, with symbols and source
        assert re.search(r"Temporary breakpoint \d+, op_map \(.*\) at mm/page_table/cursor\.c:\d+", banner), banner
        assert f"hil debug: stopped before op {n} {op!r} in dispatch -> op_cursor -> op_map" in banner
        g = Gdb(child)
        assert g.run("frame").startswith("#0  op_map (")

        # the commands' help is their parser's
        assert "usage: hil-slot [-h] paddr" in g.run("help hil-slot")

        # hil-pt: the overview, the VmSpace's mappings, and the per-level walk of VA 0 as the
        # reference read them
        overview = g.run("hil-pt")
        assert f"vs 1: root {root:#x}, {len(before.vm_spaces[1].nodes)} nodes, 1 mappings, cursor 2" in overview
        maps = g.run("hil-pt 1").splitlines()
        want = before.vm_spaces[1].mappings()
        assert len(maps) == 1 + len(want) and all(f"-> {mp.paddr:#x}  L{mp.level}  pte {mp.pte:#018x}" in maps[k + 1]
                                                  for k, mp in enumerate(want[va] for va in sorted(want)))  # fmt: skip
        # A/D aside: the guest stopped inside the op, after the probes' touches walked VA 0
        assert _no_ad(g.run("hil-pt 1 0").strip()) == _no_ad(f"vs 1: {walk_before.describe()}")

        # hil-slot: guest now (= before the op) and the model's expectation for the old frame
        slot = g.run(f"hil-slot {old_frame:#x}").splitlines()
        i = old_frame // 4096
        assert slot[0] == f"slot {i} (paddr {old_frame:#x})"
        rows = {r.lstrip("! ").split()[0]: r for r in slot[1:]}
        assert [int(x, 0) for x in rows["rc"].split()[-3:]] == [before.slot(i).rc, before.slot(i).rc, pred.slot(i).rc]
        assert rows["rc"].startswith("! ")  # guest and model differ until the op runs

        # hil-diff: at the op's entry the guest has changed nothing yet
        diff = g.run("hil-diff").splitlines()
        assert diff[0] == f"if op {n} {op!r} ended now:"
        assert any(f"SLOT rc @ slot {i}" in line for line in diff)
        assert any("PTE raw @ vs 1, va 0x0" in line for line in diff)

        # hil-ops: the trace around N, op N in progress
        ops = g.run("hil-ops").splitlines()
        current = next(line for line in ops if line.startswith("=>"))
        assert current.split()[1] == str(n) and current.rstrip().endswith("(in progress)")

        # hil-disas: capstone around RIP
        pc = int(g.run("p/x $pc").split("=")[1], 16)
        disas = g.run("hil-disas").splitlines()
        assert any(line.startswith(f"=> {pc:#x}:") for line in disas)

        # a bad argument is a gdb error, the session goes on
        assert "hil-slot: " in g.run("hil-slot nope")
        # Ctrl-C at the prompt is gdb's, not hil's: the session (and its QEMU) stays
        child.sendintr()
        child.expect_exact(PROMPT)
        # A/D aside: the guest stopped inside the op, after the probes' touches walked VA 0
        assert _no_ad(g.run("hil-pt 1 0").strip()) == _no_ad(f"vs 1: {walk_before.describe()}")

        # hil-step: finish the op, every check, the findings the reference run reported
        step = g.run("hil-step").splitlines()
        assert step[0] == f"op {n} {op!r} -> {rec.result!r}"
        assert step[1 : 1 + len(expected_findings)] == expected_findings
        assert "end of the trace" in step
        child.sendline("")  # Enter repeats the last command, except those that move the guest
        child.expect_exact(PROMPT)
        assert child.before.replace("\r", "").strip() == ""
        assert rec.result == pred_result  # guest and model agree: the finding is the spec's
        assert g.run("hil-pt 1 0").strip() == f"vs 1: {walk_after.describe()}"
        assert "the trace ends at op" in g.run("hil-step")

        child.sendline("quit")
        if child.expect([r"Quit anyway\? \(y or n\) ", pexpect.EOF]) == 0:
            child.sendline("y")
            child.expect(pexpect.EOF)
    finally:
        if child.isalive():  # a failed assertion: end hil debug as a closed terminal would
            child.kill(signal.SIGHUP)
            child.expect(pexpect.EOF, timeout=30 * timeout_scale())
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    assert _census() == census


def _record(path: Path, events: list[m.Op]) -> None:
    """A trace written by a checked run (results and findings recorded), as `hil run` writes it."""
    session = Session()
    writer = TraceWriter(path, {"guest_build_id": session.elf.build_id, "image": str(DEFAULT_IMAGE),
                                "profile": "default"})  # fmt: skip
    runner = Runner(session, writer)
    try:
        runner.start()
        for e in events:
            runner.step(e)
    finally:
        session.close()
        writer.close("complete")


def test_batch_stops_at_the_faulting_instruction(tmp_path: Path) -> None:
    path = tmp_path / "fault.jsonl"
    events: list[m.Op] = [m.Nop(1), m.RaiseFault(2), m.Nop(2)]
    # the guest's own report of the fault, from a separate run
    session = Session()
    try:
        session.boot()
        session.apply(events[0])
        obs = session.apply(events[1])
    finally:
        session.close()
    resp = obs.response
    assert obs.result.status == m.Status.EXCEPTION and resp.exc_vector == 14
    _record(path, events)
    census = _census()
    cmds = "hil-step; p/x $pc; p/x $cr2; hil-disas; hil-step; hil-ops"
    out = subprocess.run([HIL, "debug", str(path), "--at", "1", "--batch", cmds], cwd=REPO, capture_output=True,
                         text=True, timeout=120 * timeout_scale())  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert (f"CPU exception vector 14 #PF error code {resp.exc_error:#x} at RIP {resp.exc_rip:#x} "
            f"CR2 {resp.exc_cr2:#x} during op 1 {events[1]!r}") in text  # fmt: skip
    # stopped at the faulting instruction, with the registers it faulted with
    assert f"$1 = {resp.exc_rip:#x}" in text and f"$2 = {resp.exc_cr2:#x}" in text
    assert "\n".join(obs.disassembly) in text  # the capstone view around the faulting RIP
    assert f"op 1 {events[1]!r} -> OpResult(Status.EXCEPTION, 14, ())" in text
    assert f"quit and run hil debug {path} --at 2" in text
    assert _census() == census


def test_batch_steps_through_several_ops() -> None:
    trace = read_trace(MAP2)
    events = [r.event for r in trace.records]
    session, runner = _reference(events, len(events))  # type: ignore[arg-type]
    session.close()
    cmds = "hil-step; frame; hil-step; frame; hil-step; hil-ops --around 1"
    out = subprocess.run([HIL, "debug", str(MAP2), "--at", "5", "--batch", cmds], cwd=REPO, capture_output=True,
                         text=True, timeout=120 * timeout_scale())  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"hil debug: stopped before op 5 {events[5]!r} in dispatch -> op_cursor -> op_open" in text
    for rec in runner.records[5:]:  # each op's result and findings as the reference run checked them
        step = f"op {rec.index} {rec.event!r} -> {rec.result!r}\n"
        step += "\n".join(f.describe() for f in rec.findings) if rec.findings else "no findings"
        assert step in text
    assert f"stopped before op 6 {events[6]!r} in dispatch -> op_frame\n#0  op_frame (" in text
    assert f"stopped before op 7 {events[7]!r} in dispatch -> op_cursor -> op_map\n#0  op_map (" in text
    assert "end of the trace" in text


def test_hil_step_runs_the_sampled_qemu_oracle_and_the_mmu_probes(tmp_path: Path) -> None:
    path = tmp_path / "sampled.jsonl"
    prop = PageProperty()
    # the Runner samples QEMU's own translation at the first op with a VmSpace (op 1), then
    # QEMU_EVERY ops later (QemuTranslation.due): that op is `sampled`; the op after it, a re-map
    # of VA 0, is probed (a map where nothing translated is not: MmuProbes.plan)
    sampled = 1 + QEMU_EVERY
    events: list[m.Op] = [m.NewVmSpace(), m.OpenCursorMut(1, 0, 1 << 30), m.FrameFromUnused(DATA),
                          m.FrameFromUnused(DATA + 4096), m.Map(1, 1, prop), m.Jump(1, 0)]  # fmt: skip
    events += [m.Nop(i) for i in range(len(events), sampled)] + [m.Nop(sampled), m.Map(1, 2, prop)]
    _record(path, events)
    out = _hil_debug(str(path), "--at", str(sampled), "--batch", "hil-step; hil-step")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert re.search(rf"op {sampled} Nop\(value={sampled:#x}\) -> OpResult\.ok\(value={sampled:#x}\)\nno findings\n"
                     r"checked: model, spec clauses, invariants, QEMU's info tlb \(\d+ lines\)\n", text), text
    assert re.search(rf"op {sampled + 1} Map\(.*\) -> OpResult\.ok\(.*\)\n(.*\n)*checked: model, spec clauses, "
                     r"invariants, \d+ MMU probes\n", text), text
    assert "differs from the trace" not in text


def test_from_the_run_summary_to_gdb_in_one_command(tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    run = subprocess.run([HIL, "run", "--ops", "40", "--seed", "1", "--trace", str(trace), "--show", "none"],
                         cwd=REPO, capture_output=True, text=True, timeout=120 * timeout_scale())  # fmt: skip
    assert run.returncode == 1, run.stderr
    line = next(x for x in run.stdout.splitlines() if "hil debug" in x)
    cmd = line.split(": ", 1)[1].split()
    assert cmd == ["hil", "debug", str(trace)]
    first = read_trace(trace).findings[0]
    out = subprocess.run([HIL, *cmd[1:], "--batch", "hil-ops --around 0"], cwd=REPO, capture_output=True, text=True,
                         timeout=120 * timeout_scale())  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"hil debug: stopped before op {first.op_index} " in out.stdout
    assert f"recorded: {first.describe()}" in out.stdout


def _hil_debug(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HIL, "debug", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120 * timeout_scale())  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--at", "8"], "--at 8: {trace} has events 0..7"),
        (["--finding", "1"], "--finding 1: {trace} is a minimal trace with one finding (0)"),
    ],
)
def test_bad_index_is_one_line_exit_2(args: list[str], message: str) -> None:
    out = _hil_debug(str(MAP2), *args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"hil: {message.format(trace=MAP2)}"]


def test_other_build_and_non_identical_replay_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    _record(good, [m.Nop(1), m.Nop(2), m.Nop(3)])
    lines = good.read_text().splitlines()
    census = _census()

    other = tmp_path / "other.jsonl"
    other.write_text("\n".join([lines[0].replace('"guest_build_id": "', '"guest_build_id": "0ther')] + lines[1:]))
    out = _hil_debug(str(other), "--at", "2")
    assert out.returncode == 2
    [msg] = out.stderr.strip().splitlines()
    assert msg.startswith(f"hil: {other} was recorded on guest build 0ther") and "--image" in msg

    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(lines[:1] + [lines[1].replace('["value", 1]', '["value", 7]')] + lines[2:]))
    out = _hil_debug(str(changed), "--at", "2")
    assert out.returncode == 2
    [msg] = out.stderr.strip().splitlines()
    assert msg.startswith(f"hil: {changed} does not replay identically: op 0 Nop(value=0x1): recorded ")
    assert _census() == census  # the refused replay booted a guest: it is gone
