"""The cached / indexed forms of the checks give exactly what the from-scratch forms give.

The checks cache derived data on the immutable objects (a node's present entries, a view's
walk order and mappings, a State's invariants, handle and cover counts, unparked roots). Here,
on random model states (random ops, then random corruption of slots and of page-table nodes,
including nodes reached twice), each is compared with a from-scratch reference: the walk-based
code the cached form replaced, kept here verbatim, and the same query on a fresh copy of the
State (a `dataclasses.replace` copy carries no cache).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable

from hypothesis import given
from hypothesis import strategies as st
from model_helpers import BASE, Run, random_op

from model import invariants as inv
from model.invariants import _leaf_sound, _node_sound, metaregion_sound, walk
from model.state import Mapping_, PageTableNode, Slot, SlotTable, State, VmSpaceView, with_slot_changes
from model.types import (
    NR_ENTRIES,
    NR_LEVELS,
    PAGE_SIZE,
    REF_COUNT_MAX,
    REF_COUNT_UNIQUE,
    REF_COUNT_UNUSED,
    TOP_LEVEL_USER_ENTRIES,
    Usage,
    frame_to_index,
    page_size,
    pte_is_last,
    pte_is_present,
    pte_paddr,
)
from model.violation import Violation

# --- the from-scratch references (the code the cached forms replaced) ------------------------


def ref_metaregion_sound(
    state: State, vs: int, clause: str = "S7", only: set[int] | None = None, nodes: set[int] | None = None
) -> list[Violation]:
    view = state.vm_spaces.get(vs) or state.leaked.get(vs)
    if view is None:
        return [Violation(clause, None, "vm_space", None, vs, "cursor's VmSpace missing")]
    out: list[Violation] = []
    root_i = frame_to_index(view.root)
    if only is None or root_i in only or (nodes is not None and view.root in nodes):
        out += _node_sound(state, clause, root_i, (), NR_LEVELS)
    for node, k, pte in walk(view):
        target = frame_to_index(pte_paddr(pte))
        if only is not None and target not in only and not (nodes is not None and node.paddr in nodes):
            continue
        path = node.path + (k,)
        if pte_is_last(pte) or node.level == 1:
            out += _leaf_sound(state, clause, target, path)
        else:
            out += _node_sound(state, clause, target, path, node.level - 1)
    return out


def ref_mappings(view: VmSpaceView) -> dict[int, Mapping_]:
    out: dict[int, Mapping_] = {}
    root = view.nodes[view.root]
    stack: list[tuple[PageTableNode, int]] = [(root, 0)]
    while stack:
        node, base = stack.pop()
        indices: Iterable[int] = TOP_LEVEL_USER_ENTRIES if node.level == 4 else range(NR_ENTRIES)
        for i in indices:
            pte = node.entries[i]
            if not pte_is_present(pte):
                continue
            va = base + i * page_size(node.level)
            if node.level == 4 and va >= 1 << 47:
                va |= 0xFFFF_0000_0000_0000
            if pte_is_last(pte) or node.level == 1:
                out[va] = Mapping_(va, pte_paddr(pte), node.level, pte, node.path + (i,))
            else:
                child = view.nodes.get(pte_paddr(pte))
                if child is not None:
                    stack.append((child, va))
    return out


def ref_unparked(state: State) -> set[int]:
    return {frame_to_index(v.root) for v in state.vm_spaces.values()} | {
        frame_to_index(v.root) for v in state.leaked.values()
    }


def ref_counts(state: State) -> tuple[dict[int, int], dict[int, int]]:
    hc: dict[int, int] = {}
    for p in state.frames.values():
        hc[frame_to_index(p)] = hc.get(frame_to_index(p), 0) + 1
    cc: dict[int, int] = {}
    for s, e in state.segments.values():
        for p in range(s, e, PAGE_SIZE):
            cc[frame_to_index(p)] = cc.get(frame_to_index(p), 0) + 1
    return hc, cc


def fresh(state: State) -> State:
    """The same State without any cache (the views and nodes rebuilt too)."""

    def copy_view(v: VmSpaceView) -> VmSpaceView:
        nodes = {p: PageTableNode(n.paddr, n.level, n.path, n.entries) for p, n in v.nodes.items()}
        return VmSpaceView(v.vs, v.root, nodes, v.cursor)

    return dataclasses.replace(
        state,
        vm_spaces={k: copy_view(v) for k, v in state.vm_spaces.items()},
        leaked={k: copy_view(v) for k, v in state.leaked.items()},
    )


# --- random states ------------------------------------------------------------------------------


def _corrupt_slots(rng: random.Random, state: State, count: int) -> State:
    targets = [frame_to_index(n.paddr) for v in state.vm_spaces.values() for n in v.nodes.values()]
    targets += [frame_to_index(pte_paddr(n.entries[k])) for v in state.vm_spaces.values()
                for n in v.nodes.values() for k in range(NR_ENTRIES) if pte_is_present(n.entries[k])]  # fmt: skip
    if not targets:
        return state
    changes: dict[int, Slot] = {}
    for _ in range(count):
        i = rng.choice(targets)
        s = changes.get(i, state.slot(i))
        what = rng.randrange(6)
        if what == 0:
            s = dataclasses.replace(s, rc=rng.choice([0, 1, 2, REF_COUNT_MAX, REF_COUNT_UNIQUE, REF_COUNT_UNUSED]))
        elif what == 1:
            s = dataclasses.replace(s, usage=rng.choice(list(Usage)))
        elif what == 2:
            s = dataclasses.replace(s, paths=frozenset())
        elif what == 3:
            s = dataclasses.replace(s, paths=s.paths | {(rng.randrange(4), rng.randrange(512))})
        elif what == 4:
            s = dataclasses.replace(s, node=None)
        else:
            s = dataclasses.replace(s, inl=rng.randrange(2), sto=None)
        changes[i] = s
    slots = with_slot_changes(state.slots, changes)  # a SlotTable shares the unchanged chunks
    return dataclasses.replace(state, slots=slots, parent=state, changed=frozenset(changes))


def _corrupt_nodes(rng: random.Random, state: State, count: int) -> State:
    """Rewrite entries: cleared, a huge leaf anywhere, or a pointer at another node of a lower
    level (so nodes are shared, never a cycle)."""
    spaces = dict(state.vm_spaces)
    if not spaces:
        return state
    for _ in range(count):
        vs = rng.choice(sorted(spaces))
        view = spaces[vs]
        nodes = dict(view.nodes)
        node = nodes[rng.choice(sorted(nodes))]
        entries = list(node.entries)
        k = rng.choice(range(256) if node.level == NR_LEVELS else range(NR_ENTRIES))
        lower = [n for n in nodes.values() if n.level < node.level]
        what = rng.randrange(3)
        if what == 0:
            entries[k] = 0
        elif what == 1 or not lower:
            entries[k] = (rng.randrange(1, 4096) * PAGE_SIZE) | 0x83
        else:
            entries[k] = rng.choice(lower).paddr | 0x7
        nodes[node.paddr] = dataclasses.replace(node, entries=tuple(entries))
        spaces[vs] = dataclasses.replace(view, nodes=nodes)
    return dataclasses.replace(state, vm_spaces=spaces, parent=state, changed=frozenset())


def random_states(seed: int) -> list[tuple[State, State]]:
    """(before, after) pairs: random ops from boot, some afters with slots / nodes corrupted."""
    rng = random.Random(seed)
    run = Run()
    out: list[tuple[State, State]] = []
    for _ in range(40):
        before = run.state
        run.do(random_op(rng, before))
        after = clean = run.state
        if rng.random() < 0.3:
            after = _corrupt_slots(rng, after, rng.randrange(1, 5))
        if rng.random() < 0.2:
            after = _corrupt_nodes(rng, after, rng.randrange(1, 4))
        out.append((before, after))
        # the model goes on from its own state (it cannot interpret a corrupted tree)
        run.state = BASE if run.last and run.last[2].status.name == "PANIC" else clean
    return out


# --- the comparisons ----------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_metaregion_sound_equals_the_walk(seed: int) -> None:
    rng = random.Random(seed ^ 0x5EED)
    for before, after in random_states(seed):
        for state in (before, after):
            for vs, view in list(state.vm_spaces.items()) + list(state.leaked.items()):
                assert metaregion_sound(state, vs, "S7") == ref_metaregion_sound(state, vs, "S7")
                changed = set(after.changed or ()) if state is after else set()
                node_paddrs = sorted(view.nodes)
                targets = sorted({t for n in view.nodes.values() for _k, _p, t, _l in n.present})
                for _ in range(3):
                    only = changed | set(rng.sample(targets, min(len(targets), rng.randrange(4))))
                    nodes = set(rng.sample(node_paddrs, min(len(node_paddrs), rng.randrange(3))))
                    for n in (None, nodes, inv.changed_nodes(before, after, vs) if state is after else None):
                        got = metaregion_sound(state, vs, "X", only, n)
                        assert got == ref_metaregion_sound(state, vs, "X", only, n)
                        assert got == ref_metaregion_sound(fresh(state), vs, "X", only, n)
            assert metaregion_sound(state, 999, "S7") == ref_metaregion_sound(state, 999, "S7")


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_full_soundness_reused_per_node_in_any_order(seed: int) -> None:
    """The full form keeps each node's last result with the slot table it was computed on and
    reuses it where no target's Slot object differs: visiting the states out of order (and
    each twice) still gives the from-scratch result every time."""
    rng = random.Random(seed)
    states = [s for pair in random_states(seed) for s in pair]
    assert any(isinstance(s.slots, SlotTable) for s in states)
    order = list(range(len(states))) * 2
    rng.shuffle(order)
    for i in order:
        state = states[i]
        for vs in list(state.vm_spaces) + list(state.leaked):
            assert metaregion_sound(state, vs, "OC-4") == ref_metaregion_sound(fresh(state), vs, "OC-4")


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_full_soundness_after_one_slot_changes(seed: int) -> None:
    """A State and a copy with one slot of its tree corrupted (sharing every other chunk of the
    slot table): the full form, asked on each in turn, re-evaluates exactly what it must."""
    rng = random.Random(seed)
    for _before, after in random_states(seed):
        for vs, view in after.vm_spaces.items():
            targets = sorted({t for n in view.nodes.values() for _k, _p, t, _l in n.present})
            if not targets:
                continue
            bad = _corrupt_slots(rng, after, 1)
            t = rng.choice(targets)
            other = dataclasses.replace(
                after, slots=with_slot_changes(after.slots, {t: Slot(rc=rng.choice([0, REF_COUNT_UNUSED]))})
            )
            # the same slots, other parked domains: a leaf's target unparked, a smaller RAM
            unparks = dataclasses.replace(after, leaked={**after.leaked, 999: VmSpaceView(999, t * PAGE_SIZE, {})})
            shrunk = dataclasses.replace(after, nr_slots=t)
            for state in (after, other, bad, unparks, after, shrunk, other, bad, after):
                assert metaregion_sound(state, vs, "S7") == ref_metaregion_sound(fresh(state), vs, "S7")


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_mappings_walk_order_and_counts_equal_from_scratch(seed: int) -> None:
    for _before, after in random_states(seed):
        for view in list(after.vm_spaces.values()) + list(after.leaked.values()):
            got = view.mappings()
            want = ref_mappings(view)
            assert list(got.items()) == list(want.items())  # same order too
            assert view.mappings() is got  # cached per view
            assert view.mapped_paddrs() == {mp.paddr for mp in want.values()}
            assert view.with_cursor(view.cursor + 1).mappings() is got  # the same tree: caches carry over
            assert [(n, k, p) for n in view.walk_nodes for k, p, _t, _l in n.present] == list(walk(view))
        assert inv.unparked(after) == ref_unparked(after)
        assert (after.handle_counts(), after.cover_counts()) == ref_counts(after)


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_memoised_invariants_equal_a_fresh_evaluation(seed: int) -> None:
    rng = random.Random(seed)
    for before, after in random_states(seed):
        scopes: list[set[int] | None] = [None, set(after.changed or ()), {rng.randrange(after.nr_slots)}]
        for only in scopes:
            first = inv.check_invariants(after, only=only)
            again = inv.check_invariants(after, only=only)
            assert first == again
            first.append(Violation("X", None, "", None, None, ""))  # a caller's list is its own
            assert inv.check_invariants(after, only=only) == again
            scratch = fresh(after)
            assert again == inv.structural_inv(scratch, only) + inv.accounting_inv(scratch, only)
        assert inv.check_invariants(before) == inv.check_invariants(fresh(before))


def test_corruption_reaches_the_checks() -> None:
    """The random states above are not all clean: the comparisons compare violations."""
    found = trees = 0
    for seed in range(5):
        for _before, after in random_states(seed):
            for vs, view in after.vm_spaces.items():
                found += len(metaregion_sound(after, vs))
                trees += any(n.present for n in view.nodes.values())
    assert found > 0 and trees > 10


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_range_queries_equal_filtering_every_mapping(seed: int) -> None:
    """The MMU probes' plan asks for a range (hil/check/oracles.py MmuProbes.plan): the same
    leaves, in the same order, as filtering every mapping, on corrupted trees too."""
    rng = random.Random(seed)
    for _before, after in random_states(seed):
        for view in list(after.vm_spaces.values()) + list(after.leaked.values()):
            every = ref_mappings(view)
            vas = sorted(every)
            bounds = [0, 1 << 47, rng.randrange(1 << 47)] + [va + d for va in rng.sample(vas, min(3, len(vas)))
                                                             for d in (0, 1, -PAGE_SIZE)]  # fmt: skip
            for lo in bounds:
                for hi in bounds:
                    limit = rng.choice([1, 3, 14, 10**6])
                    want = [va for va in vas if lo <= va < hi][:limit]
                    assert list(view.mappings_in(lo, hi, limit).items()) == [(va, every[va]) for va in want]
                    outside = [va for va in vas if not lo <= va < hi][:1]
                    got = view.first_mapping_outside(lo, hi)
                    assert ([got.va] if got is not None else []) == outside
                    if got is not None:
                        assert got == every[got.va]
