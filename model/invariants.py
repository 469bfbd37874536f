"""`VmStore::inv` = structural_inv (S1-S18) and accounting_inv (A1-A3) over one State (§1.3).

Every clause is reported separately. S1 (`regions.inv`) is split into R1-R4 and the per-slot
`MetaSlotOwner::inv` M1-M7 (reported as "S1/R2", "S1/M3", ...). Slots outside RAM do not exist
(R1 is restricted to RAM). Not modeled (no state for them): S4 (TLB model), S9-S11 (VmIo).

The spec's `slots` map (parked slot permissions) is the RAM slots minus the roots of the
walked page tables (VmSpace::new extracts the root's perm for good, VS-NEW-3; a dropped
VmSpace's root stays unparked). R2 asks every slot to be parked, so it fails at every root:
a contradiction between VS-NEW-3 and VS-NEW-1 (A.inv) that these predicates report literally.

`paths_in_pt` is `Slot.paths` (a set of root-relative paths); P(i) = |paths| (the raw PTE count
`refs` is named in the messages).

Incremental use: `check_invariants(state, only=slots)` evaluates the per-slot clauses over
`only` (plus the slots of handles that differ from `state.parent`), and S7 over the tree parts
that changed; the store-level clauses are always evaluated (they are cheap).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from model.state import PageTableNode, Slot, State, VmSpaceView, memo, slot_diff
from model.types import (
    NR_ENTRIES,
    NR_LEVELS,
    PAGE_SIZE,
    REF_COUNT_MAX,
    REF_COUNT_UNIQUE,
    REF_COUNT_UNUSED,
    TOP_LEVEL_USER_ENTRIES,
    USER_VA_END,
    Usage,
    frame_to_index,
    pte_is_last,
    pte_is_present,
    pte_paddr,
    valid_frame_paddr,
)
from model.violation import Violation


def unparked(state: State) -> frozenset[int]:
    """Slot indices whose perm is not in `slots`: the roots of live and leaked VmSpaces
    (cached per State)."""
    cache = memo(state)
    roots: frozenset[int] | None = cache.get("unparked")
    if roots is None:
        roots = frozenset({frame_to_index(v.root) for v in state.vm_spaces.values()}
                          | {frame_to_index(v.root) for v in state.leaked.values()})  # fmt: skip
        cache["unparked"] = roots
    return roots


def parked(state: State, index: int) -> bool:
    return 0 <= index < state.nr_slots and index not in unparked(state)


def has_safe_slot(state: State, paddr: int) -> bool:
    """The seed's `has_safe_slot(paddr)`: valid_frame_paddr and the slot exists (in RAM)."""
    return valid_frame_paddr(paddr) and frame_to_index(paddr) < state.nr_slots


def rc_shared(rc: int) -> bool:
    return 0 < rc <= REF_COUNT_MAX


# --- per-slot owner invariant (M1-M7) ----------------------------------------------------


def slot_inv(index: int, s: Slot, clause_prefix: str = "S1/") -> list[Violation]:
    out: list[Violation] = []

    def bad(clause: str, field: str, value: object, msg: str) -> None:
        out.append(Violation(clause_prefix + clause, index, field, None, value, msg))

    if s.rc == REF_COUNT_UNUSED:
        if s.sto is not None:
            bad("M1", "sto", s.sto, "UNUSED slot with storage init")
        if s.vt is not None:
            bad("M1", "vt", s.vt, "UNUSED slot with vtable init")
        if s.inl != 0:
            bad("M1", "inl", s.inl, "UNUSED slot in a list")
        if s.usage != Usage.MMIO and s.paths:
            bad("M1", "paths", sorted(s.paths), "UNUSED non-MMIO slot with paths")
    elif s.rc == REF_COUNT_UNIQUE:
        if s.sto is None or s.vt is None:
            bad("M2", "sto/vt", (s.sto, s.vt), "UNIQUE slot without storage/vtable")
        if s.usage != Usage.MMIO and s.paths:
            bad("M2", "paths", sorted(s.paths), "UNIQUE non-MMIO slot with paths")
    elif rc_shared(s.rc):
        if s.sto is None or s.vt is None:
            bad("M3", "sto/vt", (s.sto, s.vt), "shared slot without storage/vtable")
        if s.inl != 0:
            bad("M3", "inl", s.inl, "shared slot in a list")
    elif s.rc == 0:
        if s.inl != 0:
            bad("M5", "inl", s.inl, "rc 0 slot in a list")
    else:
        bad("M4", "rc", s.rc, "MAX < rc < UNIQUE")
    # M6/M7 hold by construction: slot_vaddr = FRAME_METADATA_BASE_VADDR + 64 * index
    return out


