"""The incremental snapshot (node decodings reused, references updated by difference, slots
and registry entries decoded where their bytes changed) equals a read from scratch, over
random edits of hand-built page tables, metadata and registry (below the wire: DictMemory)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from test_snapshot_decode import (  # the hand-built guest of the decoder tests
    FREE,
    LEAF,
    META,
    R1,
    R1_L1,
    R1_L2,
    R1_L3,
    R2,
    R2_L1,
    R3_L1,
    TABLE,
    F,
    G,
    H,
    entry,
    layout,
    mem,
    put,
    set_reg,
    set_slot,
    slot_bytes,
)  # fmt: skip

from hil.observe.snapshot import Footprint, compare_states, fork_state, read_state
from hil.target import abi
from hil.target.memory import DictMemory

__all__ = ["mem"]  # the fixture
FRAMES = (F, G, H, 0x203000, 0x204000)
TABLES = (R1, R1_L3, R1_L2, R1_L1, R2, R2_L1, R3_L1)


def _edit(rng: random.Random, m: DictMemory) -> set[int]:
    """One random edit; returns the slot indices it wrote (what a footprint would name)."""
    what = rng.randrange(6)
    if what == 0:  # a leaf set or cleared
        put(m, rng.choice((R1_L1, R2_L1, R3_L1)), rng.randrange(512), rng.choice((0, rng.choice(FRAMES) | LEAF)))
    elif what == 1:  # a table entry pointing elsewhere or cleared (a subtree moves or goes)
        put(m, rng.choice((R1_L3, R1_L2)), rng.randrange(2), rng.choice((0, R1_L2 | TABLE, R1_L1 | TABLE)))
    elif what == 2:  # a slot's rc
        f = rng.choice(FRAMES)
        set_slot(m, f, slot_bytes(rng.randrange(1, 5), vt=2, storage=b"\x01"))
        return {f // 4096}
    elif what == 3:  # a slot freed
        f = rng.choice(FRAMES)
        set_slot(m, f, FREE)
        return {f // 4096}
    elif what == 4:  # a handle registered or dropped
        set_reg(m, rng.randrange(7, 12), rng.choice((entry(abi.REG_FREE), entry(abi.REG_FRAME, rng.randrange(3, 9),
                                                                                  rng.choice(FRAMES)))))  # fmt: skip
    else:  # a root entry (a whole tree under another root index)
        put(m, R2, rng.randrange(3), rng.choice((0, R1_L3 | TABLE)))
    return set()


@pytest.mark.parametrize("seed", range(8))
def test_incremental_equals_from_scratch(mem: DictMemory, seed: int) -> None:
    rng = random.Random(seed)
    lay = layout()
    state = read_state(mem, lay)
    for _ in range(60):
        wrote = set()
        for _ in range(rng.randrange(1, 4)):
            wrote |= _edit(rng, mem)
        scratch = read_state(mem, lay, dataclasses.replace(state, raw_cache=None))
        exact = read_state(mem, lay, fork_state(state))
        fp = Footprint(slots=frozenset(wrote), pt_pool=(0, 0))
        partial = read_state(mem, lay, state, footprint=fp)
        for got in (exact, partial):
            assert compare_states(got, scratch) == []
            assert got.changed == scratch.changed
            assert sorted(map(str, got.anomalies)) == sorted(map(str, scratch.anomalies))
        state = partial


def test_a_spent_cache_reads_from_scratch(mem: DictMemory) -> None:
    lay = layout()
    s1 = read_state(mem, lay)
    read_state(mem, lay, s1)  # hands s1's cache on
    with pytest.raises(ValueError, match="gone"):
        fork_state(s1)
    set_slot(mem, G, slot_bytes(2, vt=2, storage=b"\x01"))
    again = read_state(mem, lay, s1)  # still right: from scratch, with s1's ghost usages
    assert again.slot_of(G).rc == 2 and again.changed == frozenset({G // 4096})
    assert META  # the layout's metadata base is where set_slot wrote
