"""After one op: (1) model vs guest, (2) the op's spec postconditions on the guest's
before/after, (3) the store invariants on the guest's after-state. Findings are data.

Kinds (ARCHITECTURE "Why it exists"):
- IMPL: the guest and the model disagree (result, a slot field, a PTE, a handle, a cursor),
  or the guest violates a clause that the model's prediction satisfies.
- SPEC: a postcondition clause fails on the guest's real before/after state and the model's
  prediction fails it too: the trusted axiom does not describe exec behaviour.
- INVARIANT: a structural / accounting invariant (S*, A*, M*) fails on the guest's state.
- TLB: an MMU probe disagrees with the guest's page tables after the op (hil/check/oracles.py):
  a translation the op changed is still used (a missing invalidation).
- WALKER: QEMU's own translation disagrees with our walker's (hil/check/oracles.py).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from model import axioms, invariants
from model import ops as m
from model.state import PageTableNode, State, VmSpaceView, changed_slots
from model.types import NR_LEVELS, page_size

AD_PROP_BITS = 0x18  # PageFlags.ACCESSED | DIRTY: set by the MMU, masked (spec §5.12)


class Kind(enum.StrEnum):
    IMPL = "IMPL"
    SPEC = "SPEC"
    INVARIANT = "INVARIANT"
    TLB = "TLB"
    WALKER = "WALKER"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str, float)):
        return value
    if isinstance(value, (frozenset, set)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.name
    return repr(value)


@dataclass(frozen=True)
class Finding:
    kind: Kind
    op_index: int
    clause: str  # spec clause id (MAP-2, A3, ...) or the compared part (RESULT, SLOT, PTE, ...)
    field: str
    slot: int | None = None
    va: int | None = None
    vs: int | None = None
    before: Any = None
    guest: Any = None
    model: Any = None
    message: str = ""
    # op index of the earlier (root) finding that had already broken this finding's
    # before-state at its slot: this one is a consequence of that one (Causes below)
    caused_by: int | None = None

    def signature(self) -> tuple[str, str, str]:
        """What "the same finding" means for shrinking and baselines."""
        return (str(self.kind), self.clause, self.field)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind), "op_index": self.op_index, "clause": self.clause, "field": self.field,
            "slot": self.slot, "va": self.va, "vs": self.vs, "before": _jsonable(self.before),
            "guest": _jsonable(self.guest), "model": _jsonable(self.model), "message": self.message,
            "caused_by": self.caused_by,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Finding:
        return cls(
            Kind(d["kind"]), int(d["op_index"]), d["clause"], d["field"], d.get("slot"), d.get("va"),
            d.get("vs"), d.get("before"), d.get("guest"), d.get("model"), d.get("message", ""),
            d.get("caused_by"),
        )  # fmt: skip

    def describe(self) -> str:
        where = []
        if self.slot is not None:
            where.append(f"slot {self.slot} (paddr {self.slot * 4096:#x})")
        if self.vs is not None:
            where.append(f"vs {self.vs}")
        if self.va is not None:
            where.append(f"va {self.va:#x}")
        loc = ", ".join(where)
        vals = f"before={_short(self.before)} guest={_short(self.guest)} model={_short(self.model)}"
        cause = f" (consequence of op {self.caused_by})" if self.caused_by is not None else ""
        return (
            f"[{self.kind}] op {self.op_index} {self.clause} {self.field}"
            + (f" @ {loc}" if loc else "")
            + (f": {vals}" + (f" — {self.message}" if self.message else ""))
            + cause
        )


def _short(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:#x}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- (1) model vs guest ------------------------------------------------------------------


def _result_for_compare(op: m.Op, result: m.OpResult) -> m.OpResult:
    if isinstance(op, m.Query) and result.status == m.Status.OK:
        values = tuple((k, v & ~AD_PROP_BITS if k == "prop" else v) for k, v in result.values)
        return m.OpResult(result.status, result.code, values)
    if isinstance(op, m.Probe) and result.status == m.Status.OK:
        # the model does not predict MMU behaviour (the hardware-probe oracle does)
        return m.OpResult(result.status, result.code, ())
    return result


def diff_results(index: int, op: m.Op, guest: m.OpResult, model: m.OpResult) -> list[Finding]:
    g, p = _result_for_compare(op, guest), _result_for_compare(op, model)
    if g == p:
        return []
    if g.status != p.status or g.code != p.code:
        return [
            Finding(Kind.IMPL, index, "RESULT", "status", guest=repr(guest), model=repr(model),
                    message=f"{op!r} returned differently")
        ]  # fmt: skip
    out = []
    gv, pv = dict(g.values), dict(p.values)
    for name in sorted(set(gv) | set(pv)):
        if gv.get(name) != pv.get(name):
            out.append(Finding(Kind.IMPL, index, "RESULT", name, guest=gv.get(name), model=pv.get(name),
                               message=f"{op!r}"))  # fmt: skip
    return out


SLOT_FIELDS = ("rc", "usage", "inl", "vt", "sto", "paths", "refs", "node")


def _node_va(path: tuple[int, ...], index: int) -> int:
    va = 0
    for depth, i in enumerate(path + (index,)):
        va += i * page_size(NR_LEVELS - depth)
    if va >= 1 << 47:
        va |= 0xFFFF_0000_0000_0000
    return va


def diff_tables(index: int, vs: int, guest: VmSpaceView | None, model: VmSpaceView | None) -> list[Finding]:
    if guest is None or model is None:
        return [Finding(Kind.IMPL, index, "VM_SPACE", "present", vs=vs, guest=guest is not None,
                        model=model is not None)]  # fmt: skip
    out = []
    if guest.root != model.root:
        out.append(Finding(Kind.IMPL, index, "VM_SPACE", "root", vs=vs, guest=guest.root, model=model.root))
    if guest.cursor != model.cursor:
        out.append(Finding(Kind.IMPL, index, "VM_SPACE", "cursor", vs=vs, guest=guest.cursor, model=model.cursor))
    if guest.nodes == model.nodes:
        return out
    for paddr in sorted(set(guest.nodes) | set(model.nodes)):
        gn: PageTableNode | None = guest.nodes.get(paddr)
        mn: PageTableNode | None = model.nodes.get(paddr)
        if gn is None or mn is None:
            node = gn or mn
            assert node is not None
            out.append(Finding(Kind.IMPL, index, "PT_NODE", "present", vs=vs, slot=paddr // 4096,
                               va=_node_va(node.path[:-1], node.path[-1]) if node.path else None,
                               guest=gn is not None, model=mn is not None,
                               message=f"level-{node.level} node at path {list(node.path)}"))  # fmt: skip
            continue
        if (gn.level, gn.path) != (mn.level, mn.path):
            out.append(Finding(Kind.IMPL, index, "PT_NODE", "position", vs=vs, slot=paddr // 4096,
                               guest=(gn.level, gn.path), model=(mn.level, mn.path)))  # fmt: skip
        if gn.entries != mn.entries:
            for i, (ge, me) in enumerate(zip(gn.entries, mn.entries, strict=True)):
                if ge != me:
                    msg = f"level-{mn.level} node {paddr:#x} entry {i} (xor {ge ^ me:#x})"
                    out.append(Finding(Kind.IMPL, index, "PTE", "raw", vs=vs, va=_node_va(mn.path, i),
                                       guest=ge, model=me, message=msg))  # fmt: skip
    return out


def _diff_maps(index: int, clause: str, guest: Any, model: Any) -> list[Finding]:
    if guest == model:
        return []
    out = []
    for key in sorted(set(guest) | set(model)):
        g, mv = guest.get(key), model.get(key)
        if g == mv:
            continue
        if clause == "NEXT_ID":  # keyed by handle kind already
            out.append(Finding(Kind.IMPL, index, clause, f"{key}", guest=g, model=mv))
            continue
        # the field names what differs, never the id: ids are renumbered by shrinking, and a
        # finding's signature (kind, clause, field) must survive that
        if g is None or mv is None:
            what = "present"
        elif dataclasses.is_dataclass(g) and dataclasses.is_dataclass(mv):
            what = ",".join(f.name for f in dataclasses.fields(g) if getattr(g, f.name) != getattr(mv, f.name))
        else:
            what = "value"
        out.append(Finding(Kind.IMPL, index, clause, what, guest=g, model=mv, message=f"id {key}"))
    return out


def diff_states(index: int, before: State, guest: State, model: State) -> list[Finding]:
    out: list[Finding] = []
    touched = changed_slots(before, guest) | changed_slots(before, model)
    for i in sorted(touched):
        gs, ms = guest.slot(i), model.slot(i)
        if gs == ms:
            continue
        for name in SLOT_FIELDS:
            gv, mv = getattr(gs, name), getattr(ms, name)
            if gv != mv:
                out.append(Finding(Kind.IMPL, index, "SLOT", name, slot=i, before=getattr(before.slot(i), name),
                                   guest=gv, model=mv))  # fmt: skip
    for vs in sorted(set(guest.vm_spaces) | set(model.vm_spaces)):
        out += diff_tables(index, vs, guest.vm_spaces.get(vs), model.vm_spaces.get(vs))
    for vs in sorted(set(guest.leaked) | set(model.leaked)):
        out += diff_tables(index, vs, guest.leaked.get(vs), model.leaked.get(vs))
    out += _diff_maps(index, "CURSOR", guest.cursors, model.cursors)
    out += _diff_maps(index, "FRAME_HANDLE", guest.frames, model.frames)
    out += _diff_maps(index, "SEGMENT_HANDLE", guest.segments, model.segments)
    out += _diff_maps(index, "UNIQUE_HANDLE", guest.uniques, model.uniques)
    out += _diff_maps(index, "NEXT_ID", guest.next_ids, model.next_ids)
    if guest.active != model.active:  # EXEC=upstream: the VmSpace holding the CPU's reference
        out.append(Finding(Kind.IMPL, index, "ACTIVE", "vs", guest=guest.active, model=model.active))
    return out


def snapshot_anomalies(index: int, before: State, after: State) -> list[Finding]:
    """What the walker or the decoders could not make sense of (a PTE pointing outside RAM, a
    node shared inside one tree, a bad type word...): never dropped silently."""
    old = {str(a) for a in before.anomalies}
    return [Finding(Kind.IMPL, index, "SNAPSHOT", "anomaly", message=str(a))
            for a in after.anomalies if str(a) not in old]  # fmt: skip


# --- (2) the spec's postconditions, (3) the invariants --------------------------------------


def _violation_finding(kind: Kind, index: int, v: Any, model_value: Any = None) -> Finding:
    return Finding(kind, index, v.clause, v.field or "", slot=v.slot, before=v.before, guest=v.after,
                   model=model_value, message=v.message)  # fmt: skip


def check_axioms(
    index: int, op: m.Op, before: State, guest: State, guest_result: m.OpResult,
    model: State, model_result: m.OpResult, impl_clean: bool, coverage: Any = None,
) -> list[Finding]:  # fmt: skip
    if not axioms.op_pre(before, op):
        return []
    found = axioms.check_axioms(before, guest, op, guest_result, coverage=coverage)
    found = _new_inv_violations(before, found)
    if not found:
        return []
    if impl_clean:
        return [_violation_finding(Kind.SPEC, index, v) for v in found]
    predicted = {
        (v.clause, v.slot, v.field)
        for v in _new_inv_violations(before, axioms.check_axioms(before, model, op, model_result))
    }
    out = []
    for v in found:
        if (v.clause, v.slot, v.field) in predicted:
            out.append(_violation_finding(Kind.SPEC, index, v))
        else:
            f = _violation_finding(Kind.IMPL, index, v)
            out.append(Finding(f.kind, f.op_index, f.clause, f.field, f.slot, f.va, f.vs, f.before, f.guest,
                               f.model, "the guest violates it; the model's prediction satisfies it"))  # fmt: skip
    return out


def _new_inv_violations(before: State, found: list[Any]) -> list[Any]:
    """Drop "A.inv" violations (field `inv:<clause>`) that already held on B: the axioms require
    `old(regions).inv()`, so for those the clause is not applicable; the invariant finding was
    reported where it first appeared."""
    inv = [v for v in found if str(v.field).startswith("inv:")]
    if not inv:
        return found
    slots = {v.slot for v in inv if v.slot is not None}
    old = {(f"inv:{v.clause}", v.slot) for v in invariants.check_invariants(before, only=slots)}
    return [v for v in found if not (str(v.field).startswith("inv:") and (v.field, v.slot) in old)]


def check_invariants(
    index: int, state: State, only: Iterable[int] | None = None, before: State | None = None
) -> list[Finding]:
    """Violations on `state` (over the slots in `only`, or all). With `before`, only those that
    are new at this op: a violation that persists is reported once, where it appeared."""
    scope = None if only is None else set(only)
    found = invariants.check_invariants(state, only=scope)
    if before is not None and found:
        old = {(v.clause, v.slot, v.field) for v in invariants.check_invariants(before, only=scope)}
        found = [v for v in found if (v.clause, v.slot, v.field) not in old]
    return [_violation_finding(Kind.INVARIANT, index, v) for v in found]


Alloc = Callable[[int], int]


def alloc_from(model_before: State, guest_after: State) -> Alloc:
    """The model never predicts allocator choices: a new page-table node of level L is the
    slot that the guest turned from UNUSED into a level-L PageTable slot during the op."""
    from model.types import REF_COUNT_UNUSED, StorageTag

    fresh: dict[int, list[int]] = {}
    for i in sorted(changed_slots(model_before, guest_after)):
        b, a = model_before.slot(i), guest_after.slot(i)
        if b.rc == REF_COUNT_UNUSED and a.rc != REF_COUNT_UNUSED and a.sto and a.sto[0] == StorageTag.PT_NODE:
            fresh.setdefault(a.sto[1], []).append(i * 4096)
    taken: set[int] = set()

    def alloc(level: int) -> int:
        for paddr in fresh.get(level, []):
            if paddr not in taken:
                taken.add(paddr)
                return paddr
        # the guest allocated no such node: any UNUSED slot lets the model go on; the diff
        # then reports the node the guest failed to create
        for i in sorted(model_before.slots):
            if model_before.slots[i].rc == REF_COUNT_UNUSED and i * 4096 not in taken and i * 4096 not in {
                p for ps in fresh.values() for p in ps
            }:
                taken.add(i * 4096)
                return i * 4096
        raise RuntimeError("no UNUSED slot left for the model's page-table node")

    return alloc


# --- root causes ------------------------------------------------------------------------------

# R2 at a walked root is broken by every NewVmSpace (VS-NEW-3 takes the root's perm out of
# `slots`) and the axioms are judged without it ("slots unchanged" over the parked domain): a
# slot broken only that way does not make later findings there consequences.
_NOT_BREAKING = frozenset({"S1/R2"})


def _breaks(f: Finding) -> bool:
    """The finding says the after-state violates an invariant at its slot."""
    clause = f.field[4:] if f.field.startswith("inv:") else f.clause
    return (
        f.slot is not None
        and (f.kind == Kind.INVARIANT or f.field.startswith("inv:"))
        and clause not in _NOT_BREAKING
    )


class Causes:
    """Root cause, not cascades: a finding at a slot whose before-state still violates an
    invariant (other than R2) that an earlier op's finding introduced is a consequence of that
    earlier (root) finding: `caused_by` = the root's op index. One per run."""

    def __init__(self) -> None:
        self.origin: dict[int, int] = {}  # slot -> op index of the root finding that broke it

    def link(self, findings: list[Finding], before: State) -> list[Finding]:
        if not findings:
            return findings
        out = []
        still: dict[int, bool] = {}
        for f in findings:
            s = f.slot
            cause = None
            if s is not None and s in self.origin:
                if s not in still:
                    found = invariants.check_invariants(before, only={s})
                    still[s] = any(v.clause not in _NOT_BREAKING for v in found)
                if still[s]:
                    cause = self.origin[s]
            out.append(dataclasses.replace(f, caused_by=cause) if cause is not None else f)
        for s, broken in still.items():
            if not broken:
                del self.origin[s]  # repaired since: a later finding there is a new root
        for f in out:
            if _breaks(f) and f.caused_by is None:
                assert f.slot is not None
                self.origin[f.slot] = f.op_index
        return out


