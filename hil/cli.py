"""`hil run | replay | shrink`. Exit status: 0 no findings, 1 findings, 2 infrastructure or
usage error, 130 interrupted (Ctrl-C / SIGTERM; the trace is kept, marked interrupted)."""
# ruff: noqa: E402 (signals are held before the heavy imports)

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hil import argtypes

# before the heavy imports below: a signal while they load is held, then acted on in main()
argtypes.hold_signals(__name__ == "__main__" or Path(sys.argv[0]).name == "hil")

from hil import check
from hil.errors import AbiError, ConfigError, HilError, InfraError
from hil.run.baseline import Baseline
from hil.run.runner import Runner
from hil.run.session import Session
from hil.run.trace import Record, TraceError, TraceWriter, now, read_trace, versions
from hil.target import proc
from hil.target.machine import DEFAULT_IMAGE, REPO, Profile
from hil.workflows import ci as ci_workflow
from hil.workflows import debug as debug_workflow
from hil.workflows import nightly as nightly_workflow

EXIT_OK, EXIT_FINDINGS, EXIT_INFRA, EXIT_INTERRUPTED = 0, 1, 2, 130


# the default image of each exec (scripts/setup builds both)
EXEC_IMAGES = {"vostd": DEFAULT_IMAGE, "upstream": REPO / "guest" / "build-upstream" / "kernel.elf"}


def _progress(total: int | None, done: int, rate: float, findings: int) -> str:
    if total:
        width = 30
        filled = int(width * done / total)
        bar = "#" * filled + "-" * (width - filled)
        return f"\r[{bar}] {done}/{total} ops  {rate:7.1f} ops/s  findings {findings}"
    return f"\r{done} ops  {rate:7.1f} ops/s  findings {findings}"


def _table(title: str, rows: Sequence[tuple[str, ...]]) -> str:
    if not rows:
        return f"{title}: none\n"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines) + "\n"


def summary(runner: Runner, trace_path: Path | None, boot_findings: int) -> str:
    st = runner.stats
    out = []
    out.append(_table("ops by kind:", [(k, str(v)) for k, v in sorted(st.ops.items())]))
    out.append(_table("results by status:", [(k, str(v)) for k, v in sorted(st.statuses.items())]))
    rows = [(k, c, str(v), str(st.first_seen[(k, c)])) for (k, c), v in sorted(st.findings.items())]
    out.append(_table("findings by kind and clause (count, first op):", rows))
    roots = check.root_summary(f for r in runner.records for f in r.findings)
    if roots:
        out.append(_table("root findings (kind, clause, field, count, first op), consequences under them:", roots))
    if st.findings and trace_path:
        out.append(f"minimise one: hil shrink {trace_path} --clause CLAUSE\n")
        out.append(f"debug the first in gdb, stopped before its op: hil debug {trace_path}\n")
    cov = runner.coverage
    out.append(_table("spec clauses (evaluated / antecedent held / violated):",
                      [(c, str(n), str(cov.exercised.get(c, 0)), str(cov.violated.get(c, 0)))
                       for c, n in sorted(cov.evaluated.items())]))  # fmt: skip
    never = cov.never_exercised()
    if never:
        out.append(f"clauses never exercised in this run: {', '.join(never)}\n")
    out.append(_table("op outcomes reached (count; 0: not reached in this run):",
                      [(op, row, str(n)) for op, row, n in runner.outcomes.table()]))  # fmt: skip
    oracle = []
    if runner.probes is not None:
        seen = "U probed (SMAP)" if runner.probes.user_probed else "U not probed (the CPU has no SMAP)"
        refused = f", {runner.probes.refused} refused (a root without the kernel half)" if runner.probes.refused else ""
        oracle.append(f"MMU probes: {runner.probes.probes_run} after {runner.probes.ops_probed} ops, {seen}{refused}")
    if runner.qemu is not None:
        refused = f", {runner.qemu.refused} views refused" if runner.qemu.refused else ""
        oracle.append(f"QEMU translation: {runner.qemu.checks} checks ({runner.qemu.lines} lines, "
                      f"every {runner.qemu.every} ops{refused})")  # fmt: skip
    if oracle:
        out.append("oracles: " + "; ".join(oracle) + "\n")
    n = st.total_ops
    if n:
        per = lambda s: f"{1e6 * s / n:.0f} us"  # noqa: E731
        out.append(f"{n} ops, {st.rate():.1f} ops/s; per op: drive {per(st.drive_s)}, snapshot "
                   f"{per(st.snapshot_s)}, model {per(st.model_s)}, check {per(st.check_s)}; "
                   f"{st.reboots} reboots, {st.infra_retries} infrastructure retries"
                   + (f", {st.discarded} ops run and discarded (trace notes)" if st.discarded else "")
                   + f"; boot-state findings {boot_findings}\n")  # fmt: skip
    if trace_path:
        out.append(f"trace: {trace_path}\n")
    return "\n".join(out)


