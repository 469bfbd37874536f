"""`scripts/mutants`: build every seeded bug (guest/README.md "Seeded bugs") into its own
directory, run the default workload on seeds 1, 2, 3 for up to 2,000 ops each, and print per
bug: caught on each seed, the first op, the finding's kind and clause, and the length of the
shrunk reproducer. The unmodified guest (bug 0) must give no IMPL / TLB / WALKER finding on
the same runs. Exit status 1 when a bug is missed on a seed or the unmodified guest has one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hil.check import Finding, Kind
from hil.errors import InfraError
from hil.run.runner import Runner
from hil.run.session import Session
from hil.run.shrink import SymbolicEvent, ddmin, run_events, symbolize
from hil.run.workload import Workload

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "guest"
CAUGHT_KINDS = (Kind.IMPL, Kind.TLB, Kind.WALKER)  # SPEC / INVARIANT: the default build has them too

# bug -> (what, where); the table of guest/README.md
BUGS: dict[int, tuple[str, str]] = {
    1: ("unmap forgets invlpg", "mm/tlb.c"),
    2: ("re-map (replacing a leaf) forgets invlpg", "mm/tlb.c"),
    3: ("query's clone forgets the rc bump", "mm/page_table/cursor.c"),
    4: ("map forgets nr_children += 1 on the level-1 node", "mm/page_table/cursor.c"),
    5: ("frame_drop of the last reference leaves rc 0 instead of UNUSED", "mm/frame/frame.c"),
    6: ("protect_next keeps the paddr with the 2 MiB mask", "mm/page_table/cursor.c"),
    7: ("a new page-table node is not zeroed", "mm/page_table/node.c"),
    8: ("jump accepts va == barrier end", "mm/page_table/cursor.c"),
    9: ("unmap of a subtree does not drop the frames under it", "mm/frame/frame.c"),
    10: ("find_next looks one entry past its range", "mm/page_table/cursor.c"),
    11: ("PT-node allocator reads the next page's slot (hands out an in-use node)", "mm/page_table/node.c"),
    12: ("a taken subtree queues a flush of its first page only", "mm/page_table/cursor.c"),
    13: ("flush-all reloads the kernel root, not the current one", "mm/tlb.c"),
    14: ("re-map flushes the VA after move_forward, not the re-mapped one", "mm/page_table/cursor.c"),
    15: ("re-map releases the new frame instead of the replaced one", "mm/page_table/cursor.c"),
    16: ("from_in_use has no UNUSED check", "mm/frame/frame.c"),
    17: ("try_from_shared succeeds at rc 2", "mm/frame/frame.c"),
    18: ("from_unique sets rc 2 (counts the unique reference too)", "mm/frame/frame.c"),
    19: ("the last drop leaves the slot's type word behind", "mm/frame/frame.c"),
    20: ("segment_from_unused does not check its last page", "mm/frame/frame.c"),
    21: ("a second cursor on a busy VmSpace is let through", "mm/page_table/cursor.c"),
    22: ("VmSpace drop with a live cursor is let through", "mm/vm_space.c"),
    23: ("segment_split accepts an offset at the end (empty right half)", "mm/frame/frame.c"),
    24: ("protect_next keeps the old NX bit", "mm/page_table/cursor.c"),
    25: ("find_next stops one page short of its end", "mm/page_table/cursor.c"),
    26: ("protect_next's range is read after move_forward", "mm/page_table/cursor.c"),
    27: ("segment_next leaves an emptied segment's id live", "mm/frame/frame.c"),
    28: ("segment_slice takes a reference on its first page only", "mm/frame/frame.c"),
    29: ("re-map of the same frame that sets U skips the invlpg", "mm/page_table/cursor.c"),
}


def build(bug: int) -> Path:
    """Each bug in its own directory (guest/build-bugN, incremental); 0 is the default build."""
    if bug == 0:
        out = GUEST / "build"
        subprocess.run(["make", "-s", "-C", str(GUEST)], check=True, capture_output=True, timeout=300)
        return out / "kernel.elf"
    out = GUEST / f"build-bug{bug}"
    subprocess.run(["make", "-s", "-C", str(GUEST), f"B={out}", f"SEEDED_BUG={bug}"], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    return out / "kernel.elf"


@dataclass
class Hunt:
    bug: int
    seed: int
    ops: int  # ops run
    first_op: int | None = None  # index of the first caught finding
    kind: str = ""
    clause: str = ""
    field: str = ""
    shrunk: int | None = None  # events in the shrunk reproducer
    seconds: float = 0.0
    error: str = ""  # an infrastructure error ended the hunt (e.g. the guest triple-faulted): not caught

    @property
    def caught(self) -> bool:
        return self.first_op is not None


def hunt(elf: Path, bug: int, seed: int, max_ops: int) -> tuple[Hunt, Runner]:
    """Run the workload until the first IMPL / TLB / WALKER finding or `max_ops`."""
    t0 = time.monotonic()
    session = Session(image=elf)
    runner = Runner(session)
    out = Hunt(bug, seed, 0)
    try:
        runner.start()
        assert session.layout is not None
        workload = Workload(seed, session.layout)
        for _ in range(max_ops):
            assert runner.state is not None
            rec = runner.step(workload(runner.state))
            out.ops += 1
            found = [f for f in rec.findings if f.kind in CAUGHT_KINDS]
            if found:
                # every oracle that saw it at that op (a forgotten invlpg: the flush log and the probes)
                kinds = dict.fromkeys(str(f.kind) for f in found)
                clauses = list(dict.fromkeys(f.clause for f in found))
                clauses = clauses[:3] + (["..."] if len(clauses) > 3 else [])
                out.first_op, out.kind, out.clause, out.field = (rec.index, " + ".join(kinds),
                                                                  " + ".join(clauses), found[0].field)
                break
    except InfraError as exc:
        # the table says so and the other hunts go on (a triple fault is not a catch: the
        # checker must report the bug, not lose the machine)
        out.error = f"op {runner.index}: {exc.what.splitlines()[0]}"
    finally:
        session.close()
    out.seconds = time.monotonic() - t0
    return out, runner


def shrink_length(elf: Path, runner: Runner, target: Finding, budget: int) -> int:
    """ddmin over the run up to the finding, at most `budget` replays (each a boot)."""
    sig = target.signature()
    events = [e for e in symbolize(runner.records) if e.index <= target.op_index]
    tests = 0

    def fails(candidate: list[SymbolicEvent]) -> bool:
        nonlocal tests
        if tests >= budget:
            return False  # out of budget: keep what we have (still a reproducer)
        tests += 1
        records = run_events(Session(image=elf), candidate, stop_at_first=sig)
        return any(f.signature() == sig for r in records for f in r.findings)

    return len(ddmin(events, fails))


def run(bugs: Sequence[int], seeds: Sequence[int], max_ops: int, shrink_budget: int,
        log: Callable[[str], None]) -> list[Hunt]:  # fmt: skip
    out: list[Hunt] = []
    for bug in bugs:
        elf = build(bug)
        for i, seed in enumerate(seeds):
            h, runner = hunt(elf, bug, seed, max_ops)
            if h.caught and shrink_budget and i == 0:
                target = next(f for r in runner.records if r.index == h.first_op for f in r.findings
                              if f.kind in CAUGHT_KINDS)  # fmt: skip
                h.shrunk = shrink_length(elf, runner, target, shrink_budget)
            out.append(h)
            verdict = (f"caught at op {h.first_op} ({h.kind} {h.clause} {h.field})" if h.caught
                       else f"NOT caught: infrastructure error at {h.error}" if h.error
                       else f"not caught in {h.ops} ops")  # fmt: skip
            log(f"bug {bug} seed {seed}: {verdict}, {h.seconds:.1f} s")
    return out


def table(hunts: Sequence[Hunt], seeds: Sequence[int]) -> str:
    rows = ["| bug | what | " + " | ".join(f"seed {s}" for s in seeds) + " | first op | kind | clause | shrunk |",
            "|---|---|" + "---|" * len(seeds) + "---|---|---|---|"]  # fmt: skip
    for bug in sorted({h.bug for h in hunts}):
        hs = {h.seed: h for h in hunts if h.bug == bug}
        first = next((hs[s] for s in seeds if s in hs and hs[s].caught), None)
        what = BUGS.get(bug, ("unmodified guest", ""))[0] if bug else "unmodified guest (must find nothing)"
        cells = []
        for s in seeds:
            h = hs.get(s)
            if h is None:
                cells.append("–")
            elif bug == 0:
                cells.append(f"FINDING at {h.first_op}" if h.caught else "INFRA ERROR" if h.error else "clean")
            else:
                cells.append("yes" if h.caught else "NO (infra error)" if h.error else "NO")
        firsts = "/".join(str(hs[s].first_op) if s in hs and hs[s].caught else "–" for s in seeds)
        rows.append(f"| {bug} | {what} | " + " | ".join(cells) + f" | {firsts if bug else '–'} | "
                    f"{first.kind if first else '–'} | {first.clause if first else '–'} | "
                    f"{first.shrunk if first and first.shrunk is not None else '–'} |")  # fmt: skip
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/mutants", description=__doc__.split("\n\n")[0])
    p.add_argument("--bugs", help="comma-separated bug numbers (default: all, and 0 = the unmodified guest)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--ops", type=int, default=2000, help="ops per run at most (default 2000)")
    p.add_argument("--shrink-budget", type=int, default=40,
                   help="replays for shrinking each bug's seed-1 finding (0: do not shrink; default 40)")
    p.add_argument("--json", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    try:
        bugs = [int(b) for b in args.bugs.split(",")] if args.bugs else [0, *sorted(BUGS)]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        print("scripts/mutants: --bugs and --seeds take comma-separated integers", file=sys.stderr)
        return 2
    unknown = [b for b in bugs if b and b not in BUGS]
    if unknown or args.ops < 1:
        print(f"scripts/mutants: unknown bug(s) {unknown}" if unknown else "--ops must be >= 1", file=sys.stderr)
        return 2
    hunts = run(bugs, seeds, args.ops, args.shrink_budget, lambda s: print(s, file=sys.stderr, flush=True))
    print(table(hunts, seeds))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(h) for h in hunts], indent=1) + "\n")
    missed = [h for h in hunts if h.bug and not h.caught]
    dirty = [h for h in hunts if not h.bug and (h.caught or h.error)]
    return 1 if missed or dirty else 0


if __name__ == "__main__":
    sys.exit(main())