# --- cursor soundness (S7, §5.9 end) ------------------------------------------------------


def walk(view: VmSpaceView) -> Iterable[tuple[PageTableNode, int, int]]:
    """(node, entry index, pte) for every present user-half entry of the tree."""
    root = view.nodes.get(view.root)
    if root is None:
        return
    stack = [root]
    while stack:
        node = stack.pop()
        indices: Iterable[int] = TOP_LEVEL_USER_ENTRIES if node.level == NR_LEVELS else range(NR_ENTRIES)
        for k in indices:
            pte = node.entries[k]
            if not pte_is_present(pte):
                continue
            yield node, k, pte
            if not (pte_is_last(pte) or node.level == 1):
                child = view.nodes.get(pte_paddr(pte))
                if child is not None:
                    stack.append(child)


def _node_sound(state: State, clause: str, index: int, path: tuple[int, ...], level: int) -> list[Violation]:
    s = state.slot(index)
    out = []
    if not rc_shared(s.rc):
        out.append(Violation(clause, index, "rc", None, s.rc, "PT node slot rc not in 1..=MAX"))
    if s.paths != frozenset({path}):
        out.append(Violation(clause, index, "paths", None, sorted(s.paths), f"PT node paths != {{{path}}}"))
    if s.node is None or s.node.level != level or s.node.stray:
        out.append(Violation(clause, index, "node", None, s.node, f"PT node meta unsound (level {level})"))
    return out


def _leaf_sound(state: State, clause: str, index: int, path: tuple[int, ...]) -> list[Violation]:
    s = state.slot(index)
    out = []
    if not parked(state, index):
        out.append(Violation(clause, index, "parked", None, False, "leaf slot not parked"))
    elif slot_inv(index, s, ""):
        out.append(Violation(clause, index, "wf", None, s, "leaf slot not well-formed"))
    if s.usage == Usage.PAGE_TABLE:
        out.append(Violation(clause, index, "usage", None, s.usage, "leaf slot usage PageTable"))
    if s.usage != Usage.MMIO and not rc_shared(s.rc):
        out.append(Violation(clause, index, "rc", None, s.rc, "leaf slot rc not in 1..=MAX"))
    if path not in s.paths:
        out.append(Violation(clause, index, "paths", None, sorted(s.paths), f"leaf path {path} missing"))
    return out


def metaregion_sound(
    state: State, vs: int, clause: str = "S7", only: set[int] | None = None, nodes: set[int] | None = None
) -> list[Violation]:
    """`CursorOwner::metaregion_sound` for a cursor on VmSpace `vs`: every PT node (root
    included) and every leaf of its tree is consistent with the slots. With `only` / `nodes`,
    restricted to entries pointing at slots in `only` or lying in nodes (paddrs) in `nodes`.

    The same entries in the same order as filtering `walk(view)`, without visiting the rest:
    the view's node order and each node's present entries (indexed by target slot) are cached
    on the immutable view and node objects, so the restricted form costs the nodes of the tree
    plus the entries selected, not every entry; the full form re-evaluates only the nodes
    whose result can differ from the last full evaluation (`_entries_sound_cached`)."""
    view = state.vm_spaces.get(vs) or state.leaked.get(vs)
    if view is None:
        return [Violation(clause, None, "vm_space", None, vs, "cursor's VmSpace missing")]
    out: list[Violation] = []
    root_i = frame_to_index(view.root)
    if only is None or root_i in only or (nodes is not None and view.root in nodes):
        out += _node_sound(state, clause, root_i, (), NR_LEVELS)
    if only is None:
        diffs: dict[int, set[int] | None] = {}
        for node in view.walk_nodes:
            found = _entries_sound_cached(state, node, diffs)
            out += found if clause == "" else [dataclasses.replace(v, clause=clause) for v in found]
        return out
    for node in view.walk_nodes:
        present = node.present
        selected: Iterable[tuple[int, int, int, bool]]
        if nodes is not None and node.paddr in nodes:
            selected = present
        else:
            picks = _entries_at(node, only)
            if not picks:
                continue
            picks.sort()
            selected = [present[j] for j in picks]
        out += _entries_sound(state, clause, node, selected)
    return out


