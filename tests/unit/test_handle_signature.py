"""A handle finding's signature names what differs, never the id (shrinking renumbers ids)."""

from __future__ import annotations

from hil.check import _diff_maps
from model.state import CursorView


def test_handle_findings_do_not_carry_the_id_in_their_signature() -> None:
    a = _diff_maps(3, "FRAME_HANDLE", {7: 0x1000}, {})
    b = _diff_maps(3, "FRAME_HANDLE", {2: 0x1000}, {})
    assert a[0].signature() == b[0].signature() == ("IMPL", "FRAME_HANDLE", "present")
    assert a[0].message == "id 7"
    cur = CursorView(4, 1, True, 0, 1 << 30, 0x1000, 1, 4)
    moved = CursorView(4, 1, True, 0, 1 << 30, 0x2000, 1, 4)
    assert [f.field for f in _diff_maps(0, "CURSOR", {4: cur}, {4: moved})] == ["va"]
    assert [f.field for f in _diff_maps(0, "SEGMENT_HANDLE", {1: (0, 8192)}, {1: (0, 4096)})] == ["value"]
    assert [f.field for f in _diff_maps(0, "NEXT_ID", {"frame": 3}, {"frame": 4})] == ["frame"]