def cmd_run(args: argparse.Namespace) -> int:
    from hil.run import resume
    from hil.run.workload import Workload, WorkloadConfig

    point = resume.load(Path(args.resume)) if args.resume else None
    if point is not None:  # the run goes on as it started: its seed, image, profile, length
        h = point.header
        args.seed, args.ops, args.image, args.profile = h["seed"], h["ops"], h["image"], h["profile"]
        args.error_rate, args.trace = h.get("error_rate", args.error_rate), args.resume
    profile = Profile.load(args.profile)
    if point is not None:
        args.exec = point.header.get("exec")
    image = Path(args.image or EXEC_IMAGES[args.exec or "vostd"])
    if not image.is_file():
        raise ConfigError(f"{image} is missing: make -C guest EXEC={args.exec or 'vostd'} B={image.parent.name} "
                          "(scripts/setup)")
    # --exec: the image must be a build of that exec (hil_layout `exec`), refused at boot otherwise;
    # without it the model is the one the image was built for
    session = Session(image=image, profile=profile, shared_ram=not args.gdb_only, exec_name=args.exec)
    if point is not None and point.header.get("guest_build_id") != session.elf.build_id:
        raise ConfigError(f"{args.resume}: recorded on guest build {point.header.get('guest_build_id')}, "
                          f"{image} is build {session.elf.build_id}; a run resumes only on its own build")  # fmt: skip
    trace_path = Path(args.trace) if args.trace else Path("traces") / f"run-seed{args.seed}-{int(time.time())}.jsonl"
    header = {
        "guest_build_id": session.elf.build_id, "image": str(image), "profile": profile.name, "exec": args.exec,
        "seed": args.seed, "ops": args.ops, "error_rate": args.error_rate, "versions": versions(), "started": now(),
    }  # fmt: skip
    baseline = _load_baseline(args)
    if baseline is not None:
        header["baseline"] = str(baseline.path)
    resume_line = {"from_index": point.done, "started": now()} if point is not None else None
    runner = Runner(session, None, stop_on_finding=args.stop_on_finding or False, baseline=baseline,
                    qemu_every=1 if args.paranoid else None)  # fmt: skip
    status = "interrupted"
    error: dict[str, str] = {}
    findings_total = 0
    boot_findings: list = []
    t_last = 0.0
    writer: TraceWriter | None = None
    try:
        # a trace with a header ends with an end line: a signal while the header is written is
        # acted on just below, inside this try, whose finally writes the end line (one landing
        # between the header and the try left a trace without one: suite-rounds round 2)
        with proc.interrupts_deferred():
            writer = TraceWriter(trace_path, header, resume=resume_line)
            runner.writer = writer
        check_interrupted()
        boot_findings = runner.start()
        findings_total += len(boot_findings)
        for f in boot_findings:
            print(f.describe(), file=sys.stderr)
        assert session.layout is not None
        workload = Workload(args.seed, session.layout, WorkloadConfig(error_rate=args.error_rate))
        done = 0
        if point is not None:
            runner.writer = None  # the ops already in the trace are re-run, not written again
            resume.replay_into(runner, workload, point)
            runner.writer, done = writer, point.done
            findings_total += sum(len(r.findings) for r in runner.records)
            print(f"resumed {trace_path} after op {done - 1}: {args.ops - done} ops to go", file=sys.stderr)

        shown: set[tuple[str, str, str]] = set()

        def on_step(rec: Record) -> None:
            nonlocal findings_total, t_last
            check_interrupted()
            findings_total += len(rec.findings)
            unknown = baseline.new_in(rec.findings) if baseline is not None and rec.findings else []
            for f in rec.findings:
                if args.show == "all" or (args.show == "new" and f.signature() not in shown):
                    shown.add(f.signature())
                    # with a baseline, a finding it does not know is marked: that one fails the run
                    mark = ("NEW " if f in unknown else "known ") if baseline is not None else ""
                    print(("\n" if sys.stderr.isatty() else "") + mark + f.describe(), file=sys.stderr)
            now_t = time.monotonic()
            if sys.stderr.isatty() and (now_t - t_last > 0.2 or rec.index + 1 == args.ops):
                t_last = now_t
                sys.stderr.write(_progress(args.ops, rec.index + 1, runner.stats.rate(), findings_total))
                sys.stderr.flush()

        check_interrupted()
        runner.run(workload, count=args.ops - done, on_step=on_step)
        status = "complete"
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    except InfraError as exc:
        print(f"\ninfrastructure error (not a finding):\n{exc.describe()}", file=sys.stderr)
        with proc.interrupts_deferred():
            if writer is not None:
                writer.close("infra-error", error=str(exc.what))
            session.close()
        print(f"trace (complete up to the last finished op): {trace_path}", file=sys.stderr)
        return EXIT_INFRA
    except Exception as exc:
        # a harness bug or bad input met mid-run: exit 2 (never 1, which means findings), trace kept
        status, error = "error", {"error": f"{type(exc).__name__}: {exc}"}
        print(f"\ntrace (complete up to the last finished op): {trace_path}", file=sys.stderr)
        raise
    finally:
        with proc.interrupts_deferred():  # nor may a first signal here cut the end line
            session.close()
            # a resumed run stopped while re-running the trace's ops still has all of them in it
            ops_done = max(runner.stats.total_ops, point.done if point is not None else 0)
            if writer is not None:
                writer.close(status, finished=now(), ops_done=ops_done, **error)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    print(summary(runner, trace_path, len(boot_findings)))
    if status == "interrupted":
        return EXIT_INTERRUPTED
    if baseline is not None:
        # a baseline decides: only findings it does not know fail the run
        verdict = baseline.compare(boot_findings + [f for r in runner.records for f in r.findings])
        print(f"baseline {baseline.path}:\n{verdict.describe()}")
        return EXIT_OK if verdict.passed else EXIT_FINDINGS
    return EXIT_FINDINGS if findings_total else EXIT_OK