def _entries_at(node: PageTableNode, targets: set[int] | frozenset[int]) -> list[int]:
    """Positions in `node.present` of the entries pointing at a slot in `targets` (unordered),
    by whichever of the two sets is smaller."""
    by_target = node.by_target
    if len(targets) <= len(by_target):
        return [j for t in targets for j in by_target.get(t, ())]
    return [j for t, js in by_target.items() if t in targets for j in js]


def _entries_sound(
    state: State, clause: str, node: PageTableNode, selected: Iterable[tuple[int, int, int, bool]]
) -> list[Violation]:
    out: list[Violation] = []
    for k, _pte, target, leaf in selected:
        path = node.path + (k,)
        if leaf:
            out += _leaf_sound(state, clause, target, path)
        else:
            out += _node_sound(state, clause, target, path, node.level - 1)
    return out


def _entries_sound_cached(state: State, node: PageTableNode, diffs: dict[int, set[int] | None]) -> list[Violation]:
    """Every entry of `node` checked (clause ""), reusing the node's last result where it cannot
    differ: an entry's result is a function of the entry (the node object: immutable), the Slot
    object of its target and whether that target is parked (RAM size, unparked roots). The last
    result is kept on the node, per entry, with the slot table, unparked roots and RAM size it
    was computed against; the targets whose result may differ are the slots whose objects the
    two tables do not share (`slot_diff`, memoised per call in `diffs`) and the roots parked in
    one and not the other, and only their entries are checked again (a handle taken on one of a
    full node's 512 frames re-checks one entry, not 512). Anything not cheap to tell is
    evaluated again whole."""
    roots = unparked(state)
    slots = state.slots
    present = node.present
    last = node.__dict__.get("_sound")
    per: dict[int, list[Violation]] = {}  # by default: nothing kept, every entry checked
    redo: Iterable[int] = range(len(present))
    found: list[Violation] = []
    if last is not None and last[2] == state.nr_slots:
        old = last[0]
        d: set[int] | frozenset[int] | None
        if old is slots:
            d = frozenset()
        else:
            key = id(old)
            if key not in diffs:
                diffs[key] = slot_diff(old, slots)
            d = diffs[key]
        if d is not None:
            if last[1] != roots:
                d = d | (last[1] ^ roots)
            redo = _entries_at(node, d)
            per, found = last[4], last[3]
    if redo:
        per = dict(per)
        for j in redo:
            bad = _entries_sound(state, "", node, (present[j],))
            if bad:
                per[j] = bad
            else:
                per.pop(j, None)
        found = [v for j in sorted(per) for v in per[j]]
    node.__dict__["_sound"] = (slots, roots, state.nr_slots, found, per)
    return found


def changed_nodes(before: State, after: State, vs: int) -> set[int]:
    b = before.vm_spaces.get(vs) or before.leaked.get(vs)
    a = after.vm_spaces.get(vs) or after.leaked.get(vs)
    if a is None:
        return set()
    if b is None:
        return set(a.nodes)
    if a.nodes is b.nodes:
        return set()
    return {p for p, n in a.nodes.items() if b.nodes.get(p) is not n and b.nodes.get(p) != n}


# --- the invariants ------------------------------------------------------------------------


