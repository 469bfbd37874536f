"""Bad traces in, clear errors out: corrupt, truncated, wrong-version or garbled traces given to
the reader and to `hil replay | shrink | debug | run --resume` are a one-line error naming the
file and line (exit 2), before any QEMU starts; a trace that cannot be written (full disk) is an
infrastructure error that keeps what was written."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from hil import check, cli
from hil.check import Kind
from hil.errors import TraceWriteError
from hil.run.trace import Poke, TraceError, TraceWriter, read_trace
from hil.target.machine import leftover_files, leftover_processes
from model import ops as m

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "data" / "findings" / "spec-MAP-2.jsonl"


def write_run_trace(path: Path, n: int = 6, status: str | None = "interrupted") -> list[str]:
    w = TraceWriter(path, {"seed": 1, "ops": 100, "image": "guest/build/kernel.elf", "profile": "default",
                           "guest_build_id": "ab" * 20})  # fmt: skip
    for i in range(n):
        findings = [check.Finding(Kind.IMPL, i, "SLOT", "rc", slot=3, guest=2, model=1)] if i == 2 else []
        w.record(i, m.Nop(value=i), m.OpResult.ok(value=i), findings)
    if status is not None:
        w.close(status)
    return path.read_text().splitlines(keepends=True)


CORRUPTIONS = {
    "empty": lambda ls: [],
    "not json": lambda ls: [ls[0], "{this is not json\n", *ls[2:]],
    "binary garbage": lambda ls: [ls[0], "\x00\x01\x02\xff\n", *ls[2:]],
    "truncated mid-line": lambda ls: [*ls[:3], ls[3][: len(ls[3]) // 2]],
    "header field of a wrong type": lambda ls: [ls[0].replace('"seed": 1', '"seed": "one"'), *ls[1:]],
    "wrong version": lambda ls: [ls[0].replace('"version": 1', '"version": 99'), *ls[1:]],
    "no header": lambda ls: ls[1:],
    "not a record": lambda ls: [ls[0], "[1, 2, 3]\n", *ls[2:]],
    "unknown type": lambda ls: [ls[0], '{"type": "bogus"}\n', *ls[2:]],
    "unknown op": lambda ls: [ls[0], ls[1].replace('"Nop"', '"Frobnicate"'), *ls[2:]],
    "bad field": lambda ls: [ls[0], ls[1].replace('"value": 0', '"value": "zero"'), *ls[2:]],
    "event lost": lambda ls: [ls[0], *ls[2:]],
    "events reordered": lambda ls: [ls[0], ls[2], ls[1], *ls[3:]],
    "after the end": lambda ls: [*ls, ls[1]],
    "end without a status": lambda ls: [*ls[:-1], '{"type": "end", "status": 3}\n'],
    "resume before an event": lambda ls: [ls[0], '{"type": "resume"}\n', ls[2], *ls[3:]],
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_trace_is_a_trace_error_naming_the_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / "t.jsonl"
    lines = write_run_trace(path)
    path.write_text("".join(CORRUPTIONS[name](lines)))
    with pytest.raises(TraceError) as exc:
        read_trace(path)
    msg = str(exc.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg


def test_random_damage_is_read_or_refused_never_a_crash(tmp_path: Path) -> None:
    """Bytes flipped, cut, duplicated anywhere: read_trace returns a Trace or raises TraceError."""
    good = SAMPLE.read_bytes()
    rng = random.Random(19)
    path = tmp_path / "t.jsonl"
    outcomes = {"read": 0, "refused": 0}
    for _ in range(400):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            action = rng.randrange(4)
            if action == 0:
                data[i] = rng.randrange(256)
            elif action == 1:
                del data[i : i + rng.randint(1, 40)]
            elif action == 2:
                data[i:i] = data[rng.randrange(len(data)) :][: rng.randint(1, 40)]
            else:
                data = data[:i]
        path.write_bytes(bytes(data))
        try:
            read_trace(path)
            outcomes["read"] += 1
        except TraceError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


def test_a_resumed_trace_reads_as_one_run(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_run_trace(path, n=3, status="interrupted")
    w = TraceWriter(path, {}, resume={"from_index": 3})
    w.record(3, m.Nop(value=3), m.OpResult.ok(value=3), [])
    w.close("complete")
    t = read_trace(path)
    assert [r.index for r in t.records] == [0, 1, 2, 3]
    assert t.end is not None and t.end["status"] == "complete"
    assert [n["type"] for n in t.notes] == ["resume"]


def test_a_killed_run_resumed_reads_as_one_run(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_run_trace(path, n=3, status=None)  # SIGKILLed: no end line
    w = TraceWriter(path, {}, resume={"from_index": 3})
    w.record(3, m.Nop(value=3), m.OpResult.ok(value=3), [])
    w.close("complete")
    assert [r.index for r in read_trace(path).records] == [0, 1, 2, 3]


def test_a_trace_that_cannot_be_written_is_an_infra_error(tmp_path: Path) -> None:
    with pytest.raises(TraceWriteError, match="No space left on device"):
        TraceWriter(Path("/dev/full"), {"seed": 1})
    with pytest.raises(TraceWriteError, match="cannot open the trace"):
        TraceWriter(tmp_path / "missing" / "dir" / "\0bad", {"seed": 1})


def test_a_write_error_mid_run_keeps_the_lines_before_it(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    w = TraceWriter(path, {"seed": 1})
    w.record(0, m.Nop(value=0), m.OpResult.ok(value=0), [])
    # the disk fills up: the next flush fails (the file object is real; its fd now points at /dev/full)
    assert w._fh is not None
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, w._fh.fileno())
    os.close(full)
    with pytest.raises(TraceWriteError, match=r"No space left on device; every line before it is kept"):
        w.record(1, Poke(0x1000, b"\x01"), None, [])
    w.close("infra-error")  # nothing more to write: no second error
    assert w.closed
    t = read_trace(path)
    assert len(t.records) == 1 and t.end is None


# --- the commands ---------------------------------------------------------------------------
@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HIL_RUN_TAG", f"tf{os.getpid()}")
    return tmp_path


@pytest.mark.parametrize("command", [["replay"], ["shrink"], ["debug"], ["run", "--resume"]])
@pytest.mark.parametrize("name", ["truncated mid-line", "wrong version", "not json", "event lost"])
def test_commands_refuse_a_corrupt_trace_before_starting_anything(
    isolated: Path, capsys: pytest.CaptureFixture[str], command: list[str], name: str
) -> None:
    path = isolated / "t.jsonl"
    lines = write_run_trace(path)
    path.write_text("".join(CORRUPTIONS[name](lines)))
    before = path.read_bytes()
    code = cli.main([*command, str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"hil: {path}") and len(err.splitlines()) == 1, err
    assert path.read_bytes() == before  # bad input changes nothing
    tag = os.environ["HIL_RUN_TAG"]
    assert leftover_processes(tag) == [] and leftover_files(tag) == []


def test_resume_refuses_a_complete_run_and_a_shrunk_trace(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = isolated / "t.jsonl"
    write_run_trace(path, status="complete")
    assert cli.main(["run", "--resume", str(path)]) == 2
    assert "the run is complete; nothing to resume" in capsys.readouterr().err
    assert cli.main(["run", "--resume", str(SAMPLE)]) == 2
    assert "not a `hil run` trace but a minimal one" in capsys.readouterr().err


def test_resume_refuses_a_trace_the_workload_did_not_write(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The header is fine, the build is this one, but the ops are not what the seed draws: the
    run cannot be rebuilt (checked op by op while replaying; here the first op already differs)."""
    from hil.run import resume
    from hil.run.trace import read_trace as rt

    path = isolated / "t.jsonl"
    write_run_trace(path)
    point = resume.load(path)
    assert point.done == 6 and point.header["seed"] == 1
    with pytest.raises(Exception, match="it was not written by this seed"):
        resume._same(point, 0, "op", rt(path).records[0].event, m.NewVmSpace())
    assert json.loads(path.read_text().splitlines()[-1])["status"] == "interrupted"


def test_shrink_without_the_finding_is_a_one_line_error(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = isolated / "t.jsonl"
    write_run_trace(path)
    assert cli.main(["shrink", str(path), "--clause", "NO-SUCH-CLAUSE"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "hil: the trace has no finding with clause NO-SUCH-CLAUSE"
    tag = os.environ["HIL_RUN_TAG"]
    assert leftover_processes(tag) == [] and leftover_files(tag) == []
