"""The flush log as data: exec's invalidations predicted from the model's before/after (no QEMU)."""

from __future__ import annotations

from hil.check import oracles
from hil.target import abi
from model import ops as m
from model import store
from model.state import State
from model.types import PAGE_SIZE, PropTransform

MIB = 1 << 20
GIB = 1 << 30


def run(ops: list[m.Op]) -> list[tuple[m.Op, State, State, m.OpResult]]:
    lay = store.boot_layout()
    state = store.initial_state(registry_capacity=2048)
    out = []
    for op in ops:
        res, after = store.apply(state, op, store.PoolAllocator(lay.pt_pool_start, lay.pt_pool_end, state))
        out.append((op, state, after, res))
        state = after
    return out


def flushes(ops: list[m.Op]) -> list[tuple[int, ...]]:
    return [oracles.expected_flushes(op, b, a, r) for op, b, a, r in run(ops)]


def test_flushes_per_op() -> None:
    pool = store.boot_layout().data_pool_start
    ops: list[m.Op] = [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=GIB)]
    ops += [m.FrameFromUnused(paddr=pool + i * PAGE_SIZE) for i in range(3)]
    ops += [m.Map(cursor=1, frame=1), m.Map(cursor=1, frame=2)]  # fresh VAs: nothing to invalidate
    ops += [m.Jump(cursor=1, va=PAGE_SIZE), m.Map(cursor=1, frame=3)]  # re-map: its page
    ops += [m.Jump(cursor=1, va=0), m.ProtectNext(cursor=1, len=PAGE_SIZE, transform=PropTransform())]
    ops += [m.Jump(cursor=1, va=0), m.Unmap(cursor=1, len=4 * PAGE_SIZE)]  # each page taken
    got = flushes(ops)
    assert got[5:7] == [(), ()]
    assert got[8] == (PAGE_SIZE,)
    assert got[10] == ()  # protect_next issues none (spec §5.9)
    assert got[12] == (0, PAGE_SIZE)


def test_a_taken_subtree_longer_than_32_pages_flushes_all() -> None:
    pool = store.boot_layout().data_pool_start
    ops: list[m.Op] = [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=GIB), m.FrameFromUnused(paddr=pool)]
    ops += [m.Map(cursor=1, frame=1), m.Jump(cursor=1, va=4 * MIB), m.Jump(cursor=1, va=0)]
    ops += [m.Unmap(cursor=1, len=2 * MIB)]
    got = flushes(ops)
    assert got[-1] == (abi.FLUSH_LOG_ALL,)
