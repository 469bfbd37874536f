"""The ABI module: the committed C header is current, requests and responses round-trip."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

from hil.target import abi
from model import ops as m
from model.types import CachePolicy, PageProperty, PropTransform

REPO = Path(__file__).resolve().parents[2]


def test_committed_header_is_current() -> None:
    committed = (REPO / "guest" / "include" / "hil_abi.h").read_text()
    assert committed == abi.render_header(), "guest/include/hil_abi.h is stale: run scripts/gen-abi"


def test_every_op_class_has_a_unique_code_and_its_fields_as_args() -> None:
    codes = [s.code for s in abi.OP_SPECS]
    assert len(codes) == len(set(codes)) and 0 not in codes
    assert {s.cls for s in abi.OP_SPECS} == set(m.OP_CLASSES.values())
    for spec in abi.OP_SPECS:
        fields = [f.name for f in dataclasses.fields(spec.cls)]
        assert list(spec.args) == fields, spec.cls.__name__
        assert len(spec.args) <= abi.NR_ARGS and len(spec.cls.RESULTS) <= abi.NR_RESULTS


def test_encode_request_layout() -> None:
    prop = PageProperty(0x3, CachePolicy.WRITETHROUGH, 0x1)
    raw = abi.encode_request(m.Map(cursor=4, frame=9, prop=prop), seq=77)
    seq, code, *args = struct.unpack("<QQ8Q", raw)
    assert (seq, code) == (77, abi.SPEC_BY_CLASS[m.Map].code)
    assert args[:3] == [4, 9, 0x3 | (3 << 8) | (1 << 16)]
    t = PropTransform(set_flags=2, clear_flags=4, cache=0, set_priv=2, clear_priv=1)
    assert PropTransform.decode(t.encode()) == t
    assert PageProperty.decode(prop.encode()) == prop


def test_decode_response() -> None:
    page = bytearray(abi.MAILBOX_SIZE)
    struct.pack_into("<QQQ", page, abi.OFF_RESP_SEQ, 5, m.Status.OK, 0)
    struct.pack_into("<8Q", page, abi.OFF_RESP_RESULTS, 1, 0x1000, 0x2000, 0x5000, 0x3, 7, 0, 0)
    struct.pack_into("<QQQ", page, abi.OFF_TLB_INVLPG, 3, 1, 2)
    struct.pack_into("<2Q", page, abi.OFF_FLUSH_LOG, 0x1000, abi.FLUSH_LOG_ALL)
    page[abi.OFF_MESSAGE : abi.OFF_MESSAGE + 5] = b"hello"
    resp = abi.decode_response(bytes(page))
    assert resp.seq == 5 and resp.status == m.Status.OK and resp.message == "hello"
    assert resp.flush_log == (0x1000, abi.FLUSH_LOG_ALL) and resp.invlpg_total == 3
    res = abi.op_result(m.Query(cursor=1), resp)
    assert res.get("present") == 1 and res.get("paddr") == 0x5000 and res.get("frame") == 7


def test_ops_round_trip_through_json_and_repr() -> None:
    op = m.ProtectNext(cursor=3, len=0x200000, transform=PropTransform(cache=0))
    assert m.loads(m.dumps(op)) == op
    assert eval(repr(op), {**vars(m), "PropTransform": PropTransform}) == op
    for bad in ('{"op": "Nope"}', '{"op": "Jump", "cursor": 1}', '{"op": "Jump", "cursor": -1, "va": 0}', "[1"):
        try:
            m.loads(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
