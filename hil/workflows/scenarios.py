"""The fixed scenario suite: one short, hand-written op sequence per op kind, each run on a
freshly booted guest with every check (`hil ci`, the pytest plugin).

Ids are the guest's counters, each starting at 1 after boot (VmSpace, cursor, frame,
segment, unique), so a scenario names the objects it creates by the ids a fresh guest
gives them. Frames come from the image's data pool (`hil_layout`).

    python -m hil.workflows.scenarios --image ELF --profile P --out DIR [--replay TRACE ...]

writes one trace per scenario (and per replayed minimal trace) into DIR; exit 0 when every
scenario ran (findings are judged by the caller against its baseline), 2 on infrastructure.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from hil.target.abi import Layout
from model import ops as m
from model.types import PAGE_SIZE, USER_VA_END, PageFlags, PageProperty, PrivFlags, PropTransform

MIB = 1 << 20
RW = PageProperty.rw_user()
RO = PageProperty(int(PageFlags.R), RW.cache, int(PrivFlags.USER))


def _frames(lay: Layout, n: int) -> list[int]:
    return [lay.data_pool_start + i * PAGE_SIZE for i in range(n)]


def vm_space(lay: Layout) -> list[m.Op]:
    return [m.NewVmSpace(), m.NewVmSpace(), m.OpenCursor(vs=2, start=0, end=2 * MIB), m.DropCursor(cursor=1),
            m.DropVmSpace(vs=2)]  # fmt: skip


def cursor(lay: Layout) -> list[m.Op]:
    return [
        m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=USER_VA_END), m.Jump(cursor=1, va=2 * MIB),
        m.VirtAddr(cursor=1), m.FindNext(cursor=1, len=4 * MIB), m.DropCursor(cursor=1),
        m.OpenCursor(vs=1, start=0, end=4 * PAGE_SIZE), m.Query(cursor=2), m.DropCursor(cursor=2),
    ]  # fmt: skip


def _two_mapped(lay: Layout) -> list[m.Op]:
    """VmSpace 1, cursor 1 over [0, 2 MiB), frames 1 and 2 mapped at VA 0 and 4 KiB, cursor back at 0."""
    p = _frames(lay, 2)
    return [
        m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=2 * MIB),
        m.FrameFromUnused(paddr=p[0]), m.Map(cursor=1, frame=1, prop=RW),
        m.FrameFromUnused(paddr=p[1]), m.Map(cursor=1, frame=2, prop=RO),
        m.Jump(cursor=1, va=0),
    ]  # fmt: skip


def map_(lay: Layout) -> list[m.Op]:
    return _two_mapped(lay) + [m.Query(cursor=1), m.FrameDrop(frame=3), m.DropCursor(cursor=1)]


def unmap(lay: Layout) -> list[m.Op]:
    return _two_mapped(lay) + [m.Unmap(cursor=1, len=2 * PAGE_SIZE), m.Query(cursor=1), m.DropCursor(cursor=1)]


def protect(lay: Layout) -> list[m.Op]:
    return _two_mapped(lay) + [
        m.ProtectNext(cursor=1, len=2 * PAGE_SIZE, transform=PropTransform(clear_flags=int(PageFlags.W))),
        m.Jump(cursor=1, va=0), m.Query(cursor=1), m.DropCursor(cursor=1),
    ]  # fmt: skip


def frame(lay: Layout) -> list[m.Op]:
    p = _frames(lay, 1)
    return [m.FrameFromUnused(paddr=p[0]), m.FrameFromInUse(paddr=p[0]), m.FrameDrop(frame=2), m.FrameDrop(frame=1)]


def segment(lay: Layout) -> list[m.Op]:
    p = _frames(lay, 1)
    return [
        m.SegmentFromUnused(start=p[0], end=p[0] + 4 * PAGE_SIZE), m.SegmentSplit(segment=1, offset=2 * PAGE_SIZE),
        m.SegmentNext(segment=2), m.SegmentClone(segment=3), m.SegmentSlice(segment=4, start=0, end=PAGE_SIZE),
        m.SegmentDrop(segment=5), m.SegmentDrop(segment=4), m.SegmentDrop(segment=3), m.FrameDrop(frame=1),
    ]  # fmt: skip


def unique(lay: Layout) -> list[m.Op]:
    p = _frames(lay, 1)
    return [m.UniqueFromUnused(paddr=p[0]), m.FromUnique(unique=1), m.TryFromShared(frame=1), m.UniqueDrop(unique=2)]


def errors(lay: Layout) -> list[m.Op]:
    """Requests exec rejects (every ERR leaves every byte as it was)."""
    p = _frames(lay, 1)
    return [
        m.DropCursor(cursor=9), m.FrameFromUnused(paddr=p[0] + 8), m.NewVmSpace(),
        m.OpenCursor(vs=1, start=PAGE_SIZE, end=PAGE_SIZE), m.OpenCursor(vs=1, start=0, end=2 * MIB),
        m.FrameFromUnused(paddr=p[0]), m.Map(cursor=1, frame=1, prop=RW), m.FrameFromUnused(paddr=p[0]),
        m.Query(cursor=1), m.DropCursor(cursor=1), m.FrameDrop(frame=1), m.FrameDrop(frame=1),
    ]  # fmt: skip


def panic(lay: Layout) -> list[m.Op]:
    """An OSTD panic condition (jump to an unaligned VA): the guest stops the op, reboots, and
    the next ops run on the fresh guest (ids start again at 1)."""
    return [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=2 * MIB), m.Jump(cursor=1, va=PAGE_SIZE + 8),
            m.NewVmSpace(), m.OpenCursor(vs=1, start=0, end=PAGE_SIZE), m.DropCursor(cursor=1)]  # fmt: skip


SCENARIOS: dict[str, Callable[[Layout], list[m.Op]]] = {
    "vm_space": vm_space, "cursor": cursor, "map": map_, "unmap": unmap, "protect": protect,
    "frame": frame, "segment": segment, "unique": unique, "errors": errors, "panic": panic,
}  # fmt: skip


def replay_name(trace: Path) -> str:
    return "known-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", trace.stem)


def main(argv: list[str] | None = None) -> int:
    from hil.errors import HilError, InfraError
    from hil.run.runner import Runner
    from hil.run.session import Session
    from hil.run.trace import Event, TraceError, TraceWriter, now, read_trace, versions
    from hil.target.machine import Profile

    parser = argparse.ArgumentParser(prog="python -m hil.workflows.scenarios")
    parser.add_argument("--image", required=True)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", help="scenario names (default: all)")
    parser.add_argument("--replay", nargs="*", default=[], help="minimal traces to replay as scenarios too")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only if args.only is not None else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"scenarios: unknown scenario(s) {unknown} (known: {list(SCENARIOS)})", file=sys.stderr)
        return 2
    try:
        profile = Profile.load(args.profile)
        session = Session(image=Path(args.image), profile=profile)
        replays = [(replay_name(Path(t)), read_trace(Path(t)).events, t) for t in args.replay]
    except (HilError, TraceError) as exc:
        print(f"scenarios: {exc}", file=sys.stderr)
        return 2
    try:
        jobs: list[tuple[str, Callable[[Layout], list[m.Op]] | None, list[Event], str | None]]
        jobs = [(n, SCENARIOS[n], [], None) for n in names] + [(n, None, ev, src) for n, ev, src in replays]
        for name, build, fixed, src in jobs:
            header = {"scenario": name, "guest_build_id": session.elf.build_id, "image": args.image,
                      "profile": profile.name, "versions": versions(), "started": now()}  # fmt: skip
            if src:
                header["replayed_from"] = src
            writer = TraceWriter(out / f"{name}.jsonl", header)
            runner = Runner(session, writer)
            status = "interrupted"
            try:
                runner.start()
                assert session.layout is not None
                runner.run(build(session.layout) if build else fixed)
                status = "complete"
            except InfraError as exc:
                status = "infra-error"
                writer.close(status, error=exc.what)
                print(f"scenario {name}: infrastructure error (not a finding):\n{exc.describe()}", file=sys.stderr)
                return 2
            finally:
                writer.close(status, finished=now(), ops_done=runner.stats.total_ops)
                session.close()
    except KeyboardInterrupt:
        return 130
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    import signal

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
