"""The checked run: for each event, drive the guest, snapshot, predict, check, record.

The model predicts from the last observed guest state (it never drifts: after a finding it
is, in effect, re-synced from the guest), so every op is checked on its own.
"""

from __future__ import annotations

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
from hil.run.session import Session
from hil.run.trace import Event, Poke, Record, TraceWriter
from model import axioms, store, upstream
from model import ops as m
from model.state import State, changed_slots

REBOOT_STATUSES = (m.Status.PANIC, m.Status.EXCEPTION)
# QEMU's own translation vs the walker every this many ops (`info tlb` ~4 ms + our render
# ~1 ms: ~0.1 ms per op at 50); `hil run --paranoid` checks every op. 0: never.
QEMU_EVERY = 50
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
    reset_s: float = 0.0  # back to a booted guest after a PANIC / EXCEPTION / infra error, snapshot included

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.total_ops / elapsed if elapsed > 0 else 0.0


class Runner:
    def __init__(
        self, session: Session, writer: TraceWriter | None = None, *,
        stop_on_finding: bool | str = False, check_enabled: bool = True, probes: bool = True,
        baseline: Baseline | None = None, qemu_every: int | None = None,
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
        if self.qemu_every and self.session.memory is not None and self.session.layout is not None:
            machine = self.session.machine
            assert machine is not None
            prev = self.qemu
            self.qemu = oracles.QemuTranslation(self.session.memory, self.session.layout, machine.hmp,
                                                every=self.qemu_every, walker=self.walker)  # fmt: skip
            if prev is not None:
                self.qemu.carry_from(prev)

    def step(self, event: Event) -> Record:
        assert self.state is not None
        index = self.index  # advanced by _record: an op lost to an infra error leaves no gap
        if isinstance(event, Poke):
            self.session.poke(event.paddr, event.data)
            rec = Record(index, event, None, [])
            self._record(rec)
            return rec
        op = event
        before = self.state
        t0 = time.perf_counter()
        plan = self.probes.plan(before, op) if self.probes is not None else None
        if plan is not None:
            assert self.probes is not None
            self.probes.write(plan)
        view = self.qemu.plan(index, before, op) if self.qemu is not None else None
        obs = self.session.apply(op)
        t1 = time.perf_counter()
        after = self.session.snapshot(before)
        t2 = time.perf_counter()
        findings: list[Finding] = []
        uninterpretable = False
        if self.check_enabled:
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
                if plan is not None and self.probes is not None and obs.result.status == m.Status.OK:
                    findings += self.probes.check(index, plan, after)
                if view is not None and self.qemu is not None and obs.result.status not in REBOOT_STATUSES:
                    findings += self.qemu.check(index, view, after)
                if obs.result.status not in REBOOT_STATUSES:
                    self.outcomes.record(op, before, after, obs.result)
            except InfraError:
                raise
            except Exception as exc:  # noqa: BLE001 - never how a run ends (see below)
                # a guest state the model (or a predicate) cannot interpret, e.g. a node in use
                # twice: a finding at this op, and the run goes on from a fresh machine
                uninterpretable = True
                findings.append(Finding(Kind.IMPL, index, "MODEL", "uninterpretable",
                                        message=f"the model cannot interpret the guest's state: "
                                                f"{type(exc).__name__}: {exc}"))  # fmt: skip
            t4 = time.perf_counter()
            self.stats.model_s += t3 - t2
            self.stats.check_s += t4 - t3
        findings = self.causes.link(findings, before)
        rec = Record(index, op, obs.result, findings)
        self._record(rec)  # first: the counts below never include an op the trace lacks
        self.stats.drive_s += t1 - t0
        self.stats.snapshot_s += t2 - t1
        self.stats.ops[type(op).__name__] += 1
        self.stats.statuses[obs.result.status.name] += 1
        for f in findings:
            self.stats.findings[(str(f.kind), f.clause)] += 1
            self.stats.first_seen.setdefault((str(f.kind), f.clause), index)
        if obs.result.status in REBOOT_STATUSES or uninterpretable:
            self._reboot()
        else:
            self.state = after
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
        """Run a fixed event list, or a generator called with the current state."""
        found: list[Finding] = []
        source = iter(events) if not callable(events) else None
        n = 0
        last_retry = -1
        while count is None or n < count:
            assert self.state is not None
            if source is not None:
                event = next(source, None)
            else:
                assert callable(events)
                event = events(self.state)
            if event is None:
                break
            done_before = self.index
            try:
                rec = self.step(event)
            except InfraError as exc:
                # a generated workload goes on from a fresh machine (once in a row); a fixed event
                # list cannot (later events name objects the lost op created): re-raise
                if source is not None or last_retry == n or isinstance(exc, TraceWriteError):
                    raise
                self.stats.infra_retries += 1
                last_retry = n
                # the op was recorded if only the reboot after it failed: it counts, once
                done = self.index > done_before
                if self.writer is not None:
                    # `lost`: the event the workload generated and no guest ran (hil run --resume
                    # draws it again to stay in step with the seed)
                    self.writer.note("infra-retry", index=self.index, error=exc.what,
                                     lost=None if done else event.to_json())  # fmt: skip
                self._reboot(reboot=True)
                if not done:
                    continue
                rec = self.records[-1]
            n += 1
            found += rec.findings
            if on_step:
                on_step(rec)
            if self._stops(rec):
                break
        return found

    def _stops(self, rec: Record) -> bool:
        if not self.stop_on_finding or not rec.findings:
            return False
        if self.stop_on_finding == "new":
            assert self.baseline is not None
            return bool(self.baseline.new_in(rec.findings))
        return True


def kinds(findings: Iterable[Finding]) -> Counter[Kind]:
    return Counter(f.kind for f in findings)
