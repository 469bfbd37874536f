"""The checked run: for each event, drive the guest, snapshot, predict, check, record.

The model predicts from the last observed guest state (it never drifts: after a finding it
is, in effect, re-synced from the guest), so every op is checked on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hil import check
from hil.check import Finding, Kind, oracles
from hil.errors import InfraError, TraceWriteError
from hil.run.baseline import Baseline
from hil.run.outcomes import OutcomeCoverage
from hil.run.session import Observation, Session
from hil.run.trace import Event, Poke, Record, TraceWriter
from hil.target.proc import interrupts_deferred
from model import axioms, store, upstream
from model import ops as m
from model.state import State, changed_slots

REBOOT_STATUSES = (m.Status.PANIC, m.Status.EXCEPTION)
# QEMU's own translation vs the walker every this many ops (`info tlb` ~4-5 ms, most of it QEMU
# reading the 256 shared kernel-half PDPTs, plus our render: ~25 us per op at 200, ~100 at 50,
# an eighth of a checked op); stretched for big tables (QemuTranslation.due); `hil run
# --paranoid` checks every op. 0: never.
QEMU_EVERY = 200
UNPREDICTED_STATUS = {m.Probe: m.Status.OK, m.RaiseFault: m.Status.EXCEPTION}


@dataclass
class Stats:
    ops: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    findings: Counter[tuple[str, str]] = field(default_factory=Counter)
    first_seen: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, clause) -> op index
    reboots: int = 0
    infra_retries: int = 0
    started: float = field(default_factory=time.monotonic)
    drive_s: float = 0.0
    snapshot_s: float = 0.0
    model_s: float = 0.0
    check_s: float = 0.0
    discarded: int = 0  # ops run after one that ended the run or needed a reboot (Runner.run)
    reset_s: float = 0.0  # back to a booted guest after a PANIC / EXCEPTION / infra error, snapshot included

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.total_ops / elapsed if elapsed > 0 else 0.0


@dataclass
class _InFlight:
    """An op sent to the guest, with what its oracles planned before it ran."""

    op: m.Op
    before: State
    plan: oracles.ProbePlan | None
    view: int | None
    started: float
    sent: float = 0.0


@dataclass
class _Observed:
    """An op whose stop was reached: its result, the snapshot after it, the memory oracles."""

    index: int
    op: m.Op
    before: State
    after: State
    obs: Observation
    oracle_findings: list[Finding] = field(default_factory=list)
    uninterpretable: Exception | None = None
    drive_s: float = 0.0
    snapshot_s: float = 0.0
    check_s: float = 0.0


class Runner:
    def __init__(
        self, session: Session, writer: TraceWriter | None = None, *,
        stop_on_finding: bool | str = False, check_enabled: bool = True, probes: bool = True,
        baseline: Baseline | None = None, qemu_every: int | None = None, overlap: bool = True,
    ):  # fmt: skip
        self.session = session
        self.writer = writer
        # False / True (= "any": the first finding) / "new": the first finding not in `baseline`
        self.stop_on_finding = "any" if stop_on_finding is True else stop_on_finding
        if self.stop_on_finding == "new" and baseline is None:
            raise ValueError("stop_on_finding='new' needs a baseline")
        self.baseline = baseline
        self.check_enabled = check_enabled
        self.coverage = axioms.ClauseCoverage()
        self.stats = Stats()
        self.records: list[Record] = []
        self.state: State | None = None
        self.index = 0
        self.probes_enabled = probes and check_enabled
        self.causes = check.Causes()  # root cause vs consequence of each finding (caused_by)
        self.probes: oracles.MmuProbes | None = None
        self.qemu_every = (QEMU_EVERY if qemu_every is None else qemu_every) if check_enabled else 0
        self.walker: oracles.Walker = oracles.our_info_tlb  # tests swap in a wrong one
        self.qemu: oracles.QemuTranslation | None = None
        self.outcomes = OutcomeCoverage()
        self.exec_name = "vostd"  # the booted image's exec (hil_layout): selects the model
        self.model: upstream.Model = store.apply
        self.overlap = overlap  # check op k while the guest runs op k+1 (`run`), where the session can
        self._flight: _InFlight | None = None
        self._pending_reboot = False

    def start(self) -> list[Finding]:
        """Boot and check the invariants of the boot state (op index -1)."""
        try:
            self.session.boot()
        except InfraError as exc:
            # a machine that did not come up (killed, a deadline on a loaded machine): one more
            # try, like an op's retry; a second failure is the run's infrastructure error
            if isinstance(exc, TraceWriteError):
                raise
            self.stats.infra_retries += 1
            if self.writer is not None:
                self.writer.note("infra-retry", index=self.index, error=exc.what, lost=None)
            self.session.boot()
        self.state = self.session.snapshot()
        if self.session.layout is not None:
            self.exec_name = self.session.layout.exec_name
            self.model = upstream.apply_for(self.exec_name)
        self._attach_oracles()
        if not self.check_enabled:
            return []
        empty = dataclasses.replace(self.state, anomalies=())
        return check.snapshot_anomalies(-1, empty, self.state) + check.check_invariants(-1, self.state)

    def _reboot(self, reboot: bool = False) -> None:
        """A fresh guest: the fast reset after a PANIC / EXCEPTION, a new QEMU (`reboot`) after
        an infrastructure error (the old one may be hung, gone or half-connected)."""
        t0 = time.perf_counter()
        self.session.reset(reboot=reboot)
        self.stats.reboots += 1
        self.state = self.session.snapshot()
        self.stats.reset_s += time.perf_counter() - t0
        self._attach_oracles()

    def _attach_oracles(self) -> None:
        """The oracles hold the session's memory reader and layout: new ones after each boot."""
        if self.probes_enabled and self.session.memory is not None and self.session.layout is not None:
            old = self.probes
            self.probes = oracles.MmuProbes(self.session.memory, self.session.layout)
            if old is not None:
                self.probes.ops_probed, self.probes.probes_run = old.ops_probed, old.probes_run
                self.probes.refused = old.refused
        if self.qemu_every and self.session.memory is not None and self.session.layout is not None:
            machine = self.session.machine
            assert machine is not None
            prev = self.qemu
            self.qemu = oracles.QemuTranslation(self.session.memory, self.session.layout, machine.hmp,
                                                every=self.qemu_every, walker=self.walker)  # fmt: skip
            if prev is not None:
                self.qemu.carry_from(prev)

    def step(self, event: Event, *, reboot: bool = True) -> Record:
        """One event, start to end: drive, snapshot, predict, check, record. With `reboot`
        False a needed reboot waits for `reboot_if_pending` (hil run --resume: a discarded op
        was drawn from the state before it)."""
        if isinstance(event, Poke):
            return self._poke(event)
        self._start(event)
        return self._conclude(self._observe(), reboot=reboot)

    def reboot_if_pending(self) -> None:
        if self._pending_reboot:
            self._pending_reboot = False
            self._reboot()

    def _poke(self, event: Poke) -> Record:
        self.session.poke(event.paddr, event.data)
        rec = Record(self.index, event, None, [])
        self._record(rec)
        return rec

    def _start(self, op: m.Op) -> None:
        """Plan and write the oracles' part of the request, then send it: the guest runs `op`
        until `_observe` waits for its stop."""
        assert self.state is not None
        before = self.state
        t0 = time.perf_counter()
        plan = self.probes.plan(before, op) if self.probes is not None else None
        if plan is not None:
            assert self.probes is not None
            self.probes.write(plan)
        view = self.qemu.plan(self.index, before, op) if self.qemu is not None else None
        self._flight = _InFlight(op, before, plan, view, t0)
        self.session.begin(op)
        self._flight.sent = time.perf_counter()

    def _observe(self) -> _Observed:
        """Wait for the op's stop, snapshot, and run the oracles that read guest memory or ask
        QEMU (they must see the machine as the op left it: before the next op is sent)."""
        f = self._flight
        assert f is not None
        self._flight = None
        t_wait = time.perf_counter()
        obs = self.session.finish()
        t1 = time.perf_counter()
        after = self.session.snapshot(f.before)
        t2 = time.perf_counter()
        seen = _Observed(self.index, f.op, f.before, after, obs)
        # the drive: planning and sending, then waiting for the stop (not the work done between)
        seen.drive_s = (f.sent - f.started) + (t1 - t_wait)
        seen.snapshot_s = t2 - t1
        status = obs.result.status
        if self.check_enabled:
            try:
                if f.plan is not None and self.probes is not None and status == m.Status.OK:
                    seen.oracle_findings += self.probes.check(self.index, f.plan, after)
                if f.view is not None and self.qemu is not None and status not in REBOOT_STATUSES:
                    seen.oracle_findings += self.qemu.check(self.index, f.view, after)
            except InfraError:
                raise
            except Exception as exc:  # noqa: BLE001 - a state the oracles cannot read: see _conclude
                seen.uninterpretable = exc
            seen.check_s = time.perf_counter() - t2
        if status not in REBOOT_STATUSES:
            self.state = after  # what the next op is drawn from (a reboot replaces it)
        return seen

    def _conclude(self, seen: _Observed, *, reboot: bool = True) -> Record:
        """Predict, check, record. Pure computation on the observed states: the guest may already
        run the next op. Reboots after a PANIC / EXCEPTION / uninterpretable state unless
        `reboot` is False (the caller reboots: `_pending_reboot`)."""
        index, op, before, after, obs = seen.index, seen.op, seen.before, seen.after, seen.obs
        findings: list[Finding] = []
        uninterpretable: Exception | None = seen.uninterpretable
        if self.check_enabled:
            t2 = time.perf_counter()
            t3 = t2
            try:
                try:
                    predicted_result, predicted = self.model(before, op, check.alloc_from(before, after))
                except store.Unpredictable:
                    # Probe / RaiseFault: the model does not predict the MMU or a fault; state must not change
                    predicted_result = m.OpResult(UNPREDICTED_STATUS[type(op)], obs.result.code, obs.result.values)
                    predicted = dataclasses.replace(before, parent=before, changed=frozenset())
                t3 = time.perf_counter()
                findings += check.snapshot_anomalies(index, before, after)
                findings += check.diff_results(index, op, obs.result, predicted_result)
                if obs.result.status != m.Status.EXCEPTION:
                    findings += check.diff_states(index, before, after, predicted)
                if obs.result.status not in REBOOT_STATUSES:
                    findings += check.check_axioms(
                        index, op, before, after, obs.result, predicted, predicted_result,
                        impl_clean=not findings, coverage=self.coverage,
                    )  # fmt: skip
                    findings += check.check_invariants(index, after, only=changed_slots(before, after), before=before)
                if obs.result.status == m.Status.OK:  # the flush log as data
                    findings += oracles.flush_findings(index, op, before, predicted, predicted_result,
                                                       obs.response.flush_log, self.exec_name)  # fmt: skip
                findings += seen.oracle_findings
                if obs.result.status not in REBOOT_STATUSES and uninterpretable is None:
                    self.outcomes.record(op, before, after, obs.result)
            except InfraError:
                raise
            except Exception as exc:  # noqa: BLE001 - never how a run ends (see below)
                uninterpretable = exc
            if uninterpretable is not None:
                # a guest state the model (or a predicate, or an oracle) cannot interpret, e.g. a
                # node in use twice: a finding at this op, and the run goes on from a fresh machine
                why = f"{type(uninterpretable).__name__}: {uninterpretable}"
                findings.append(Finding(Kind.IMPL, index, "MODEL", "uninterpretable",
                                        message=f"the model cannot interpret the guest's state: {why}"))  # fmt: skip
            t4 = time.perf_counter()
            self.stats.model_s += t3 - t2
            self.stats.check_s += t4 - t3 + seen.check_s
        findings = self.causes.link(findings, before)
        rec = Record(index, op, obs.result, findings)
        # the trace line and the counts together: a Ctrl-C / SIGTERM lands before both or after
        # both (it raises wherever Python is; with the overlap this is where much of the time
        # goes, and a line written but not counted made `ops_done` one short of the trace)
        with interrupts_deferred():
            self._record(rec)
            self.stats.drive_s += seen.drive_s
            self.stats.snapshot_s += seen.snapshot_s
            self.stats.ops[type(op).__name__] += 1
            self.stats.statuses[obs.result.status.name] += 1
            for f in findings:
                self.stats.findings[(str(f.kind), f.clause)] += 1
                self.stats.first_seen.setdefault((str(f.kind), f.clause), index)
        self._pending_reboot = obs.result.status in REBOOT_STATUSES or uninterpretable is not None
        if reboot:
            self.reboot_if_pending()
        return rec

    def _record(self, rec: Record) -> None:
        if self.writer is not None:
            self.writer.record(rec.index, rec.event, rec.result, rec.findings)
        self.records.append(rec)
        self.index = rec.index + 1

    def run(
        self, events: Iterable[Event] | Callable[[State], Event | None], count: int | None = None,
        on_step: Callable[[Record], None] | None = None,
    ) -> list[Finding]:  # fmt: skip
        """Run a fixed event list, or a generator called with the current state.

        Overlapped (`Session.can_overlap`): op k+1 is sent as soon as op k's stop is observed
        (its snapshot read, its memory oracles run, the next op drawn from that snapshot), and
        op k is predicted and checked while the guest runs op k+1 on the other core. Records,
        findings and the trace are those of the one-at-a-time loop, in the same order; only
        an op sent after one that ends the run (a stop on a finding) or whose state the model
        cannot interpret is run and then dropped, with a `discarded` note in the trace."""
        found: list[Finding] = []
        source = iter(events) if not callable(events) else None
        overlap = self.session_can_overlap()
        n = 0  # events concluded (recorded)
        last_retry = -1
        held: _Observed | None = None  # observed, not yet concluded
        redo: Event | None = None  # a fixed list's event dropped after a reboot: run it again

        def conclude(seen: _Observed, reboot: bool = True) -> bool:
            """Record `seen`; True when the run stops there."""
            nonlocal n, found
            rec = self._conclude(seen, reboot=reboot)
            n += 1
            found += rec.findings
            if on_step:
                on_step(rec)
            return self._stops(rec)

        stopped = False
        try:
            while not stopped and (count is None or n + (held is not None) < count):
                assert self.state is not None
                event: Event | None
                if redo is not None:
                    event, redo = redo, None
                elif source is not None:
                    event = next(source, None)
                else:
                    assert callable(events)
                    event = events(self.state)
                if event is None:
                    break
                done_before = self.index
                try:
                    if isinstance(event, Poke):
                        if held is not None:
                            seen, held = held, None
                            if conclude(seen):
                                stopped = True
                                break
                        self._poke(event)
                        n += 1
                        if on_step:
                            on_step(self.records[-1])
                        continue
                    self._start(event)
                    if held is not None:
                        seen, held = held, None
                        stop = conclude(seen, reboot=False)
                        if stop or self._pending_reboot:
                            # the op in flight was drawn from, or follows, a state that ends here
                            self._observe()
                            self._discard(event, "the run stopped at the op before" if stop else
                                          "the op before left a state the model cannot interpret")  # fmt: skip
                            if stop:
                                stopped = True
                                break
                            self.reboot_if_pending()
                            if source is not None:
                                redo = event
                            continue
                    seen = self._observe()
                    if overlap and seen.obs.result.status not in REBOOT_STATUSES and seen.uninterpretable is None:
                        held = seen
                        continue
                    rec_stop = conclude(seen)
                    if rec_stop:
                        stopped = True
                except InfraError as exc:
                    self._flight = None
                    if held is not None:  # fully observed before the fault: it is kept
                        seen, held = held, None
                        if conclude(seen, reboot=False):
                            stopped = True
                        self._pending_reboot = False
                    # a generated workload goes on from a fresh machine (once in a row); a fixed event
                    # list cannot (later events name objects the lost op created): re-raise
                    if source is not None or last_retry == n or isinstance(exc, TraceWriteError) or stopped:
                        raise
                    self.stats.infra_retries += 1
                    last_retry = n
                    # the op was recorded if only the reboot after it failed: it counts, once
                    done = self.index > done_before and self.records[-1].event == event
                    if self.writer is not None:
                        # `lost`: the event the workload generated and no guest ran (hil run --resume
                        # draws it again to stay in step with the seed)
                        self.writer.note("infra-retry", index=self.index, error=exc.what,
                                         lost=None if done else event.to_json())  # fmt: skip
                    self._reboot(reboot=True)
                    continue
        except BaseException:
            # a harness error, ^C: the op already observed is the trace's, as in the one-at-a-time loop
            if held is not None:
                seen, held = held, None
                with contextlib.suppress(Exception):
                    conclude(seen, reboot=False)
            raise
        if held is not None:
            conclude(held)
        return found

    def session_can_overlap(self) -> bool:
        return self.overlap and bool(getattr(self.session, "can_overlap", False))

    def _discard(self, event: Event, why: str) -> None:
        """An op the guest ran that the trace does not record (`run`'s docstring)."""
        self.stats.discarded += 1
        if self.writer is not None:
            self.writer.note("discarded", index=self.index, why=why, event=event.to_json())

    def _stops(self, rec: Record) -> bool:
        if not self.stop_on_finding or not rec.findings:
            return False
        if self.stop_on_finding == "new":
            assert self.baseline is not None
            return bool(self.baseline.new_in(rec.findings))
        return True


def kinds(findings: Iterable[Finding]) -> Counter[Kind]:
    return Counter(f.kind for f in findings)
