"""The pure core of `hil debug` (hil/workflows/debug_core.py): no gdb, no QEMU. Page tables are
hand-built in DictMemory; states come from the model's boot state."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from hil.check import Finding, Kind
from hil.run.trace import Poke, Record, Trace
from hil.target import abi
from hil.target.memory import DictMemory
from hil.workflows import debug_core as core
from model import ops as m
from model.store import boot_layout, initial_state
from model.types import REF_COUNT_UNUSED

REPO = Path(__file__).resolve().parents[2]
P, RW, US, A = 0x1, 0x2, 0x4, 0x20
TABLE = P | RW | US
RAM = 16 << 20


# --- which guest function -----------------------------------------------------------------------


def test_every_op_resolves_to_a_guest_function_from_the_real_dispatcher() -> None:
    funcs = core.guest_functions(REPO / "guest")
    for spec in abi.OP_SPECS:
        chain = core.implementing_functions(spec.cls, REPO / "guest")
        assert chain[0] == "dispatch"
        assert all(f in funcs for f in chain), (spec.cls.__name__, chain)
    by_op = {
        m.Map: ["dispatch", "op_cursor", "op_map"],
        m.Unmap: ["dispatch", "op_cursor", "op_unmap"],
        m.Query: ["dispatch", "op_cursor", "op_query"],
        m.NewVmSpace: ["dispatch", "op_vm_space"],
        m.FrameFromUnused: ["dispatch", "op_frame"],  # done inside op_frame's case
        m.DropCursor: ["dispatch", "op_cursor"],
        m.RaiseFault: ["dispatch", "op_raise_fault"],
        m.Nop: ["dispatch"],
    }
    for cls, want in by_op.items():
        assert core.implementing_functions(cls, REPO / "guest") == want


def test_only_a_case_ending_in_a_tail_call_hands_the_op_on(tmp_path: Path) -> None:
    (tmp_path / "d.c").write_text(
        textwrap.dedent("""\
        static u64 dispatch(u64 op) {
            switch (op) {
            case HIL_OP_MAP:   /* two labels, one body */
            case HIL_OP_UNMAP:
                return op_cursor(op);
            case HIL_OP_FRAME_DROP:
                return op_frame(op);
            default:
                return HIL_ERR_UNKNOWN_OP;
            }
        }
        u64 op_cursor(u64 op) {
            switch (op) {
            case HIL_OP_MAP:
                if (bad())
                    return report_error(op);
                return op_map(&c, a1);
            case HIL_OP_UNMAP: {
                if (x)
                    return helper(1);
                return 0;
            }
            }
            return 0;
        }
        u64 op_frame(u64 op) { return 0; }
        static u64 op_map(u64 c, u64 a1) { return 0; }
        u64 helper(u64 x) { return x; }
        u64 report_error(u64 op) { return 1; }
        """)
    )
    assert core.implementing_functions(m.Map, tmp_path) == ["dispatch", "op_cursor", "op_map"]
    # an early `return helper(...)` on an error path is not where the op is implemented
    assert core.implementing_functions(m.Unmap, tmp_path) == ["dispatch", "op_cursor"]
    assert core.implementing_functions(m.FrameDrop, tmp_path) == ["dispatch", "op_frame"]
    assert core.implementing_functions(m.Query, tmp_path) == ["dispatch"]
    with pytest.raises(core.DebugInputError, match="no dispatcher"):
        core.implementing_functions(m.Map, tmp_path, root="nope")


# --- which op ---------------------------------------------------------------------------------


def _finding(index: int, clause: str = "MAP-2") -> Finding:
    return Finding(Kind.SPEC, index, clause, "rc")


def _trace(events: list[object], findings: dict[int, list[Finding]] | None = None, **header: object) -> Trace:
    findings = findings or {}
    recs = [Record(i, e, m.OpResult.ok(), findings.get(i, [])) for i, e in enumerate(events)]  # type: ignore[arg-type]
    return Trace({"type": "header", **header}, recs, {"status": "complete"})


def test_select_index_at_finding_and_minimal_traces() -> None:
    ops: list[object] = [m.NewVmSpace(), m.Nop(1), m.Nop(2), m.Nop(3)]
    t = _trace(ops, {1: [_finding(1)], 3: [_finding(3, "MAP-3"), _finding(3, "MAP-7")]})
    assert core.select_index(t, 2, None) == 2
    assert core.select_index(t, None, None) == 1  # the first finding by default
    assert core.select_index(t, None, 1) == 3
    assert core.select_index(t, None, 2) == 3
    # a shrunk trace: no per-op findings, the header's finding is produced by the last event
    shrunk = _trace(ops, finding=["SPEC", "MAP-2", "rc"])
    assert core.select_index(shrunk, None, None) == 3


@pytest.mark.parametrize(
    ("at", "finding", "message"),
    [
        (4, None, r"--at 4: T has events 0\.\.3"),
        (-1, None, r"--at -1: T has events 0\.\.3"),
        (None, 3, r"--finding 3: T has 3 finding\(s\), 0\.\.2"),
        (None, -1, r"--finding -1"),
        (2, None, "event 2 of T is a Poke, not an op"),
    ],
)
def test_select_index_refuses_bad_input(at: int | None, finding: int | None, message: str) -> None:
    ops: list[object] = [m.NewVmSpace(), m.Nop(1), Poke(0x1000, b"\0"), m.Nop(3)]
    t = _trace(ops, {1: [_finding(1)], 3: [_finding(3), _finding(3)]})
    with pytest.raises(core.DebugInputError, match=message):
        core.select_index(t, at, finding, "T")


def test_select_index_without_findings_or_events() -> None:
    with pytest.raises(core.DebugInputError, match="has no findings"):
        core.select_index(_trace([m.Nop(1)]), None, None, "T")
    with pytest.raises(core.DebugInputError, match="has no events"):
        core.select_index(_trace([]), 0, None, "T")
    with pytest.raises(core.DebugInputError, match="minimal trace with one finding"):
        core.select_index(_trace([m.Nop(1)], finding=["SPEC", "X", "y"]), None, 1, "T")


def test_recorded_difference() -> None:
    rec = Record(4, m.Nop(1), m.OpResult.ok(value=1), [_finding(4)])
    assert core.recorded_difference(rec, dataclasses.replace(rec)) is None
    other = core.recorded_difference(rec, Record(4, m.Nop(1), m.OpResult.ok(value=2), [_finding(4)]))
    assert other is not None and "op 4" in other and "value=0x2" in other
    fewer = core.recorded_difference(rec, Record(4, m.Nop(1), m.OpResult.ok(value=1), []))
    assert fewer is not None and "MAP-2" in fewer
    # a shrunk trace records no result: nothing to compare
    assert core.recorded_difference(Record(4, m.Nop(1), None, []), rec) is None


# --- the command parser --------------------------------------------------------------------------


def test_command_parser_raises_instead_of_exiting() -> None:
    p = core.CommandParser("hil-x", "test")
    p.add_argument("paddr", type=core.parse_int)
    assert p.parse_args(["0x1_000"]).paddr == 0x1000
    assert p.parse_args(["4096"]).paddr == 4096
    with pytest.raises(core.UsageError, match="hil-x: .*not an integer"):
        p.parse_args(["zz"])
    with pytest.raises(core.UsageError, match="hil-x: the following arguments are required"):
        p.parse_args([])
    with pytest.raises(core.UsageError, match="unrecognized"):
        p.parse_args(["1", "2"])
    with pytest.raises(core.HelpShown):
        p.parse_args(["-h"])


# --- hil-pt -----------------------------------------------------------------------------------


def test_pt_walk_on_hand_built_tables() -> None:
    mem = DictMemory(RAM)
    root, l3, l2, l1 = 0x1000, 0x2000, 0x3000, 0x4000
    va = (1 << 39) | (2 << 30) | (3 << 21) | (4 << 12) | 0x123
    mem.write_u64(root + 8 * 1, l3 | TABLE)
    mem.write_u64(l3 + 8 * 2, l2 | TABLE)
    mem.write_u64(l2 + 8 * 3, l1 | TABLE)
    mem.write_u64(l1 + 8 * 4, 0x9000 | P | US | A)
    out = core.pt_walk(mem, "vs 1", root, va).splitlines()
    assert out[0] == f"vs 1: va {va:#x} root {root:#x}:"
    assert out[1] == f"  L4 entry @{root + 8:#x} = {l3 | TABLE:#018x} [P RW US]"
    assert out[4] == f"  L1 entry @{l1 + 32:#x} = {0x9000 | P | US | A:#018x} [P US A]"
    assert out[5] == "  -> pa 0x9123 (4 KiB page, ur-x)"
    # where it stops: the L2 entry of another index is empty
    stop = core.pt_walk(mem, "vs 1", root, va + (1 << 21)).splitlines()
    assert stop[-1] == "  -> not_present at L2"
    with pytest.raises(core.UsageError, match="non-canonical"):
        core.pt_walk(mem, "vs 1", root, 1 << 47)


def test_resolve_root_and_overview() -> None:
    s = initial_state(RAM)
    assert core.resolve_root(s, "kernel") == ("kernel", s.kernel_root)
    assert core.resolve_root(s, "cr3", 0x5018) == ("cr3", 0x5000)
    with pytest.raises(core.UsageError, match="no VmSpace 7 in the guest now"):
        core.resolve_root(s, "7")
    with pytest.raises(core.UsageError, match="VS must be"):
        core.resolve_root(s, "seven")
    assert "no VmSpace" in core.pt_overview(s)


# --- hil-slot and hil-diff on the model's boot state ---------------------------------------------------


def test_slot_table_and_findings_if_the_op_ended_now() -> None:
    before = initial_state(RAM)
    paddr = boot_layout(RAM).data_pool_start
    op = m.FrameFromUnused(paddr)
    pred = core.predict(before, before, op)
    assert pred.state is not None and pred.result is not None
    # at the op's entry the guest has changed nothing: the slot differs from the model's expectation
    table = core.slot_table(paddr, before, before, pred).splitlines()
    assert table[0] == f"slot {paddr // 4096} (paddr {paddr:#x})"
    rc_row = next(r for r in table if r.split()[1:2] == ["rc"])
    assert rc_row.startswith("! ") and rc_row.split()[2:] == [hex(REF_COUNT_UNUSED)] * 2 + ["1"]
    found = core.findings_if_ended_now(5, op, before, before, pred)
    assert {(f.kind, f.clause, f.field, f.slot) for f in found} >= {(Kind.IMPL, "SLOT", "rc", paddr // 4096)}
    assert all(f.op_index == 5 for f in found)
    # had the guest done what the model says, nothing would be reported
    assert core.findings_if_ended_now(5, op, before, pred.state, pred) == []
    done = core.slot_table(paddr, before, pred.state, pred).splitlines()
    assert not any(r.startswith("! ") for r in done)
    with pytest.raises(core.UsageError, match="has no metadata slot"):
        core.slot_table(RAM, before, before, pred)


def test_ops_listing_marks_the_op_in_progress() -> None:
    events: list[object] = [m.Nop(i) for i in range(10)]
    done = [Record(i, m.Nop(i), m.OpResult.ok(value=i), []) for i in range(6)]
    done[5].findings.append(_finding(5))
    recorded = [Record(i, m.Nop(i), m.OpResult.ok(value=i), [_finding(6)] if i == 6 else []) for i in range(10)]
    out = core.ops_listing(events, done, recorded, 6, around=2).splitlines()
    assert out[0].split()[0] == "4"
    assert "[SPEC] op 5 MAP-2 rc" in out[2]
    assert out[3].startswith("=>") and out[3].rstrip().endswith("(in progress)")
    assert out[4].strip() == "recorded: OpResult.ok(value=0x6)"
    assert out[5].strip().startswith("recorded: [SPEC] op 6 MAP-2")
    assert out[-2].split()[0] == "8" and out[-1].strip() == "recorded: OpResult.ok(value=0x8)"


def test_context_round_trips_through_json() -> None:
    lay = abi.Layout(**{name: i for i, name in enumerate(abi.LAYOUT_FIELDS)})
    ctx = core.Context("t.jsonl", 3, 9, "k.elf", "guest", "/dev/shm/x", 64 << 20, dataclasses.asdict(lay), 0x10,
                       0x20, "s.pickle", "gdb.sock")  # fmt: skip
    again = core.Context.from_json(ctx.to_json())
    assert again == ctx and again.abi_layout() == lay