def _load_baseline(args: argparse.Namespace) -> Baseline | None:
    if args.stop_on_finding == "new" and not args.baseline:
        raise ConfigError("--stop-on-finding new needs --baseline FILE")
    return Baseline.load(args.baseline) if args.baseline else None


def cmd_replay(args: argparse.Namespace) -> int:
    trace = read_trace(Path(args.trace))
    image = Path(args.image or trace.header.get("image") or DEFAULT_IMAGE)
    session = Session(image=image, profile=Profile.load(args.profile or trace.header.get("profile", "default")))
    if trace.header.get("guest_build_id") not in (None, session.elf.build_id):
        print(f"note: the trace was recorded on guest build {trace.header['guest_build_id']}, "
              f"replaying on {session.elf.build_id}", file=sys.stderr)  # fmt: skip
    runner = Runner(session)
    differences = 0
    try:
        runner.start()
        for rec in trace.records:
            new = runner.step(rec.event)
            old_sig = sorted(f.signature() for f in rec.findings)
            new_sig = sorted(f.signature() for f in new.findings)
            if new.result != rec.result or old_sig != new_sig:
                differences += 1
                print(f"op {rec.index} {rec.event!r}: recorded {rec.result!r} {old_sig}, "
                      f"replayed {new.result!r} {new_sig}")  # fmt: skip
    except InfraError as exc:
        print(f"infrastructure error (not a finding):\n{exc.describe()}", file=sys.stderr)
        return EXIT_INFRA
    finally:
        session.close()
    total = sum(len(r.findings) for r in runner.records)
    print(f"replayed {len(trace.records)} events: {differences} differences, {total} findings")
    return EXIT_FINDINGS if differences or total else EXIT_OK


def cmd_shrink(args: argparse.Namespace) -> int:
    from hil.run.shrink import regression_test_source, shrink

    trace = read_trace(Path(args.trace))
    image = Path(args.image or trace.header.get("image") or DEFAULT_IMAGE)
    profile = Profile.load(args.profile or trace.header.get("profile", "default"))
    try:
        events, finding = shrink(
            trace, lambda: Session(image=image, profile=profile), args.clause,
            log=(lambda s: print(s, file=sys.stderr)) if args.verbose else (lambda s: None),
        )  # fmt: skip
    except InfraError as exc:
        print(f"infrastructure error (not a finding):\n{exc.describe()}", file=sys.stderr)
        return EXIT_INFRA
    print(f"minimal trace for {finding.describe()}: {len(events)} events")
    for e in events:
        print(f"  {e!r}")
    out = Path(args.out) if args.out else Path(args.trace).with_suffix(".min.jsonl")
    writer = TraceWriter(out, {"guest_build_id": trace.header.get("guest_build_id"), "image": str(image),
                               "profile": profile.name, "shrunk_from": args.trace, "started": now(),
                               "finding": list(finding.signature()), "description": finding.describe()})  # fmt: skip
    for i, e in enumerate(events):
        writer.record(i, e, None, [])
    writer.close("complete", finished=now())
    print(f"written: {out}")
    if args.regression:
        name = args.regression
        path = Path("tests/data/regressions") / f"test_{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(regression_test_source(events, finding, name))
        print(f"regression test: {path}")
    return EXIT_FINDINGS


_signalled: list[int] = []


