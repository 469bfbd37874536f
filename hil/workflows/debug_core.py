"""The pure part of `hil debug`: no gdb, no QEMU, tested on DictMemory (tests/unit/test_debug_core.py).

- which op of a trace to stop before (`select_index`), and which guest function implements it
  (`implementing_functions`, read from the dispatcher's `switch (op)` in the guest source);
- the text of the gdb commands (`hil-pt`, `hil-slot`, `hil-diff`, `hil-ops`), each a function of
  a `PhysMemory`, States and the trace, so gdb_commands.py stays a thin adapter;
- the command parser whose errors are exceptions, not exits (gdb must survive a typo).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hil import check
from hil.check import Finding, oracles
from hil.errors import ConfigError
from hil.observe.snapshot import NonCanonicalAddress, translate
from hil.run.trace import Poke, Record, Trace
from hil.target import abi
from hil.target.memory import PhysMemory
from model import ops as m
from model import store
from model.state import State

PAGE = 4096


class DebugInputError(ConfigError):
    """Bad input to `hil debug` (exit 2): a wrong index, another guest build, a trace that
    does not replay identically."""


class UsageError(Exception):
    """A gdb command's arguments are wrong (gdb shows it as an error, the session goes on)."""


class HelpShown(Exception):
    """`hil-xxx -h` printed its help: nothing else to do."""


class CommandParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting the process (gdb's Python must not exit)."""

    def __init__(self, prog: str, description: str, **kw: Any) -> None:
        super().__init__(prog=prog, description=description, add_help=True, **kw)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (usage: {self.format_usage().strip().removeprefix('usage: ')})")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status:
            raise UsageError(message or f"{self.prog}: bad arguments")
        raise HelpShown()


def parse_int(text: str) -> int:
    """Integers as a person types them in gdb: 0x..., decimal, with _ separators."""
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


# --- which op ------------------------------------------------------------------------------------


def trace_findings(trace: Trace) -> list[Finding]:
    return [f for r in trace.records for f in r.findings]


def select_index(trace: Trace, at: int | None, finding: int | None, name: str = "the trace") -> int:
    """The event index to stop before: `at`, or the op of the `finding`-th finding (0 = first,
    the default). A minimal trace written by `hil shrink` records no per-op findings, only the
    one it was shrunk for (header "finding"); delta debugging keeps no event after the one
    that produces it, so that op is the last event."""
    n = len(trace.records)
    if n == 0:
        raise DebugInputError(f"{name} has no events")
    if at is not None:
        if not 0 <= at < n:
            raise DebugInputError(f"--at {at}: {name} has events 0..{n - 1}")
        index = at
    else:
        k = 0 if finding is None else finding
        found = trace_findings(trace)
        if found:
            if not 0 <= k < len(found):
                raise DebugInputError(f"--finding {k}: {name} has {len(found)} finding(s), 0..{len(found) - 1}")
            index = found[k].op_index
        elif trace.header.get("finding"):
            if k != 0:
                raise DebugInputError(f"--finding {k}: {name} is a minimal trace with one finding (0)")
            index = n - 1
        else:
            raise DebugInputError(f"{name} has no findings (use --at N)")
        if index < 0:
            raise DebugInputError(f"--finding {k} is a boot-state finding (op {index}): there is no op to stop before")
    if isinstance(trace.records[index].event, Poke):
        raise DebugInputError(f"event {index} of {name} is a Poke, not an op: stop before an op")
    return index


def recorded_difference(rec: Record, new: Record) -> str | None:
    """Why a replayed op differs from its recorded line (None: identical). A line without a
    recorded result (a shrunk trace) has nothing to compare."""
    if rec.result is None:
        return None
    old_sig = sorted(f.signature() for f in rec.findings)
    new_sig = sorted(f.signature() for f in new.findings)
    if new.result != rec.result or old_sig != new_sig:
        return (f"op {rec.index} {rec.event!r}: recorded {rec.result!r} {old_sig}, "
                f"replayed {new.result!r} {new_sig}")  # fmt: skip
    return None


# --- which guest function implements an op --------------------------------------------------------

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_FUNC = re.compile(r"^(?:static\s+)?(?:inline\s+)?u64\s+(\w+)\s*\([^;{)]*\)\s*\{", re.M)
_LABEL = re.compile(r"\bcase\s+(HIL_OP_\w+)\s*:|\bdefault\s*:")
_TAIL_CALL = re.compile(r"return\s+(\w+)\s*\([^;]*\)\s*;$")


def op_macro(op_cls: type[m.Op]) -> str:
    return f"HIL_OP_{op_cls.NAME.upper()}"


def _block(text: str, open_at: int) -> str:
    """The text inside the braces that open at `open_at`."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    raise ValueError("unbalanced braces")


def guest_functions(src_dir: Path) -> dict[str, str]:
    """Bodies of the guest's `u64 name(...)` functions (the op handlers' shape)."""
    out: dict[str, str] = {}
    for path in sorted(src_dir.rglob("*.c")):
        text = _COMMENT.sub(" ", path.read_text(encoding="utf-8", errors="replace"))
        for mt in _FUNC.finditer(text):
            out.setdefault(mt.group(1), _block(text, mt.end() - 1))
    return out


def _case_body(body: str, macro: str) -> str | None:
    """The statements of the `case macro:` group of the function's `switch (op)`."""
    sw = re.search(r"switch\s*\(\s*op\s*\)\s*\{", body)
    if sw is None:
        return None
    inner = _block(body, sw.end() - 1)
    labels = list(_LABEL.finditer(inner))
    for i, lab in enumerate(labels):
        if lab.group(1) != macro:
            continue
        j = i
        # consecutive labels share one body
        while j + 1 < len(labels) and not inner[labels[j].end() : labels[j + 1].start()].strip():
            j += 1
        end = labels[j + 1].start() if j + 1 < len(labels) else len(inner)
        return inner[labels[j].end() : end]
    return None


