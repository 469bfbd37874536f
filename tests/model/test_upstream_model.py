"""model/upstream.py: the upstream-OSTD overrides, each against vostd's model on the same ops."""

from __future__ import annotations

import dataclasses

import pytest

from model import ops as o
from model import store, upstream
from model.ops import OpResult, PanicCode
from model.state import State
from model.types import PAGE_SIZE, CachePolicy, PageFlags, PageProperty, PrivFlags, PropTransform, pte_index
from tests.model.model_helpers import BASE, LAY, data, with_slot


class Up:
    """Ops through one exec's model (upstream by default)."""

    def __init__(self, model: upstream.Model = upstream.apply) -> None:
        self.model = model
        self.state: State = BASE

    def do(self, op: o.Op) -> OpResult:
        res, self.state = self.model(self.state, op, store.PoolAllocator(LAY.pt_pool_start, LAY.pt_pool_end,
                                                                         self.state))  # fmt: skip
        return res

    def ok(self, op: o.Op) -> OpResult:
        res = self.do(op)
        assert res.status == o.Status.OK, (op, res)
        return res

    def space(self) -> tuple[int, int]:
        vs = self.ok(o.NewVmSpace()).get("vs")
        return vs, self.ok(o.OpenCursorMut(vs=vs, start=0, end=1 << 30)).get("cursor")

    def frame(self, k: int) -> int:
        return self.ok(o.FrameFromUnused(paddr=data(k))).get("frame")

    def leaf(self, vs: int, va: int) -> int:
        view = self.state.vm_spaces[vs]
        node = view.nodes[view.root]
        for level in (4, 3, 2):
            node = view.nodes[node.entries[pte_index(va, level)] & 0x000F_FFFF_FFFF_F000]
        return node.entries[pte_index(va, 1)]


def test_apply_for_selects_the_model_by_exec_name() -> None:
    assert upstream.apply_for("vostd") is store.apply
    assert upstream.apply_for("upstream") is upstream.apply
    with pytest.raises(ValueError, match="unknown exec 'nope'"):
        upstream.apply_for("nope")


@pytest.mark.parametrize("name", upstream.EXECS)
def test_query_rc_and_handle(name: str) -> None:
    r = Up(upstream.apply_for(name))
    vs, c = r.space()
    r.ok(o.Map(cursor=c, frame=r.frame(0)))
    r.ok(o.Jump(cursor=c, va=0))
    res = r.ok(o.Query(cursor=c))
    rc = r.state.slot_of(data(0)).rc
    if name == "upstream":  # borrowed: no handle, rc untouched
        assert res.get("frame") == 0 and rc == 1 and not r.state.frames
    else:  # vostd: Frame::clone
        assert res.get("frame") != 0 and rc == 2 and r.state.frames[res.get("frame")] == data(0)


def test_map_over_mapped_panics_after_the_descent() -> None:
    r = Up()
    vs, c = r.space()
    r.ok(o.Map(cursor=c, frame=r.frame(0)))
    r.ok(o.Jump(cursor=c, va=0))
    old = r.leaf(vs, 0)
    res = r.do(o.Map(cursor=c, frame=r.frame(1)))
    assert res == OpResult.panic(PanicCode.MAP_ALREADY_MAPPED)
    assert r.leaf(vs, 0) == old
    assert r.state.slot_of(data(0)).rc == 1 and r.state.slot_of(data(1)).rc == 1  # the handle moved in
    v = Up(store.apply)
    vs2, c2 = v.space()
    v.ok(o.Map(cursor=c2, frame=v.frame(0)))
    v.ok(o.Jump(cursor=c2, va=0))
    assert v.ok(o.Map(cursor=c2, frame=v.frame(1))).get("replaced") == 1  # vostd replaces


