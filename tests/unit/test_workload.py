"""The workload reaches the interesting states (run against the reference model alone, so
this needs no QEMU): several VmSpaces sharing frames, re-maps, whole-subtree unmaps at
2 MiB / 1 GiB / 512 GiB, queries of absent and present VAs, protect with every supported
cache policy, clones dropped, error paths — and the same seed gives the same ops."""

from __future__ import annotations

import random
from collections import Counter

from hil.run.workload import MappedFrames, Workload, WorkloadConfig, _nth_of_merge
from hil.target import abi
from model import ops as m
from model import store
from model.types import REF_COUNT_UNUSED, CachePolicy, PageProperty, Usage, pte_prop


def _layout(state) -> abi.Layout:  # type: ignore[no-untyped-def]
    b = store.boot_layout()
    return abi.Layout(abi.LAYOUT_MAGIC, abi.ABI_VERSION, b.ram_size, b.meta_start, 64, b.ram_size // 4096,
                      b.kernel_root, 0, 64, 2048, 0, b.pt_pool_start, b.pt_pool_end, b.data_pool_start,
                      b.data_pool_end, 0, 0, 0)  # fmt: skip


def drive(seed: int, n: int) -> tuple[list[m.Op], Counter[str]]:
    state = store.initial_state(registry_capacity=2048)
    lay = _layout(state)
    wl = Workload(seed, lay, WorkloadConfig())
    seen: Counter[str] = Counter()
    ops = []
    for _ in range(n):
        op = wl(state)
        ops.append(op)
        pool = store.PoolAllocator(lay.pt_pool_start, lay.pt_pool_end, state)
        res, after = store.apply(state, op, pool)
        seen[res.status.name] += 1
        if isinstance(op, m.Map) and res.get("replaced"):
            seen["remap"] += 1
        if isinstance(op, m.Query) and res.status == m.Status.OK:
            seen["query present" if res.get("present") else "query absent"] += 1
        if isinstance(op, m.ProtectNext) and res.get("found"):
            va = res.get("start")
            cur = after.cursors[op.cursor]
            pte = after.vm_spaces[cur.vs].mappings()[va].pte
            seen[f"protect {pte_prop(pte).cache.name}"] += 1
        if isinstance(op, m.Unmap):
            for i in after.changed or ():
                b, a = state.slot(i), after.slot(i)
                if b.usage == Usage.PAGE_TABLE and b.rc != REF_COUNT_UNUSED and a.rc == REF_COUNT_UNUSED:
                    assert b.sto is not None
                    seen[f"freed level-{b.sto[1]} node"] += 1
        if isinstance(op, m.FrameDrop) and res.status == m.Status.OK:
            seen["frame dropped"] += 1
        for i in after.changed or () if isinstance(op, m.Map) else ():
            slot = after.slot(i)
            if slot.refs >= 2 and slot.usage == Usage.FRAME:
                seen["frame mapped twice"] += 1
                if len(slot.paths) < slot.refs:
                    seen["same path in two VmSpaces"] += 1
                break
        # after a panic the harness reboots
        state = store.initial_state(registry_capacity=2048) if res.status == m.Status.PANIC else after
    return ops, seen


def test_workload_reaches_the_interesting_states() -> None:
    _, seen = drive(1, 3000)
    for what in ("remap", "query present", "query absent", "freed level-1 node", "freed level-2 node",
                 "freed level-3 node", "protect WRITEBACK", "protect WRITETHROUGH", "protect UNCACHEABLE",
                 "frame dropped", "frame mapped twice", "same path in two VmSpaces", "ERR", "PANIC"):  # fmt: skip
        assert seen[what] > 0, (what, seen)


def test_same_seed_same_ops() -> None:
    assert drive(5, 300)[0] == drive(5, 300)[0]
    assert drive(5, 300)[0] != drive(6, 300)[0]


def test_props_are_ones_exec_accepts() -> None:
    from hil.run.workload import PROPS, TRANSFORMS

    assert all(isinstance(p, PageProperty) and p.inv() and p.flags & 1 for p in PROPS)
    assert all(t.valid() for t in TRANSFORMS)
    assert {p.cache for p in PROPS} >= {CachePolicy.WRITEBACK, CachePolicy.WRITETHROUGH, CachePolicy.UNCACHEABLE}


def test_default_workload_reaches_every_outcome_row_within_3000_ops() -> None:
    from hil.run.outcomes import OutcomeCoverage

    for seed in (1, 2, 3):
        state = store.initial_state(registry_capacity=2048)
        lay = _layout(state)
        wl = Workload(seed, lay, WorkloadConfig())
        cov = OutcomeCoverage()
        for _ in range(3000):
            op = wl(state)
            res, after = store.apply(state, op, store.PoolAllocator(lay.pt_pool_start, lay.pt_pool_end, state))
            cov.record(op, state, after, res)
            state = store.initial_state(registry_capacity=2048) if res.status == m.Status.PANIC else after
        assert not cov.missing(), (seed, cov.missing())


def test_mapped_frames_follow_the_views_as_a_full_union_would() -> None:
    """The incremental index of mapped frames (hil/run/workload.py MappedFrames) equals the
    union of every view's mapped_paddrs after each op of a model-driven run, and the
    FrameFromInUse draw picks from exactly sorted(handles | mapped | kernel root)."""
    state = store.initial_state(registry_capacity=2048)
    lay = _layout(state)
    wl = Workload(7, lay, WorkloadConfig())
    index = MappedFrames()
    checked = 0
    for _ in range(1500):
        op = wl(state)
        pool = store.PoolAllocator(lay.pt_pool_start, lay.pt_pool_end, state)
        res, after = store.apply(state, op, pool)
        state = store.initial_state(registry_capacity=2048) if res.status == m.Status.PANIC else after
        want = sorted(frozenset().union(*(v.mapped_paddrs() for v in state.vm_spaces.values())))
        assert index.update(state.vm_spaces.values()) == want
        checked += bool(want)
    assert checked > 500  # most states map something


def test_nth_of_a_merge_is_the_merged_lists_nth() -> None:
    rng = random.Random(5)
    for _ in range(300):
        pool = rng.sample(range(1000), rng.randrange(1, 60))
        cut = rng.randrange(len(pool) + 1)
        big, small = sorted(pool[:cut]), sorted(pool[cut:])
        merged = sorted(pool)
        assert [_nth_of_merge(big, small, n) for n in range(len(merged))] == merged
