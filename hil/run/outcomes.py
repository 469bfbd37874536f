"""Outcome coverage: which interesting outcomes of each op a run reached (printed by `hil run`
beside the clause table). An outcome is read off the op, its result and the before/after
States, so it works on the guest's states (the runner) and on the model's alone (tests).

`ROWS` lists every outcome the default workload must reach (tests/unit/test_workload.py
checks it within 3,000 ops on the model); `classify` may name others too.
"""

from __future__ import annotations

from collections import Counter

from model import ops as m
from model.state import State, VmSpaceView
from model.types import (
    NR_LEVELS,
    PAGE_SIZE,
    REF_COUNT_UNUSED,
    PageFlags,
    PrivFlags,
    StorageTag,
    pte_is_last,
    pte_is_present,
    pte_prop,
)

ROWS: dict[str, tuple[str, ...]] = {
    "Map": ("fresh VA", "re-map: another frame", "re-map: the same frame", "allocates a node"),
    "Unmap": ("nothing mapped", "4 KiB leaves only", "subtree at level 1 (2 MiB)", "subtree at level 2 (1 GiB)",
              "subtree at level 3 (512 GiB)"),  # fmt: skip
    "ProtectNext": ("not found", "no change", "W changed", "NX changed", "U changed", "cache changed",
                    "hit on the last page of the range"),  # fmt: skip
    "FindNext": ("not found", "found", "hit on the last page of the range"),
    "Query": ("absent", "present"),
    "Jump": ("inside the barrier", "refused: outside"),
    "FrameDrop": ("last reference", "not the last"),
    "FrameFromInUse": ("a data frame", "a page-table node", "refused"),
    "TryFromShared": ("became unique", "refused: shared"),
    "DropVmSpace": ("with mappings",),
}


SLOT_NAMES = {1: "2 MiB", 2: "1 GiB", 3: "512 GiB"}  # what a taken level-L node covers


def _leaf(view: VmSpaceView, va: int) -> int | None:
    """The leaf PTE mapping `va` in OSTD's view, or None."""
    node = view.nodes.get(view.root)
    for level in range(NR_LEVELS, 0, -1):
        if node is None:
            return None
        pte = node.entries[(va >> (12 + 9 * (level - 1))) & 511]
        if not pte_is_present(pte):
            return None
        if level == 1 or pte_is_last(pte):
            return pte
        node = view.nodes.get(pte & 0x000F_FFFF_FFFF_F000)
    return None


def classify(op: m.Op, before: State, after: State, result: m.OpResult) -> list[str]:
    ok = result.status == m.Status.OK
    if isinstance(op, m.Map) and ok:
        cur = before.cursors[op.cursor]
        out = ["fresh VA"] if not result.get("replaced") else []
        if result.get("replaced"):
            same = result.get("old_paddr") == before.frames.get(op.frame)
            out.append("re-map: the same frame" if same else "re-map: another frame")
        if cur.vs in after.vm_spaces and len(after.vm_spaces[cur.vs].nodes) > len(before.vm_spaces[cur.vs].nodes):
            out.append("allocates a node")
        return out
    if isinstance(op, m.Unmap) and ok:
        if not result.get("num") and not _freed_levels(op, before, after):
            return ["nothing mapped"]
        levels = _freed_levels(op, before, after)
        if not levels:
            return ["4 KiB leaves only"]
        top = max(levels)
        return [f"subtree at level {top} ({SLOT_NAMES.get(top, '?')})"]
    if isinstance(op, m.ProtectNext) and ok:
        if not result.get("found"):
            return ["not found"]
        cur = before.cursors[op.cursor]
        out = _last_page(before, op.cursor, op.len, result.get("start"))
        va = result.get("start")
        b = _leaf(before.vm_spaces[cur.vs], va) if cur.vs in before.vm_spaces else None
        a = _leaf(after.vm_spaces[cur.vs], va) if cur.vs in after.vm_spaces else None
        if b is None or a is None:
            return out
        pb, pa = pte_prop(b), pte_prop(a)
        if pb == pa:
            return out + ["no change"]
        if (pb.flags ^ pa.flags) & PageFlags.W:
            out.append("W changed")
        if (pb.flags ^ pa.flags) & PageFlags.X:
            out.append("NX changed")
        if (pb.priv ^ pa.priv) & PrivFlags.USER:
            out.append("U changed")
        if pb.cache != pa.cache:
            out.append("cache changed")
        return out
    if isinstance(op, m.FindNext) and ok:
        if not result.get("found"):
            return ["not found"]
        return ["found"] + _last_page(before, op.cursor, op.len, result.get("va"))
    if isinstance(op, m.Query) and ok:
        return ["present" if result.get("present") else "absent"]
    if isinstance(op, m.Jump):
        return ["inside the barrier"] if ok else ["refused: outside"] if result.status == m.Status.ERR else []
    if isinstance(op, m.FrameDrop) and ok:
        paddr = before.frames.get(op.frame)
        if paddr is None:
            return []
        return ["last reference" if after.slot_of(paddr).rc == REF_COUNT_UNUSED else "not the last"]
    if isinstance(op, m.FrameFromInUse):
        if not ok:
            return ["refused"]
        sto = before.slot_of(op.paddr).sto
        return ["a page-table node" if sto and sto[0] == StorageTag.PT_NODE else "a data frame"]
    if isinstance(op, m.TryFromShared) and ok:
        return ["became unique" if result.get("ok") else "refused: shared"]
    if isinstance(op, m.DropVmSpace) and ok and op.vs in before.vm_spaces:
        view = before.vm_spaces[op.vs]
        return ["with mappings"] if len(view.nodes) > 1 else ["empty"]
    return []


def _freed_levels(op: m.Unmap, before: State, after: State) -> set[int]:
    cur = before.cursors[op.cursor]
    if cur.vs not in before.vm_spaces or cur.vs not in after.vm_spaces:
        return set()
    kept = after.vm_spaces[cur.vs].nodes
    return {n.level for p, n in before.vm_spaces[cur.vs].nodes.items() if p not in kept}


def _last_page(before: State, cursor: int, length: int, hit: int) -> list[str]:
    """A hit on the last page of a range longer than one page (where an off-by-one hides)."""
    cur = before.cursors.get(cursor)
    if cur is None or length <= PAGE_SIZE:
        return []
    return ["hit on the last page of the range"] if hit == cur.va + length - PAGE_SIZE else []


class OutcomeCoverage:
    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()

    def record(self, op: m.Op, before: State, after: State, result: m.OpResult) -> None:
        for row in classify(op, before, after, result):
            self.seen[type(op).__name__, row] += 1

    def missing(self) -> list[tuple[str, str]]:
        return [(op, row) for op, rows in ROWS.items() for row in rows if not self.seen[op, row]]

    def table(self) -> list[tuple[str, str, int]]:
        """Every ROWS row (count 0 when not reached), then any other outcome seen."""
        out = [(op, row, self.seen[op, row]) for op, rows in ROWS.items() for row in rows]
        listed = {(op, row) for op, row, _ in out}
        out += [(op, row, n) for (op, row), n in sorted(self.seen.items()) if (op, row) not in listed]
        return out
