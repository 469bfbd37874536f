"""Harness logic below the wire: profiles, HMP output cleaning, traces, the model-vs-guest
diff, delta debugging with id remapping, workload determinism."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hil import check
from hil.check import Kind
from hil.errors import ConfigError
from hil.run.shrink import ddmin, symbolize
from hil.run.trace import Poke, Record, TraceError, TraceWriter, read_trace
from hil.target import machine
from model import ops as m
from model import store
from model.types import PAGE_SIZE


def test_profiles_load_and_reject_unknown_keys(tmp_path: Path) -> None:
    p = machine.Profile.load("default")
    assert p.accel == "tcg" and p.memory_mib == 64
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nmemroy_mib = 64\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        machine.Profile.load(str(bad))
    with pytest.raises(ConfigError, match="no machine profile"):
        machine.Profile.load("nonexistent")


def test_machine_paths_are_unique_and_argv_has_shared_ram() -> None:
    a = machine.Machine(machine.Profile.load("default"))
    b = machine.Machine(machine.Profile.load("default"))
    assert a.gdb_socket != b.gdb_socket and a.shm_path != b.shm_path
    argv = a.build_argv()
    assert f"mem-path={a.shm_path}" in " ".join(argv) and "-S" in argv
    assert machine.Machine(machine.Profile.load("default"), shared_ram=False).build_argv().count("-object") == 0


def test_missing_image_is_a_config_error(tmp_path: Path) -> None:
    mach = machine.Machine(machine.Profile.load("default"), image=tmp_path / "nope.elf")
    with pytest.raises(ConfigError, match="not found"):
        mach.start()
    assert not mach.run_dir.exists()


def test_hmp_output_cleaning() -> None:
    raw = b"info mem\r\n\x1b[K0000-1000 0000000000001000 urw\r\n(qemu) "
    assert machine._clean_hmp(raw, "info mem") == "0000-1000 0000000000001000 urw"


def test_trace_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    w = TraceWriter(path, {"seed": 1})
    f = check.Finding(Kind.IMPL, 1, "SLOT", "rc", slot=3, guest=2, model=1)
    w.record(0, m.Map(cursor=1, frame=2), m.OpResult.ok(replaced=0, old_paddr=0), [])
    w.record(1, Poke(0x1000, b"\x01\x02"), None, [f])
    w.close("complete")
    t = read_trace(path)
    assert t.events == [m.Map(cursor=1, frame=2), Poke(0x1000, b"\x01\x02")]
    assert t.records[0].result == m.OpResult.ok(replaced=0, old_paddr=0)
    assert t.findings == [f] and t.end == {"type": "end", "status": "complete"}
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n")  # truncated: no end line, still readable
    assert read_trace(path).end is None
    path.write_text(lines[0] + '\n{"type": "event", "index": 0, "event": {"op": "Map", "cursor": 1}}\n')
    with pytest.raises(TraceError, match="missing field"):
        read_trace(path)


def test_diff_results_and_states_name_the_field() -> None:
    s0 = store.initial_state()
    paddr = store.boot_layout().data_pool_start
    res, s1 = store.apply(s0, m.FrameFromUnused(paddr=paddr), lambda level: 0)
    assert res.status == m.Status.OK
    i = paddr // PAGE_SIZE
    wrong = dict(s1.slots)
    wrong[i] = dataclasses.replace(s1.slots[i], rc=7)
    guest = dataclasses.replace(s1, slots=wrong, parent=s0, changed=frozenset({i}))
    found = check.diff_states(0, s0, guest, s1)
    assert [(f.clause, f.field, f.slot, f.guest, f.model) for f in found] == [("SLOT", "rc", i, 7, 1)]
    found = check.diff_results(0, m.FrameFromUnused(paddr=paddr), m.OpResult.ok(frame=2), res)
    assert [(f.clause, f.field, f.guest, f.model) for f in found] == [("RESULT", "frame", 2, 1)]
    # A/D bits of a query's prop are the MMU's, not compared
    q = m.Query(cursor=1)
    a = m.OpResult.ok(present=1, start=0, end=4096, paddr=paddr, prop=0x10119, frame=1)
    b = m.OpResult.ok(present=1, start=0, end=4096, paddr=paddr, prop=0x10101, frame=1)
    assert check.diff_results(0, q, a, b) == []


def test_symbolize_points_ids_at_their_producers() -> None:
    recs = [
        Record(0, m.FrameFromUnused(paddr=0x1000), m.OpResult.ok(frame=1)),
        Record(1, m.FrameFromUnused(paddr=0x2000), m.OpResult.ok(frame=2)),
        Record(2, m.FrameDrop(frame=2), m.OpResult.ok()),
        Record(3, m.FrameDrop(frame=9), m.OpResult.err(m.ErrorCode.BAD_ID)),
    ]
    sym = symbolize(recs)
    assert sym[2].refs == (("frame", 1, "frame"),)
    assert sym[3].refs == ()  # a dead id stays literal


def test_ddmin_finds_a_one_minimal_failing_subset() -> None:
    items = list(range(40))
    calls = []

    def fails(xs):  # type: ignore[no-untyped-def]
        calls.append(len(xs))
        return 7 in xs and 31 in xs

    out = ddmin(items, fails)  # type: ignore[arg-type]
    assert out == [7, 31]
    assert len(calls) < 60


def test_regression_source_is_runnable_python() -> None:
    from hil.run.shrink import regression_test_source
    from model.types import CachePolicy, PageProperty

    events = [m.NewVmSpace(), m.Map(cursor=1, frame=1, prop=PageProperty(1, CachePolicy.WRITETHROUGH, 1)),
              Poke(0x1000, b"\x05")]  # fmt: skip
    f = check.Finding(Kind.SPEC, 1, "MAP-2", "rc")
    src = regression_test_source(events, f, "map_two")
    ns: dict[str, object] = {}
    exec(compile(src, "regression.py", "exec"), ns)
    assert ns["EVENTS"] == events
    assert callable(ns["test_map_two"])


def test_an_image_without_the_abi_symbols_is_refused_by_name() -> None:
    from hil.errors import AbiError
    from hil.target.elf import GuestElf

    obj = Path(__file__).resolve().parents[2] / "guest" / "build" / "boot" / "serial.o"
    with pytest.raises(AbiError, match="hil_mailbox, hil_op_done, hil_layout"):
        GuestElf(obj)
    with pytest.raises(AbiError, match="not found"):
        GuestElf(Path("/nonexistent.elf"))


def _clean_hmp_by_hand(raw: bytes, command: str) -> str:
    """The per-character reading of HMP's echo that the regex in `machine._clean_hmp` replaced."""
    text = raw.decode("utf-8", "replace")
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\x1b":
            i += 1
            if i < len(text) and text[i] == "[":
                i += 1
                while i < len(text) and not ("a" <= text[i].lower() <= "z"):
                    i += 1
            i += 1
            continue
        if ch != "\r":
            out.append(ch)
        i += 1
    lines = "".join(out).split("\n")
    if lines and lines[-1].endswith("(qemu) "):
        lines = lines[:-1]
    if lines and command in lines[0]:
        lines = lines[1:]
    return "\n".join(lines)


def test_hmp_cleaning_equals_the_character_by_character_reading() -> None:
    import random

    rng = random.Random(7)
    alphabet = ["\x1b", "[", "D", "K", "1", ";", "\r", "\n", "a", " ", "0", "(qemu) ", "info tlb"]
    for _ in range(2000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))).encode()
        assert machine._clean_hmp(raw, "info tlb") == _clean_hmp_by_hand(raw, "info tlb"), raw