def implementing_functions(op_cls: type[m.Op], src_dir: Path, root: str = "dispatch") -> list[str]:
    """The chain of guest functions from the dispatcher to the one that implements `op_cls`,
    outermost first, e.g. Map -> ["dispatch", "op_cursor", "op_map"]. A case whose last
    statement is `return f(...)` hands the op to f; otherwise the op is done in place."""
    funcs = guest_functions(src_dir)
    if root not in funcs:
        raise DebugInputError(f"no dispatcher {root}() in the guest source under {src_dir}")
    macro = op_macro(op_cls)
    chain = [root]
    while len(chain) < 8:
        case = _case_body(funcs[chain[-1]], macro)
        if case is None:
            break
        tail = _TAIL_CALL.search(case.strip().rstrip("}").rstrip())
        if tail is None or tail.group(1) not in funcs or tail.group(1) in chain:
            break
        chain.append(tail.group(1))
    return chain


# --- hil-pt -----------------------------------------------------------------------------------------


def resolve_root(state: State, vs: str, cr3: int | None = None) -> tuple[str, int]:
    """A VmSpace id, `kernel`, or `cr3` (the root the CPU uses now) -> (label, root paddr)."""
    if vs == "kernel":
        return "kernel", state.kernel_root
    if vs == "cr3":
        if cr3 is None:
            raise UsageError("hil-pt: CR3 is not known")
        return "cr3", cr3 & ~0xFFF
    try:
        ident = parse_int(vs)
    except argparse.ArgumentTypeError:
        raise UsageError(f"hil-pt: VS must be a VmSpace id, 'kernel' or 'cr3', not {vs!r}") from None
    if ident in state.vm_spaces:
        return f"vs {ident}", state.vm_spaces[ident].root
    if ident in state.leaked:
        return f"vs {ident} (dropped, leaked)", state.leaked[ident].root
    known = ", ".join(str(v) for v in sorted(state.vm_spaces)) or "none"
    raise UsageError(f"hil-pt: no VmSpace {ident} in the guest now (live: {known})")


