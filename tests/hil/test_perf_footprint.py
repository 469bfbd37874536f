"""The snapshot reads only an op's footprint, yet a corrupted byte in each field class is found
at the op right after it, in default and gdb-only mode: the op (a Nop, or a Query elsewhere)
names none of these bytes; the poke event does (hil/run/trace.py Poke -> Session.poke)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from hil.check import Kind
from hil.run.runner import Runner
from hil.run.session import Session
from hil.run.trace import Poke
from hil.target import abi
from model import ops as m
from model.types import PAGE_SIZE, Usage

VA = 0x3000


def _setup(shared: bool) -> tuple[Session, Runner, int]:
    # full_every=0: no periodic full read, so only the footprint (and the poke) can find it
    session = Session(shared_ram=shared, full_every=0)
    try:
        runner = Runner(session, probes=False)
        runner.start()
        assert session.layout is not None
        paddr = session.layout.data_pool_start
        ops = [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=1 << 40), m.FrameFromUnused(paddr=paddr),
               m.Jump(cursor=1, va=VA), m.Map(cursor=1, frame=1), m.Jump(cursor=1, va=1 << 39 - 1),
               m.FrameFromUnused(paddr=paddr + PAGE_SIZE)]  # fmt: skip
        for op in ops:
            assert not [f for f in runner.step(op).findings if f.kind == Kind.IMPL]
    except BaseException:
        session.close()
        raise
    return session, runner, paddr


def _node(runner: Runner, level: int) -> int:
    assert runner.state is not None
    (node,) = [n for n in runner.state.vm_spaces[1].nodes.values() if n.level == level]
    return node.paddr


def _registry_entry(s: Session, kind: int, ident: int) -> int:
    assert s.layout is not None
    lay = s.layout
    for i in range(1, lay.registry_entries):
        at = lay.registry_base + i * lay.registry_entry_size
        if struct.unpack("<QQ", s.memory.read(at, 16)) == (kind, ident):  # type: ignore[union-attr]
            return at
    raise AssertionError("no such registry entry")


def _kroot(s: Session, index: int) -> int:
    assert s.layout is not None
    return s.layout.kernel_root + 8 * index


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _slot(s: Session, paddr: int) -> int:
    assert s.layout is not None
    return s.layout.meta_base + 64 * (paddr // PAGE_SIZE)


# field class -> (paddr, bytes) of the corruption
CORRUPT: dict[str, Callable[[Session, Runner, int], tuple[int, bytes]]] = {
    "slot.rc": lambda s, r, f: (_slot(s, f) + 40, _u64(5)),
    "slot.type_word": lambda s, r, f: (_slot(s, f) + 48, _u64(int(Usage.PAGE_TABLE))),
    "slot.in_list": lambda s, r, f: (_slot(s, f) + 56, _u64(1)),
    "slot.storage": lambda s, r, f: (_slot(s, f) + 8, b"\x01"),
    "pt_slot.nr_children": lambda s, r, f: (_slot(s, _node(r, 1)) + abi.SLOT_OFF_PT_NR_CHILDREN, b"\x07\x00"),
    "pte.flags": lambda s, r, f: (_node(r, 1) + 8 * (VA >> 12), _u64(s.read_u64(_node(r, 1) + 8 * (VA >> 12)) & ~2)),
    "pte.addr": lambda s, r, f: (_node(r, 1) + 8 * (VA >> 12),
                                 _u64(s.read_u64(_node(r, 1) + 8 * (VA >> 12)) ^ (0x10 << 12))),
    "table_entry": lambda s, r, f: (_node(r, 2), _u64(s.read_u64(_node(r, 2)) ^ 4)),  # US of the PDE
    "registry.frame": lambda s, r, f: (_registry_entry(s, abi.REG_FRAME, 2) + 16, _u64(f + 2 * PAGE_SIZE)),
    "registry.cursor": lambda s, r, f: (_registry_entry(s, abi.REG_CURSOR, 1) + 48, _u64(VA + PAGE_SIZE)),
}  # fmt: skip


@pytest.mark.parametrize("shared", [True, False], ids=["default", "gdb-only"])
@pytest.mark.parametrize("field", sorted(CORRUPT))
def test_corrupted_byte_is_found_at_the_next_op(shared: bool, field: str) -> None:
    session, runner, frame_paddr = _setup(shared)
    try:
        paddr, data = CORRUPT[field](session, runner, frame_paddr)
        assert session.memory is not None and session.memory.read(paddr, len(data)) != data
        runner.step(Poke(paddr, data))
        assert session.memory.read(paddr, len(data)) == data
        rec = runner.step(m.Nop(value=3))  # its footprint: nothing of the above
        impl = [f for f in rec.findings if f.kind == Kind.IMPL]
        assert impl, f"{field}: the corruption went unnoticed"
    finally:
        session.close()


@pytest.mark.parametrize("shared", [True, False], ids=["default", "gdb-only"])
def test_corruption_next_to_an_op_that_writes_elsewhere(shared: bool) -> None:
    """The op after the poke writes (the cursor's registry entry) but not the corrupted PTE:
    found at that op; the next op (a query cloning the frame) reads the PTE as corrupted."""
    session, runner, frame_paddr = _setup(shared)
    try:
        assert session.layout is not None
        pte = _node(runner, 1) + 8 * (VA >> 12)
        runner.step(Poke(pte, _u64(session.read_u64(pte) ^ 0x10)))  # PCD: another cache policy
        first = runner.step(m.Jump(cursor=1, va=VA))  # writes the cursor's registry entry only
        assert [f for f in first.findings if f.kind == Kind.IMPL and f.clause == "PTE"], first
        rec = runner.step(m.Query(cursor=1))
        assert rec.result is not None and rec.result.status == m.Status.OK
        assert runner.state is not None and runner.state.slot_of(frame_paddr).rc == 2  # the clone, the PTE
    finally:
        session.close()


@pytest.mark.parametrize("shared", [True, False], ids=["default", "gdb-only"])
def test_a_poked_kernel_root_entry_is_in_the_next_state(shared: bool) -> None:
    """The kernel root's upper half is read again only when a poke names its page (no op
    writes it; the periodic full read covers the rest). The checks do not compare it with
    the model today; the State must still carry what the guest holds."""
    session, runner, _ = _setup(shared)
    try:
        new = session.read_u64(_kroot(session, 384)) ^ (1 << 63)  # NX of an entry the guest never uses
        runner.step(Poke(_kroot(session, 384), _u64(new)))
        runner.step(m.Nop(value=3))
        assert runner.state is not None and runner.state.kernel_upper[384 - 256] == new & ~0x60  # A/D masked
    finally:
        session.close()