def _touched(state: State, only: Iterable[int] | None) -> set[int] | None:
    if only is None:
        return None
    out = set(only)
    parent = state.parent
    if parent is not None:
        for table_a, table_b in ((state.frames, parent.frames), (state.uniques, parent.uniques)):
            for k in set(table_a) ^ set(table_b):
                p = table_a.get(k, table_b.get(k))
                assert p is not None
                out.add(frame_to_index(p))
        for k in set(state.segments) ^ set(parent.segments) | {
            k for k in state.segments if parent.segments.get(k) != state.segments[k]
        }:
            for rng in (state.segments.get(k), parent.segments.get(k)):
                if rng is not None:
                    out.update(range(frame_to_index(rng[0]), frame_to_index(rng[1])))
    return out


def structural_inv(state: State, only: Iterable[int] | None = None) -> list[Violation]:
    idx = _touched(state, only)
    indices: Iterable[int] = range(state.nr_slots) if idx is None else sorted(idx)
    roots = unparked(state)
    out: list[Violation] = []
    # S1: R1 (slot_owners domain == RAM), R2 (every owner parked), R3 (trivial), R4/M* (parked)
    if idx is None and set(state.slots) != set(range(state.nr_slots)):
        extra = sorted(set(state.slots) ^ set(range(state.nr_slots)))[:8]
        out.append(Violation("S1/R1", None, "slots", state.nr_slots, extra, "slot domain != RAM"))
    for i in indices:
        s = state.slot(i)
        if i in roots:
            out.append(Violation("S1/R2", i, "slots", None, "unparked",
                                 "slot owner without a parked perm (a PT root: VS-NEW-3 vs R2)"))  # fmt: skip
            if not (s.usage == Usage.PAGE_TABLE and s.rc != REF_COUNT_UNUSED):
                out.append(Violation("S2", i, "usage/rc", None, (s.usage, s.rc), "unparked non-PT slot"))
        else:
            out += slot_inv(i, s)
        if s.inl != 0:
            out.append(Violation("S3", i, "inl", None, s.inl, "in_list != 0"))
    # S5: every VmSpace owner inv (root is a level-4 PT node in use)
    for vs, view in state.vm_spaces.items():
        r = state.slot(frame_to_index(view.root))
        node = view.nodes.get(view.root)
        if node is None or node.level != NR_LEVELS or r.usage != Usage.PAGE_TABLE or r.rc == REF_COUNT_UNUSED:
            out.append(Violation("S5", frame_to_index(view.root), f"vm_space {vs}", None, r, "root unsound"))
    # S6, S7, S8: cursors
    for cid, c in state.cursors.items():
        out += cursor_inv(state, cid, "S6")
        if c.vs not in state.vm_spaces:
            out.append(Violation("S8", None, f"cursor {cid}", None, c.vs, "cursor's VmSpace not live"))
            continue
        if idx is None:
            out += metaregion_sound(state, c.vs, "S7")
        else:
            parent = state.parent
            nodes = changed_nodes(parent, state, c.vs) if parent is not None else None
            out += metaregion_sound(state, c.vs, "S7", idx, nodes)
    # S12-S18: handles
    for fid, p in state.frames.items():
        if not valid_frame_paddr(p):
            out.append(Violation("S12", None, f"frame {fid}", None, p, "invalid frame paddr"))
        elif state.slot_of(p).usage != Usage.FRAME:
            out.append(Violation("S13", frame_to_index(p), "usage", None, state.slot_of(p).usage,
                                 f"frame {fid} on a non-Frame slot"))  # fmt: skip
    for sid, (start, end) in state.segments.items():
        if start % PAGE_SIZE or end % PAGE_SIZE or start >= end or end > 0x8000_0000:
            out.append(Violation("S14", None, f"segment {sid}", None, (start, end), "bad segment range"))
            continue
        for p in range(start, end, PAGE_SIZE):
            if (idx is None or frame_to_index(p) in idx) and state.slot_of(p).usage != Usage.FRAME:
                out.append(Violation("S15", frame_to_index(p), "usage", None, state.slot_of(p).usage,
                                     f"segment {sid} covers a non-Frame slot"))  # fmt: skip
    seen: dict[int, int] = {}
    for uid, p in state.uniques.items():
        if not valid_frame_paddr(p):
            out.append(Violation("S16", None, f"unique {uid}", None, p, "invalid unique paddr"))
            continue
        s = state.slot_of(p)
        if s.usage != Usage.FRAME or s.rc != REF_COUNT_UNIQUE or s.inl != 0 or s.paths:
            out.append(Violation("S17", frame_to_index(p), "slot", None, s, f"unique {uid}: slot not UNIQUE Frame"))
        if p in seen:
            out.append(Violation("S18", frame_to_index(p), "uniques", None, (seen[p], uid), "two uniques"))
        seen[p] = uid
    return out


