"""Root cause, not cascades: `caused_by` links a finding to the earlier finding that broke its
slot; old traces without the key read back as roots; the summary groups consequences."""

from __future__ import annotations

from hil.check import Causes, Finding, Kind, root_summary
from model import ops as o
from model.invariants import check_invariants
from model.store import initial_state, step
from model.types import frame_to_index


def test_a_finding_on_a_slot_an_earlier_finding_broke_is_its_consequence() -> None:
    s0 = initial_state()
    _, s1 = step(s0, o.NewVmSpace())
    root = frame_to_index(next(iter(s1.vm_spaces.values())).root)
    _, s2 = step(s1, o.FrameFromInUse(paddr=root * 4096))  # a handle on a PT node: S13 breaks
    assert any(v.clause == "S13" for v in check_invariants(s2, only={root}))
    causes = Causes()
    r2 = causes.link([Finding(Kind.SPEC, 0, "VS-NEW-1", "inv:S1/R2", slot=root)], s0)
    assert r2[0].caused_by is None
    broke = causes.link([Finding(Kind.SPEC, 1, "FI-3", "usage", slot=root),
                         Finding(Kind.INVARIANT, 1, "S13", "usage", slot=root)], s1)  # fmt: skip
    assert [f.caused_by for f in broke] == [None, None]
    later = causes.link([Finding(Kind.SPEC, 5, "Q-1", "inv:S13", slot=root),
                         Finding(Kind.SPEC, 5, "MAP-2", "rc", slot=root + 1)], s2)  # fmt: skip
    assert [f.caused_by for f in later] == [1, None]
    assert "consequence of op 1" in later[0].describe()
    # repaired (the before-state holds again at the slot): a new finding there is a root
    again = causes.link([Finding(Kind.SPEC, 9, "Q-1", "inv:S13", slot=root)], s1)
    assert again[0].caused_by is None


def test_r2_at_a_root_does_not_make_later_findings_consequences() -> None:
    s0 = initial_state()
    _, s1 = step(s0, o.NewVmSpace())
    root = frame_to_index(next(iter(s1.vm_spaces.values())).root)
    causes = Causes()
    causes.link([Finding(Kind.INVARIANT, 0, "S1/R2", "slots", slot=root)], s0)
    (f,) = causes.link([Finding(Kind.SPEC, 1, "VS-DROP", "rc", slot=root)], s1)
    assert f.caused_by is None


def test_caused_by_round_trips_and_is_optional_in_old_traces() -> None:
    f = Finding(Kind.SPEC, 7, "MAP-4", "rc", slot=3, caused_by=2)
    assert Finding.from_json(f.to_json()) == f
    old = f.to_json()
    del old["caused_by"]
    assert Finding.from_json(old).caused_by is None
    assert f.signature() == ("SPEC", "MAP-4", "rc")


def test_summary_lists_consequences_under_their_root() -> None:
    fs = [
        Finding(Kind.SPEC, 3, "MAP-1", "inv:A3", slot=9),
        Finding(Kind.INVARIANT, 3, "A3", "rc", slot=9),
        Finding(Kind.SPEC, 4, "MAP-0", "rc", slot=9, caused_by=3),
        Finding(Kind.SPEC, 6, "MAP-0", "rc", slot=9, caused_by=3),
        Finding(Kind.SPEC, 5, "MAP-2", "rc", slot=1),
    ]
    rows = root_summary(fs)
    assert rows == [
        ("INVARIANT", "A3", "rc", "1", "3"),
        ("  <- SPEC", "MAP-0", "rc", "2", "4"),
        ("SPEC", "MAP-1", "inv:A3", "1", "3"),
        ("SPEC", "MAP-2", "rc", "1", "5"),
    ]