def pt_overview(state: State, cr3: int | None = None) -> str:
    lines = [f"kernel root {state.kernel_root:#x}" + (f"; CR3 now {cr3:#x}" if cr3 is not None else "")]
    if not state.vm_spaces and not state.leaked:
        lines.append("no VmSpace")
    for vs, view in state.vm_spaces.items():
        cur = f", cursor {view.cursor}" if view.cursor else ""
        lines.append(f"vs {vs}: root {view.root:#x}, {len(view.nodes)} nodes, {len(view.mappings())} mappings{cur}")
    for vs, view in state.leaked.items():
        lines.append(f"vs {vs} (dropped, leaked): root {view.root:#x}, {len(view.mappings())} mappings")
    return "\n".join(lines)


def pt_mappings(state: State, vs: int) -> str:
    view = state.vm_spaces.get(vs) or state.leaked.get(vs)
    if view is None:
        raise UsageError(f"hil-pt: no VmSpace {vs}")
    maps = view.mappings()
    lines = [f"vs {vs} root {view.root:#x}: {len(maps)} mappings (user half), {len(view.nodes)} nodes"]
    for va in sorted(maps):
        mp = maps[va]
        size = PAGE << (9 * (mp.level - 1))
        lines.append(f"  {va:#018x}-{va + size:#018x} -> {mp.paddr:#x}  L{mp.level}  pte {mp.pte:#018x}"
                     f"  path {list(mp.path)}")  # fmt: skip
    return "\n".join(lines)


def pt_walk(mem: PhysMemory, label: str, root: int, va: int) -> str:
    try:
        walk = translate(mem, root, va)
    except NonCanonicalAddress as exc:
        raise UsageError(f"hil-pt: {exc}") from None
    return f"{label}: " + walk.describe()


# --- hil-slot ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """The model's expectation for the op in progress, from the state before it."""

    result: m.OpResult | None  # None: the model does not predict this op (Probe, RaiseFault)
    state: State | None


def predict(before: State, now: State, op: m.Op) -> Prediction:
    try:
        result, state = store.apply(before, op, check.alloc_from(before, now))
    except store.Unpredictable:
        return Prediction(None, None)
    return Prediction(result, state)


def _fmt(value: object) -> str:
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:#x}" if value > 9 else str(value)
    if isinstance(value, frozenset):
        return "{" + ", ".join(str(list(p)) for p in sorted(value)) + "}"
    return str(value)


