"""The QEMU-translation oracle renders our walk node by node and reuses a node's lines only
while its bytes are unchanged (`NodeLines`): after any edit of a node, a leaf entry or the
tree's shape (nodes reached twice, pointers beyond RAM), its lines equal a walk from scratch
(`our_info_tlb`), and a test's walker is never cached."""

from __future__ import annotations

import random

from hil.check import oracles
from hil.check.oracles import QemuTranslation, our_info_tlb
from hil.target.memory import DictMemory

P, RW, US, B7, NX = 0x1, 0x2, 0x4, 0x80, 1 << 63
TABLE = P | RW | US
RAM = 16 << 20
ROOT = 0x1000
NODES = [0x2000 + 0x1000 * k for k in range(12)]  # candidate table pages


def _oracle(mem: DictMemory) -> QemuTranslation:
    return QemuTranslation(mem, None, lambda _cmd: "", every=1)  # type: ignore[arg-type]


def _edit(rng: random.Random, mem: DictMemory) -> None:
    table = rng.choice([ROOT, *NODES])
    index = rng.randrange(512) if rng.random() < 0.5 else rng.randrange(4)
    what = rng.randrange(4)
    if what == 0:
        value = 0
    elif what == 1:
        value = rng.choice(NODES) | TABLE  # a table pointer (maybe a node reached twice)
    elif what == 2:
        value = (rng.randrange(0x100, 0x800) << 12) | P | RW | US | B7 | (NX if rng.random() < 0.5 else 0)
    else:
        value = (rng.randrange(0x100, 0x800) << 12) | P | US
    mem.write_u64(table + 8 * index, value)


def test_kept_walk_equals_a_fresh_walk_after_every_edit() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        mem = DictMemory(RAM)
        mem.write_u64(ROOT, NODES[0] | TABLE)
        mem.write_u64(NODES[0], NODES[1] | TABLE)
        mem.write_u64(NODES[1], NODES[2] | TABLE)
        mem.write_u64(NODES[2] + 8, (0x300 << 12) | P | RW | US)
        qt = _oracle(mem)
        for step in range(60):
            if step % 3:
                _edit(rng, mem)
            for user_only in (True, False):
                assert qt.ours(ROOT, user_only) == our_info_tlb(mem, ROOT, user_only), (seed, step)


def test_only_changed_nodes_are_rendered_again_and_the_kept_trees_are_bounded() -> None:
    mem = DictMemory(RAM)
    mem.write_u64(ROOT, NODES[0] | TABLE)
    mem.write_u64(NODES[0], NODES[1] | TABLE)
    mem.write_u64(NODES[1], NODES[2] | TABLE)
    mem.write_u64(NODES[2], (0x300 << 12) | P | RW | US)
    qt = _oracle(mem)
    first = qt.ours(ROOT, True)
    assert len(first) == 1 and qt.walks.rendered == 4
    assert qt.ours(ROOT, True) == first and qt.walks.rendered == 4  # nothing changed: nothing rendered
    mem.write_u64(NODES[2] + 8, (0x301 << 12) | P | RW | US)  # a leaf node's byte
    assert len(qt.ours(ROOT, True)) == len(first) + 1 and qt.walks.rendered == 5  # that node only
    mem.write_u64(RAM - 8, 1)  # a byte no walk reads
    qt.ours(ROOT, True)
    assert qt.walks.rendered == 5
    for k in range(oracles.KEPT_WALKS + 4):
        qt.ours(NODES[k % len(NODES)], True)
    assert len(qt.walks.trees) <= oracles.KEPT_WALKS


def test_pointers_beyond_ram_and_nodes_reached_twice_are_walked_as_from_scratch() -> None:
    mem = DictMemory(RAM)
    mem.write_u64(ROOT, NODES[0] | TABLE)
    mem.write_u64(ROOT + 8, NODES[0] | TABLE)  # reached twice: not descended again
    mem.write_u64(ROOT + 16, (RAM + 0x1000) | TABLE)  # beyond RAM
    mem.write_u64(NODES[0], NODES[1] | TABLE)
    mem.write_u64(NODES[1], NODES[2] | TABLE)
    mem.write_u64(NODES[2], (0x300 << 12) | P | RW | US)
    qt = _oracle(mem)
    for user_only in (True, False):
        assert qt.ours(ROOT, user_only) == our_info_tlb(mem, ROOT, user_only) and len(qt.ours(ROOT, user_only)) == 1


def test_a_tests_walker_is_called_every_time() -> None:
    mem = DictMemory(RAM)
    calls: list[int] = []

    def walker(memory: object, root: int, user_only: bool) -> list[oracles.TlbLine]:
        calls.append(root)
        return []

    qt = _oracle(mem)
    qt.walker = walker
    qt.ours(ROOT, True)
    qt.ours(ROOT, True)
    assert calls == [ROOT, ROOT] and not qt.walks.trees
