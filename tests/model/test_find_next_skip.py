"""find_next_impl skips a run of absent entries in one go (`_Cursor.skip_absent`); the model's
predictions must be exactly those of the one-entry-at-a-time loop it replaces (move_forward per
absent entry): the result and the whole after-State, cursor position and level included."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import BASE, GiB, Run, random_op

from model import ops as o
from model import store, upstream
from model.state import State
from model.types import PAGE_SIZE, PTE_HUGE


def _stepwise(self: store._Cursor, entries: tuple[int, ...], end: int) -> None:
    self.move_forward()  # the loop then re-reads the next entry: the original algorithm


def _both(state: State, op: o.Op, model: str, pool: tuple[int, int]) -> None:
    apply = upstream.apply if model == "upstream" else store.apply
    fast = apply(state, op, store.PoolAllocator(pool[0], pool[1], state))
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(store._Cursor, "skip_absent", _stepwise)
        slow = apply(state, op, store.PoolAllocator(pool[0], pool[1], state))
    assert fast[0] == slow[0], op
    assert fast[1] == slow[1], op


def _searches(rng: random.Random, state: State) -> list[o.Op]:
    """find_next / unmap / protect_next from each live cursor over random lengths up to its end."""
    out: list[o.Op] = []
    for cid, c in state.cursors.items():
        room = (c.end - c.va) // PAGE_SIZE
        if room <= 0:
            continue
        for pages in {1, room, rng.randint(1, room)}:
            out.append(o.FindNext(cursor=cid, len=pages * PAGE_SIZE))
            if c.mutable:
                out.append(o.Unmap(cursor=cid, len=pages * PAGE_SIZE))
    return out


@pytest.mark.parametrize("model", ["vostd", "upstream"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_skip_absent_predicts_as_the_stepwise_loop(model: str, seed: int) -> None:
    rng = random.Random(seed)
    run = Run()
    for _ in range(40):
        for op in _searches(rng, run.state):
            _both(run.state, op, model, run.pool)
        run.do(random_op(rng, run.state))
        if run.last and run.last[2].status == o.Status.PANIC:
            run.state = BASE


def test_skip_absent_across_sparse_nodes_and_levels() -> None:
    """Leaves far apart (other level-1 / level-2 nodes, empty stretches of 511 entries), a search
    that ends inside a run of absent entries and one that pops levels at a node's end."""
    run = Run()
    vs = run.vm_space()
    cur = run.cursor(vs, 0, 2 * GiB)
    for k, va in enumerate((0x1000, 0x1FF000, 0x20_0000, 0x3FF0_0000, 0x4000_0000 + 0x5000)):
        run.ok(o.Jump(cursor=cur, va=va))
        run.ok(o.Map(cursor=cur, frame=run.frame(k)))
    for va in (0, 0x2000, 0x1FF000, 0x20_1000, 0x3FF0_1000, 0x4000_0000):
        run.ok(o.Jump(cursor=cur, va=va))
        for length in (PAGE_SIZE, 0x10_0000, 0x3FF0_0000, 2 * GiB - va):
            if va + length <= 2 * GiB:
                _both(run.state, o.FindNext(cursor=cur, len=length), "vostd", run.pool)
                _both(run.state, o.Unmap(cursor=cur, len=length), "vostd", run.pool)
                _both(run.state, o.ProtectNext(cursor=cur, len=length), "vostd", run.pool)
    # an entry with PS and no P (a corrupted guest node the model is asked about) counts as present
    view = run.state.vm_spaces[vs]
    leaf_node = next(n for n in view.nodes.values() if n.level == 1 and n.entries[1])
    odd = dataclasses.replace(leaf_node, entries=leaf_node.entries[:7] + (PTE_HUGE,) + leaf_node.entries[8:])
    nodes = {**view.nodes, odd.paddr: odd}
    views = {**run.state.vm_spaces, vs: dataclasses.replace(view, nodes=nodes)}
    corrupted = dataclasses.replace(run.state, vm_spaces=views)
    jumped = Run(corrupted)
    jumped.ok(o.Jump(cursor=cur, va=0x2000))
    _both(jumped.state, o.FindNext(cursor=cur, len=0x10_0000), "vostd", run.pool)
    assert jumped.ok(o.FindNext(cursor=cur, len=0x10_0000)).get("va") == 0x7000
    # the loop itself: the found VA of every leaf in turn, from the start
    run.ok(o.Jump(cursor=cur, va=0))
    found = []
    while True:
        r = run.ok(o.FindNext(cursor=cur, len=2 * GiB - run.state.cursors[cur].va))
        if not r.get("found"):
            break
        found.append(r.get("va"))
        va = r.get("va") + PAGE_SIZE
        if va >= 2 * GiB:
            break
        run.ok(o.Jump(cursor=cur, va=va))
    assert found == [0x1000, 0x1FF000, 0x20_0000, 0x3FF0_0000, 0x4000_5000]