def slot_table(paddr: int, before: State, now: State, pred: Prediction) -> str:
    index = paddr // PAGE
    if not 0 <= index < now.nr_slots:
        raise UsageError(f"hil-slot: {paddr:#x} has no metadata slot (RAM has {now.nr_slots} slots)")
    b, g = before.slot(index), now.slot(index)
    mo = pred.state.slot(index) if pred.state is not None else None
    lines = [f"slot {index} (paddr {index * PAGE:#x})" + ("" if paddr % PAGE == 0 else f" holding {paddr:#x}")]
    rows = [("field", "before op", "guest now", "model after op" if mo is not None else "model (no prediction)")]
    for name in check.SLOT_FIELDS:
        gv = getattr(g, name)
        mv = getattr(mo, name) if mo is not None else "-"
        rows.append((name, _fmt(getattr(b, name)), _fmt(gv), _fmt(mv)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        mark = "  " if mo is None or r[0] == "field" or r[2] == r[3] else "! "
        lines.append(mark + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


# --- hil-diff ---------------------------------------------------------------------------------------


def findings_if_ended_now(index: int, op: m.Op, before: State, now: State, pred: Prediction) -> list[Finding]:
    """What the checker would report if op `index` ended with the guest state `now`. Its
    result is not written yet, so the model's predicted result stands in for the guest's
    (no RESULT finding); the state, the spec clauses and the invariants are checked as the
    runner checks them."""
    found = check.snapshot_anomalies(index, before, now)
    if pred.state is None or pred.result is None:
        return found + check.check_invariants(index, now, only=_changed(before, now), before=before)
    found += check.diff_states(index, before, now, pred.state)
    found += check.check_axioms(index, op, before, now, pred.result, pred.state, pred.result,
                                impl_clean=not found)  # fmt: skip
    found += check.check_invariants(index, now, only=_changed(before, now), before=before)
    return found


def _changed(before: State, after: State) -> set[int]:
    from model.state import changed_slots

    return changed_slots(before, after)


def format_findings(found: Sequence[Finding], none: str = "no findings") -> str:
    if not found:
        return none
    return "\n".join(f.describe() for f in found)


# --- hil-ops ----------------------------------------------------------------------------------------


def ops_listing(events: Sequence[object], done: Sequence[Record], recorded: Sequence[Record], current: int,
                around: int = 5, note: str = "(in progress)") -> str:  # fmt: skip
    """Events current-around .. current+around: `done` are the ones run in this session (with
    their results and findings as checked here), `recorded` what the trace holds."""
    lines = []
    by_index = {r.index: r for r in done}
    lo, hi = max(0, current - around), min(len(events) - 1, current + around)
    for i in range(lo, hi + 1):
        mark = "=>" if i == current else "  "
        if i in by_index:
            rec = by_index[i]
            res = "" if rec.result is None else f" -> {rec.result!r}"
            lines.append(f"{mark} {i:5d} {rec.event!r}{res}")
            lines += [f"         {f.describe()}" for f in rec.findings]
        else:
            lines.append(f"{mark} {i:5d} {events[i]!r}" + (f"   {note}" if i == current else ""))
            if i < len(recorded) and recorded[i].result is not None:
                lines.append(f"         recorded: {recorded[i].result!r}")
            if i < len(recorded):
                lines += [f"         recorded: {f.describe()}" for f in recorded[i].findings]
    return "\n".join(lines)


# --- the MMU probes of an op that is already in the mailbox ------------------------------------------


class PlannedProbes:
    """The Runner's MMU-probe oracle when the op is already in the mailbox: its probes were
    planned and written with the request, before the op started (the guest touches before the
    op and probes after it), so the Runner's own plan/write at step time only hand that plan on."""

    def __init__(self, probes: oracles.MmuProbes, pending: oracles.ProbePlan | None = None):
        self.real = probes
        self.pending = pending

    def arm(self, before: State, op: m.Op) -> None:
        """Plan and write the probes of `op`: call before writing its request."""
        self.pending = self.real.plan(before, op)
        if self.pending is not None:
            self.real.write(self.pending)

    def plan(self, before: State, op: m.Op) -> oracles.ProbePlan | None:
        plan, self.pending = self.pending, None
        return plan

    def write(self, plan: oracles.ProbePlan) -> None:
        pass  # written by arm(), before the op started

    def check(self, index: int, plan: oracles.ProbePlan, after: State) -> list[Finding]:
        return self.real.check(index, plan, after)


class PlannedView:
    """The same for the sampled QEMU-translation oracle: the root QEMU is to view after the op
    goes into the mailbox with the request."""

    def __init__(self, qemu: oracles.QemuTranslation, pending: int | None = None):
        self.real = qemu
        self.pending = pending

    def arm(self, index: int, before: State, op: m.Op) -> None:
        self.pending = self.real.plan(index, before, op)

    def plan(self, index: int, before: State, op: m.Op) -> int | None:
        root, self.pending = self.pending, None
        return root

    def check(self, index: int, root: int, after: State) -> list[Finding]:
        return self.real.check(index, root, after)


# --- the session's context, handed from `hil debug` to the gdb script ---------------------------------


@dataclass
class Context:
    """Everything the gdb script needs (written as JSON next to the machine's sockets; the
    States are pickled beside it because a snapshot alone loses the ghost usage of freed slots)."""

    trace: str
    index: int  # the op gdb stops before
    seq: int  # its request seq (already in the mailbox)
    image: str
    src_dir: str
    shm_path: str
    ram_size: int
    layout: dict[str, int]
    op_done: int
    exception_handler: int
    state_pickle: str
    gdb_socket: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Context:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def abi_layout(self) -> abi.Layout:
        return abi.Layout(**self.layout)