def cursor_inv(state: State, cid: int, clause: str) -> list[Violation]:
    """CursorEntry::inv as far as it is observable: 1 <= level <= guard_level == 4, va aligned,
    barrier valid, the path from the root down to `level` exists."""
    c = state.cursors[cid]
    out: list[Violation] = []
    ok = (
        1 <= c.level <= c.guard_level == NR_LEVELS
        and c.va % PAGE_SIZE == 0
        and c.start < c.end <= USER_VA_END
        and c.start % PAGE_SIZE == 0
        and c.end % PAGE_SIZE == 0
    )
    if not ok:
        out.append(Violation(clause, None, f"cursor {cid}", None, c, "cursor entry inv"))
        return out
    view = state.vm_spaces.get(c.vs)
    if view is None:
        return out
    node = view.nodes.get(view.root)
    for lv in range(NR_LEVELS, c.level, -1):
        if node is None:
            break
        pte = node.entries[(c.va >> (12 + 9 * (lv - 1))) & 511]
        if not pte_is_present(pte) or pte_is_last(pte):
            node = None
            break
        node = view.nodes.get(pte_paddr(pte))
    if node is None:
        out.append(Violation(clause, None, f"cursor {cid}", None, c, "cursor path broken"))
    return out


def accounting_inv(state: State, only: Iterable[int] | None = None) -> list[Violation]:
    idx = _touched(state, only)
    indices: Iterable[int] = range(state.nr_slots) if idx is None else sorted(idx)
    hc = state.handle_counts()
    cc = state.cover_counts()
    out: list[Violation] = []
    for i in indices:
        s = state.slot(i)
        h, p, c = hc.get(i, 0), len(s.paths), cc.get(i, 0)
        counts = f"H={h} P={p} (refs {s.refs}) C={c}"
        if s.rc == REF_COUNT_UNUSED and (h or p or c):
            out.append(Violation("A1", i, "H/P/C", None, (h, p, c), f"UNUSED slot with users: {counts}"))
        if s.usage != Usage.FRAME:
            continue
        active = h > 0 or p > 0 or c > 0
        if s.rc not in (REF_COUNT_UNUSED, REF_COUNT_UNIQUE) and not active:
            out.append(Violation("A2", i, "rc", None, s.rc, f"Frame slot in use without users: {counts}"))
        if active and (s.rc in (REF_COUNT_UNUSED, REF_COUNT_UNIQUE) or s.rc != h + p + c or s.sto is None):
            out.append(Violation("A3", i, "rc", h + p + c, s.rc, f"rc != H+P+C: {counts}, sto {s.sto}"))
    return out


def check_invariants(state: State, only: Iterable[int] | None = None) -> list[Violation]:
    """Both invariants; `only=None`: full, else incremental over `only` (see module doc).

    Memoised per (State, only): one op asks for the same evaluation several times (the
    checked run's invariant check, the axioms' "A.inv", the before-state filters)."""
    key = None if only is None else frozenset(only)
    cache = memo(state).setdefault("check_invariants", {})
    found: list[Violation] | None = cache.get(key)
    if found is None:
        found = cache[key] = structural_inv(state, key) + accounting_inv(state, key)
    return list(found)