def root_summary(findings: Iterable[Finding]) -> list[tuple[str, ...]]:
    """Rows (kind, clause, field, roots, first op) per root signature, each followed by its
    consequences' rows ("  <- kind", clause, field, count, first op). A consequence is listed
    under the root finding at its `caused_by` op with the same slot (else that op's first)."""
    fs = list(findings)
    at: dict[int, list[Finding]] = {}
    for f in fs:
        at.setdefault(f.op_index, []).append(f)
    roots: dict[tuple[str, str, str], list[int]] = {}
    under: dict[tuple[str, str, str], dict[tuple[str, str, str], list[int]]] = {}
    for f in fs:
        if f.caused_by is None:
            roots.setdefault(f.signature(), []).append(f.op_index)
    for f in fs:
        if f.caused_by is None:
            continue
        cands = [r for r in at.get(f.caused_by, []) if r.caused_by is None]
        same = sorted((r for r in cands if r.slot == f.slot), key=lambda r: (not _breaks(r), r.kind != Kind.INVARIANT))
        root = same[0] if same else cands[0] if cands else None
        key = root.signature() if root is not None else ("?", "?", "?")
        roots.setdefault(key, [])
        under.setdefault(key, {}).setdefault(f.signature(), []).append(f.op_index)
    rows: list[tuple[str, ...]] = []
    for sig in sorted(roots):
        ops = roots[sig]
        rows.append((*sig, str(len(ops)), str(min(ops)) if ops else "-"))
        for csig, cops in sorted(under.get(sig, {}).items()):
            rows.append((f"  <- {csig[0]}", csig[1], csig[2], str(len(cops)), str(min(cops))))
    return rows