def _raise_interrupt(signum: int, frame: object) -> None:
    # once: a second Ctrl-C must not cut the clean-up (ending QEMU and gdb, closing the trace)
    if _signalled:
        return
    _signalled.append(signum)
    if proc.deferring():
        return  # inside a part that must not be cut (an op's trace line and counts): acted on next
    raise KeyboardInterrupt(f"signal {signum}")


def check_interrupted() -> None:
    """Between ops: a KeyboardInterrupt can be swallowed where Python ignores exceptions (an
    at-fork hook while QEMU starts, a __del__), so the signal is remembered and acted on here."""
    if _signalled:
        raise KeyboardInterrupt(f"signal {_signalled[0]}")


def _internal_error(exc: BaseException) -> str:
    import traceback

    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return (f"hil: internal error (not a finding): {type(exc).__name__}: {exc}{at}; "
            "run with HIL_DEBUG=1 for the traceback")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argtypes.Parser(prog="hil", description="Hardware-in-the-loop checker for OSTD's page-table API")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="a checked run of a seeded random workload")
    run.add_argument("--ops", type=argtypes.positive_int, default=3000)
    run.add_argument("--seed", type=argtypes.seed, default=1)
    run.add_argument("--profile", type=argtypes.profile, default="default")
    run.add_argument("--image", type=argtypes.guest_image,
                     help="guest image (default: guest/build/kernel.elf, with --exec upstream guest/build-upstream/)")
    run.add_argument("--exec", choices=tuple(EXEC_IMAGES),
                     help="the exec the guest and the model follow (docs/semantics.md; default: the image's)")
    run.add_argument("--trace", type=argtypes.output_file, help="trace file (default traces/run-seed<S>-<time>.jsonl)")
    run.add_argument("--resume", metavar="TRACE", type=argtypes.readable_file,
                     help="continue an interrupted run from its last finished op (its seed, image, profile)")
    run.add_argument("--error-rate", type=argtypes.rate, default=0.04)
    run.add_argument("--stop-on-finding", nargs="?", const="any", choices=("any", "new"),
                     help="stop at the first finding (any, the default) or the first not in --baseline (new)")
    run.add_argument("--baseline", metavar="FILE", type=argtypes.readable_file,
                     help="known findings: exit 0 unless a new one appears")
    run.add_argument("--gdb-only", action="store_true", help="read memory through gdb, not the shared RAM file")
    run.add_argument("--paranoid", action="store_true",
                     help="compare QEMU's own translation with the walker after every op (default: every 200)")
    run.add_argument("--show", choices=("new", "all", "none"), default="new",
                     help="print findings as they come: the first of each kind/clause/field (default), all, none")
    run.set_defaults(fn=cmd_run)
    rep = sub.add_parser("replay", help="re-run a trace and report any difference")
    rep.add_argument("trace", type=argtypes.readable_file)
    rep.add_argument("--image", type=argtypes.guest_image)
    rep.add_argument("--profile", type=argtypes.profile)
    rep.set_defaults(fn=cmd_replay)
    shr = sub.add_parser("shrink", help="minimise a failing trace (delta debugging)")
    shr.add_argument("trace", type=argtypes.readable_file)
    shr.add_argument("--clause", help="shrink for the first finding with this clause (default: the first finding)")
    shr.add_argument("--out", type=argtypes.output_file)
    shr.add_argument("--regression", metavar="NAME", type=argtypes.name,
                     help="also write tests/data/regressions/test_NAME.py")
    shr.add_argument("--image", type=argtypes.guest_image)
    shr.add_argument("--profile", type=argtypes.profile)
    shr.add_argument("-v", "--verbose", action="store_true")
    shr.set_defaults(fn=cmd_shrink)
    ci_workflow.add_parser(sub)  # `hil ci`, `hil baseline`
    debug_workflow.add_parser(sub)  # `hil debug`
    nightly_workflow.add_parser(sub)  # `hil nightly`
    args = parser.parse_args(argv)
    # SIGTERM ends the run like Ctrl-C: every `finally` runs, QEMU and gdb are ended by PID,
    # the trace is closed as interrupted
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    if argtypes.held:  # came while hil was loading: nothing is started yet
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        code: int = args.fn(args)
        return code
    except KeyboardInterrupt:  # before or after a command's own handling (start-up, clean-up)
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, AbiError, TraceError) as exc:
        print(f"hil: {exc}", file=sys.stderr)
        return EXIT_INFRA
    except HilError as exc:
        print(f"hil: {exc}", file=sys.stderr)
        return EXIT_INFRA
    except Exception as exc:
        if os.environ.get("HIL_DEBUG"):
            import traceback

            traceback.print_exc()
        print(_internal_error(exc), file=sys.stderr)
        return EXIT_INFRA


if __name__ == "__main__":
    sys.exit(main())