@pytest.mark.parametrize(
    ("cache", "bits"),
    [(CachePolicy.WRITEBACK, 0), (CachePolicy.WRITETHROUGH, 0x8), (CachePolicy.WRITE_COMBINING, 0x10),
     (CachePolicy.UNCACHEABLE, 0x18)],
)  # fmt: skip
def test_pte_cache_encoding_round_trips(cache: CachePolicy, bits: int) -> None:
    prop = PageProperty(int(PageFlags.R | PageFlags.W), cache, int(PrivFlags.USER))
    raw = upstream.pte_new_page(data(3), prop)
    assert raw & 0x18 == bits and raw & 0x80
    assert upstream.pte_prop(raw) == prop
    r = Up()
    vs, c = r.space()
    r.ok(o.Map(cursor=c, frame=r.frame(0), prop=prop))
    assert r.leaf(vs, 0) & 0x18 == bits


def test_write_protected_panics_and_pat_msr_value() -> None:
    r = Up()
    vs, c = r.space()
    res = r.do(o.Map(cursor=c, frame=r.frame(0), prop=PageProperty(1, CachePolicy.WRITE_PROTECTED, 1)))
    assert res == OpResult.panic(PanicCode.UNSUPPORTED_CACHE)
    entries = [(upstream.PAT_MSR >> (8 * i)) & 0xFF for i in range(8)]
    assert entries == [0x06, 0x04, 0x01, 0x00] * 2  # WB WT WC UC, twice (bit 7 set on every leaf)


def test_protect_next_to_write_combining_is_encoded_not_a_panic() -> None:
    r = Up()
    vs, c = r.space()
    r.ok(o.Map(cursor=c, frame=r.frame(0)))
    r.ok(o.Jump(cursor=c, va=0))
    tr = PropTransform(cache=int(CachePolicy.WRITE_COMBINING))
    res = r.ok(o.ProtectNext(cursor=c, len=PAGE_SIZE, transform=tr))
    assert res.get("found") == 1 and r.leaf(vs, 0) & 0x18 == 0x10


def test_activate_moves_the_cpu_reference_and_frees_an_active_dropped_space_at_the_next() -> None:
    r = Up()
    kr = r.state.kernel_root
    k = r.state.slot_of(kr)
    r.state = with_slot(r.state, kr // PAGE_SIZE, dataclasses.replace(k, rc=k.rc + 1))  # first_activate
    vs, c = r.space()
    root = r.state.vm_spaces[vs].root
    r.ok(o.Map(cursor=c, frame=r.frame(0)))
    r.ok(o.DropCursor(cursor=c))
    r.ok(o.Activate(vs=vs))
    assert r.state.active == vs and r.state.slot_of(root).rc == 2 and r.state.slot_of(kr).rc == k.rc
    r.ok(o.DropVmSpace(vs=vs))
    assert vs in r.state.leaked and r.state.slot_of(root).rc == 2 and r.state.slot_of(data(0)).rc == 1
    r.ok(o.Activate(vs=0))
    assert not r.state.leaked and r.state.active == 0
    assert r.state.slot_of(root).rc == (1 << 64) - 1 and r.state.slot_of(data(0)).rc == (1 << 64) - 1
    assert r.state.slot_of(kr).rc == k.rc + 1


@pytest.mark.parametrize("seed", range(6))
def test_random_ops_upstream_model_is_pure_and_never_breaks(seed: int) -> None:
    """Random ops (model_helpers.random_op: bad ids, panics, several cursors per VmSpace) through
    the upstream model: no exception of the model's own (a broken cursor path, a stale node), the
    input State's cursors and trees are never mutated, and every live cursor's path from the root
    to its guard node exists."""
    import random

    from tests.model.model_helpers import random_op

    rng = random.Random(seed)
    r = Up()
    for _ in range(600):
        op = random_op(rng, r.state)
        before = r.state
        cursors, spaces = dict(before.cursors), dict(before.vm_spaces)
        res = r.do(op)
        assert dict(before.cursors) == cursors and dict(before.vm_spaces) == spaces  # apply is pure
        if res.status == o.Status.PANIC:
            r.state = BASE  # the guest reboots after a panic
        for c in r.state.cursors.values():
            view = r.state.vm_spaces[c.vs]
            node = view.nodes[view.root]
            for level in range(4, c.guard_level, -1):
                pte = node.entries[pte_index(c.start, level)]
                assert pte & 1, (op, c)
                node = view.nodes[pte & 0x000F_FFFF_FFFF_F000]
