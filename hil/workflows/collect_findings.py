"""Collect the spec findings a workload exposes, each as a minimal trace (scripts/collect-findings).

A root SPEC finding (guest and model agree, a clause fails) or INVARIANT finding is kept (a
consequence, `caused_by` set, is not: its root is): shrunk
to a minimal trace under tests/data/findings/, with the finding's signature in the trace
header, so a test keeps asserting it is reported. Predicates are never changed to silence one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from hil.check import Kind
from hil.run.runner import Runner
from hil.run.session import Session
from hil.run.shrink import shrink
from hil.run.trace import TraceWriter, now, read_trace
from hil.run.workload import Workload

FINDINGS_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "findings"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="collect-findings")
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(FINDINGS_DIR))
    parser.add_argument("--only", action="append", default=[], metavar="CLAUSE",
                        help="shrink only this clause (repeatable); the others are left as they are")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "run.jsonl"
        session = Session()
        writer = TraceWriter(trace_path, {"seed": args.seed, "started": now()})
        runner = Runner(session, writer)
        try:
            runner.start()
            assert session.layout is not None
            runner.run(Workload(args.seed, session.layout), count=args.ops)
        finally:
            session.close()
            writer.close("complete")
        trace = read_trace(trace_path)
    firsts: dict[tuple[str, str], int] = {}
    for f in trace.findings:
        if f.kind == Kind.IMPL:
            print(f"IMPL finding (fix the guest or the model first): {f.describe()}", file=sys.stderr)
            return 1
        if f.caused_by is not None:
            continue  # a consequence of an earlier finding: its root is collected instead
        firsts.setdefault((str(f.kind), f.clause), f.op_index)
    for (kind, clause), _index in sorted(firsts.items()):
        if args.only and clause not in args.only:
            continue
        name = f"{kind.lower()}-{clause.replace('/', '_')}"
        path = out_dir / f"{name}.jsonl"
        print(f"shrinking {kind} {clause} ...", file=sys.stderr)
        events, finding = shrink(trace, Session, clause=clause)
        writer = TraceWriter(path, {"finding": list(finding.signature()), "description": finding.describe(),
                                    "seed": args.seed, "started": now()})  # fmt: skip
        for i, e in enumerate(events):
            writer.record(i, e, None, [])
        writer.close("complete")
        print(f"  {len(events)} events -> {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
