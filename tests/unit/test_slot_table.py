"""The persistent slot table: a derived table shares what did not change."""

from __future__ import annotations

import pytest

from model.state import UNUSED_SLOT, Slot, SlotTable, with_slot_changes


def test_updated_copies_only_the_touched_chunks() -> None:
    base = SlotTable.dense([UNUSED_SLOT] * 1000)
    a = base.updated({5: Slot(rc=1), 999: Slot(rc=2)})
    assert a[5] == Slot(rc=1) and a[999] == Slot(rc=2) and a[6] is UNUSED_SLOT
    assert base[5] is UNUSED_SLOT, "the base is never changed"
    shared = sum(x is y for x, y in zip(a._chunks, base._chunks, strict=True))
    assert shared == len(base._chunks) - 2
    assert len(a) == 1000 and list(a)[:3] == [0, 1, 2] and 999 in a and 1000 not in a
    assert a.get(1000) is None and a.get(-1) is None
    with pytest.raises(KeyError):
        base.updated({1000: Slot()})
    with pytest.raises(KeyError):
        _ = a[1000]


def test_equality_with_tables_and_plain_mappings() -> None:
    base = SlotTable.dense([UNUSED_SLOT] * 600)
    a = base.updated({300: Slot(rc=3)})
    b = base.updated({300: Slot(rc=3)})
    assert a == b and a != base
    plain = dict(enumerate(a.values()))
    assert a == plain
    assert with_slot_changes(plain, {1: Slot(rc=9)})[1] == Slot(rc=9)
    assert SlotTable.of(plain, 600) == a
    assert SlotTable.of({0: Slot(rc=1)}, 3) == SlotTable.dense([Slot(rc=1), UNUSED_SLOT, UNUSED_SLOT])
