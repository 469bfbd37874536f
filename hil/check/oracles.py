"""Oracles that share neither the model's nor the walker's assumptions (ARCHITECTURE "Oracles").

- MMU probes (`MmuProbes`): around every op that may change a translation (map, unmap,
  protect_next) the guest, with the op's VmSpace in CR3, touches the VAs the op affects
  (filling the TLB), runs the op, then reads / writes / executes them again, all inside the
  one request (hil/target/abi.py OFF_PROBE_*), so nothing in between evicts the entries.
  Each data frame carries a per-frame marker (and a `ret` for the exec probe), so a stale
  translation to another frame reads the wrong marker. With SMAP on (layout `probe_user`)
  one read per VA runs with EFLAGS.AC clear: it faults iff the translation is user, so a
  stale or wrong U bit shows; the other accesses run with AC set, where U plays no part.
  QEMU keeps the TLB entries of AC-clear and AC-set accesses apart and fills none on a
  fault, so of a missing flush it shows U turned on (0 -> 1), not U turned off.
  The expected outcome of each probe is the walker's translation of the guest's page tables
  *after* the op: a difference is the MMU using something memory no longer says, i.e. a
  missing invalidation (Kind.TLB).
- QEMU's own translation (`QemuTranslation`): QEMU's `info tlb` (a walk of the active root
  by QEMU's monitor code) against our walker's rendering of the same tree (Kind.WALKER).
- The flush log (`flush_findings`): the invalidations exec must issue for an op (per page
  or all), predicted from the model's before/after, against the guest's log (Kind.IMPL).
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from hil.check import Finding, Kind, _node_va
from hil.observe.snapshot import (
    ADDR_MASK,
    BIT_7,
    BIT_P,
    LEVELS,
    QEMU_PHYS_MASK,
    TLB_BITS,
    TLB_FLAGS,
    Outcome,
    TlbLine,
    canonical,
    compare_info_tlb,
    decode_pte,
    descends,
    leaf_mappings,
    level_size,
    parse_info_tlb,
    render_info_tlb,
    translate,
)
from hil.target import abi
from hil.target.memory import PhysMemory
from model import ops as m
from model.state import State
from model.types import PAGE_SIZE, USER_VA_END, page_size

MARKER_BASE = 0x4D4B_0000_0000_0000  # "MK": marker = MARKER_BASE ^ paddr, at offset 0 of a data frame
RET = 0xC3
_ENTRY = struct.Struct("<4Q")
# A 512 GiB unmap may cover many mapped pages: probe the first ones from the cursor (the op
# changes them all the same way; a missed flush shows on any of them). Fewer when each VA
# takes more entries than PROBE_CAP allows (the U read: 11 VAs of 5 entries plus one outside).
MAX_VAS = 14


def marker(paddr: int) -> int:
    return MARKER_BASE ^ paddr


@dataclass(frozen=True)
class ProbeEntry:
    va: int
    mode: int  # abi.PROBE_* bits


@dataclass(frozen=True)
class Expect:
    """What one VA allows under one set of tables (the walker's MMU view)."""

    read: bool
    write: bool
    exec: bool
    value: int | None  # the u64 at the translated address
    pa: int | None
    walk: str
    user: bool = False  # U at every level of the walk

    def allows(self, mode: int) -> bool:
        if mode & abi.PROBE_SMAP and self.user:
            return False  # SMAP: a kernel data access with AC clear faults on a user page
        if mode & abi.PROBE_READ:
            return self.read
        if mode & abi.PROBE_WRITE:
            return self.write
        return self.exec


@dataclass(frozen=True)
class ProbePlan:
    vs: int
    root: int
    entries: tuple[ProbeEntry, ...]
    # exec invalidates these VAs (or all): the MMU must follow the new tables; elsewhere the
    # old translation may survive (protect_next issues no flush, spec §5.9), so either is right
    coherent: bool = True
    before: tuple[tuple[int, Expect], ...] = ()

    def vas(self) -> list[int]:
        return sorted({e.va for e in self.entries})


def _affected(before: State, op: m.Op) -> tuple[int, int, int] | None:
    """(vs, lo, hi): the VA range whose translations `op` may change, or None."""
    if not isinstance(op, (m.Map, m.Unmap, m.ProtectNext)):
        return None
    cur = before.cursors.get(op.cursor)
    if cur is None or not cur.mutable or cur.vs not in before.vm_spaces:
        return None
    if isinstance(op, m.Map):
        # past the barrier map panics; probing there could even touch a non-canonical VA (#GP)
        return (cur.vs, cur.va, cur.va + PAGE_SIZE) if cur.va + PAGE_SIZE <= min(cur.end, USER_VA_END) else None
    if op.len % PAGE_SIZE or cur.va + op.len > cur.end:
        return None  # panics: the op changes nothing
    return cur.vs, cur.va, min(cur.va + op.len, USER_VA_END)


class MmuProbes:
    """Plans the probes of one op, writes them into the mailbox, checks the outcomes."""

    def __init__(self, memory: PhysMemory, layout: abi.Layout):
        self.memory = memory
        self.layout = layout
        self.ops_probed = 0
        self.probes_run = 0
        self.refused = 0
        # the guest enabled SMAP (its CPU has it): plan the AC-clear read that sees U. Without
        # it U is not probed at all (hil run says so), rather than guessed from a ring-0 access.
        self.user_probed = bool(layout.probe_user)

    def _data_frame(self, paddr: int) -> bool:
        return self.layout.data_pool_start <= paddr < self.layout.data_pool_end

    def _mark(self, paddr: int) -> None:
        want = struct.pack("<QB", marker(paddr), RET)
        if self.memory.read(paddr, len(want)) != want:
            self.memory.write(paddr, want)

    def expect(self, root: int, va: int) -> Expect:
        walk = translate(self.memory, root, va)
        if walk.outcome is not Outcome.LEAF or walk.pa is None:
            return Expect(False, False, False, None, None, walk.describe())
        value = int.from_bytes(self.memory.read(walk.pa & ~7, 8), "little")
        return Expect(True, walk.writable, walk.executable, value, walk.pa, walk.describe(), walk.user)

    def plan(self, before: State, op: m.Op) -> ProbePlan | None:
        aff = _affected(before, op)
        if aff is None:
            return None
        vs, lo, hi = aff
        view = before.vm_spaces[vs]
        # a range query, not view.mappings(): the plan costs the range, not the tree's size
        mapped = view.mappings_in(lo, hi, MAX_VAS)
        vas = list(mapped)
        new_safe = True  # the frame the op puts at the VA (map only) holds our `ret`
        if isinstance(op, m.Map):
            if not self.expect(view.root, lo).read:
                # a map where nothing translates: no stale entry can exist there (an earlier
                # forgotten flush is caught at its own op) and the memory compare sees the new
                # PTE; unprobed, the op also runs under the kernel's CR3, not this root (a map
                # that hands this very root out as its new node cannot pull the ground from under
                # the guest: seeded bug 11 triple-faulted here)
                return None
            vas = [lo]
            fpa = before.frames.get(op.frame)
            new_safe = fpa is not None and self._data_frame(fpa)
            if new_safe and fpa is not None:
                self._mark(fpa)
        if not vas:
            return None
        # and a VA the op must leave alone, still mapped (the op kept the MMU on this space)
        first_outside = view.first_mapping_outside(lo, hi)
        outside = [first_outside.va] if first_outside is not None else []
        # U matters where the op leaves a translation: not after an unmap (the VA must fault)
        user = self.user_probed and not isinstance(op, m.Unmap)
        per_va = 2 if isinstance(op, m.Unmap) else 4 + user
        vas = vas[: (abi.PROBE_CAP - len(outside)) // per_va]
        for va in vas:
            old = mapped.get(va)
            if old is not None and self._data_frame(old.paddr):
                self._mark(old.paddr)
        was = {va: self.expect(view.root, va) for va in vas + outside}  # the MMU view before the op
        entries: list[ProbeEntry] = [ProbeEntry(va, abi.PROBE_READ) for va in outside]
        for va in vas:
            old = mapped.get(va)
            old_safe = old is None or self._data_frame(old.paddr)
            if was[va].read:
                # fill the TLB; where nothing translates there is nothing to fill (x86 caches no
                # fault), and a touch that faults costs the guest ~50 us under TCG (a fresh map)
                entries.append(ProbeEntry(va, abi.PROBE_TOUCH | abi.PROBE_READ | abi.PROBE_WRITE))
            entries.append(ProbeEntry(va, abi.PROBE_READ))
            if not isinstance(op, m.Unmap):
                entries.append(ProbeEntry(va, abi.PROBE_WRITE))
                if old_safe and new_safe:
                    # exec only where whatever the TLB may still hold is a marked frame (a `ret`)
                    entries.append(ProbeEntry(va, abi.PROBE_EXEC))
                if user:
                    entries.append(ProbeEntry(va, abi.PROBE_SMAP | abi.PROBE_READ))
        return ProbePlan(vs, view.root, tuple(entries[: abi.PROBE_CAP]), not isinstance(op, m.ProtectNext),
                         tuple(was.items()))  # fmt: skip

    def write(self, plan: ProbePlan) -> None:
        """Into the mailbox before the request (the guest reads it when it sees the new seq)."""
        base = self.layout.mailbox
        body = b"".join(_ENTRY.pack(e.va, e.mode, 0, 0) for e in plan.entries)
        self.memory.write(base + abi.OFF_PROBES, body)
        self.memory.write(base + abi.OFF_PROBE_ROOT, struct.pack("<QQ", plan.root, len(plan.entries)))

    def check(self, index: int, plan: ProbePlan, after: State) -> list[Finding]:
        """Compare each probe with the walker's translation of the guest's tables after the op."""
        base = self.layout.mailbox
        if int.from_bytes(self.memory.read(base + abi.OFF_PROBE_COUNT, 8), "little") == abi.ROOT_REFUSED:
            self.refused += 1  # a root the guest cannot run on (abi.ROOT_REFUSED): other checks see why
            return []
        self.ops_probed += 1
        raw = self.memory.read(base + abi.OFF_PROBES, abi.PROBE_ENTRY_SIZE * len(plan.entries))
        view = after.vm_spaces.get(plan.vs)
        if view is None:
            return []
        old = dict(plan.before)
        new: dict[int, Expect] = {}
        out: list[Finding] = []
        for i, e in enumerate(plan.entries):
            _va, _mode, outcome, value = _ENTRY.unpack_from(raw, i * abi.PROBE_ENTRY_SIZE)
            if e.mode & abi.PROBE_TOUCH:
                continue
            self.probes_run += 1
            what = ("user" if e.mode & abi.PROBE_SMAP else "read" if e.mode & abi.PROBE_READ
                    else "write" if e.mode & abi.PROBE_WRITE else "exec")  # fmt: skip
            if outcome == 0:
                out.append(
                    Finding(
                        Kind.TLB,
                        index,
                        "PROBE",
                        "not_run",
                        vs=plan.vs,
                        va=e.va,
                        message="the guest did not run the probe (an image without MMU probes, or "
                        "a U probe on a CPU without SMAP?)",
                    )
                )
                continue
            if e.va not in new:
                new[e.va] = self.expect(view.root, e.va)
            want = new[e.va]
            if what == "exec" and want.exec and want.pa is not None and not self._data_frame(want.pa & ~0xFFF):
                continue  # never planned that way: a frame without our `ret`
            faulted = outcome & 0xFF == abi.PROBE_FAULT
            got_value = value if e.mode & abi.PROBE_READ and not faulted else None

            def matches(x: Expect, faulted: bool = faulted, got: int | None = got_value, mode: int = e.mode) -> bool:
                return faulted == (not x.allows(mode)) and (got is None or got == x.value)

            if matches(want) or (not plan.coherent and e.va in old and matches(old[e.va])):
                continue
            g: object
            mdl: object
            if faulted != (not want.allows(e.mode)):
                field_, g, mdl = (
                    what,
                    "fault" if faulted else "no fault",
                    "fault" if not want.allows(e.mode) else "no fault",
                )
                msg = "the MMU disagrees with the page tables after the op (stale TLB entry?)"
                if what == "user" and want.read:
                    # present either way: the fault (or none) is SMAP's, i.e. the U bit the MMU used
                    g = "user (fault)" if faulted else "supervisor (no fault)"
                    mdl = "user (fault)" if want.user else "supervisor (no fault)"
                    msg = ("a kernel read with SMAP enforced (AC clear) faults iff the translation is "
                           "user: the MMU used another U bit than the page tables say after the op "
                           "(stale TLB entry?)")
            else:
                field_, g, mdl = "value", got_value, want.value
                msg = "the MMU read another frame than the tables map (stale TLB entry?)"
            out.append(
                Finding(
                    Kind.TLB,
                    index,
                    "PROBE",
                    field_,
                    vs=plan.vs,
                    va=e.va,
                    guest=g,
                    model=mdl,
                    message=f"{msg}; error code {outcome >> 8:#x}; tables: {want.walk}",
                )
            )
        return out


# --- QEMU's own translation ---------------------------------------------------------------
# The monitor: HMP on its own unix socket (hil/target/machine.py `hmp`), not QMP through the
# `qemu.qmp` package. Measured (../shared/NOTES.md "Monitor"; `QemuTranslation.seconds` here):
# `info tlb` takes ~4 ms over HMP and ~41 ms through QMP's human-monitor-command, and QMP has
# no native command that walks a page table; at one check per op in --paranoid, QMP would
# cost ~6x the op itself.
Walker = Callable[[PhysMemory, int, bool], list[TlbLine]]
USER_TOP = 1 << 47
KEPT_WALKS = 16  # walks kept for reuse (roots)
LINES_PER_INTERVAL = 500  # QemuTranslation.due: tables up to this many lines at the base rate
FULL_EVERY = 64  # the kernel half (shared, ~130k entries: ~30 ms in Python) every this many checks


def our_info_tlb(memory: PhysMemory, root: int, user_only: bool) -> list[TlbLine]:
    """The walker's rendering of QEMU's `info tlb` for CR3 = root (user half, or whole tree)."""
    return render_info_tlb(leaf_mappings(memory, root, user_half=user_only, anomalies=[]))


_NODE_WORDS = struct.Struct("<512Q")
# an entry of a rendered node: a leaf's line, or a child table (its paddr, its VA base)
_NodeItem = TlbLine | tuple[int, int]


def _render_node(data: bytes, level: int, base: int, user_only: bool) -> list[_NodeItem]:
    """One node's part of `our_info_tlb`, in entry order: what `_tree_leaves` and
    `render_info_tlb` make of these 4 KiB (reserved-bit leaves left out, as the MMU faults)."""
    out: list[_NodeItem] = []
    indices = range(256) if level == LEVELS and user_only else range(512)
    raw = _NODE_WORDS.unpack(data)
    size = level_size(level)
    for i in indices:
        e = raw[i]
        if not e & BIT_P:
            continue
        pte = decode_pte(e, level)
        va = base + i * size
        if pte.leaf:
            if pte.reserved:
                continue
            shown = e & ~BIT_7 if level == 1 else e
            flags = "".join(ch if shown & bit else "-" for ch, bit in zip(TLB_FLAGS, TLB_BITS, strict=True))
            out.append(TlbLine(canonical(va), pte.addr & QEMU_PHYS_MASK, flags))
        elif descends(e, level):
            out.append((e & ADDR_MASK, va))
    return out


class NodeLines:
    """`our_info_tlb`, node by node: every node of the tree is read again at each call (4 KiB,
    ~1 us), but a node's lines are rendered again only when its bytes changed, so a check of a
    10,000-mapping tree costs the nodes an op changed, not the 10,000 lines. The result equals
    `our_info_tlb` from scratch (tests/unit/test_oracle_walk_reuse.py)."""

    def __init__(self) -> None:
        # per (root, user_only): (paddr, level, va base) -> (the node's bytes, its items)
        self.trees: dict[tuple[int, bool], dict[tuple[int, int, int], tuple[bytes, list[_NodeItem]]]] = {}
        self.rendered = 0  # nodes rendered (not reused), for tests

    def __call__(self, memory: PhysMemory, root: int, user_only: bool) -> list[TlbLine]:
        root &= ADDR_MASK
        old = self.trees.pop((root, user_only), {})
        new: dict[tuple[int, int, int], tuple[bytes, list[_NodeItem]]] = {}
        self.trees[(root, user_only)] = new  # the most recent last
        while len(self.trees) > KEPT_WALKS:
            del self.trees[next(iter(self.trees))]
        out: list[TlbLine] = []
        if root + PAGE_SIZE > memory.ram_size:
            return out
        seen: set[int] = set()

        def visit(paddr: int, level: int, base: int) -> None:
            seen.add(paddr)
            data = memory.read(paddr, PAGE_SIZE)
            key = (paddr, level, base)
            kept = old.get(key)
            if kept is None or kept[0] != data:
                kept = (data, _render_node(data, level, base, user_only))
                self.rendered += 1
            new[key] = kept
            for item in kept[1]:
                if isinstance(item, TlbLine):
                    out.append(item)
                    continue
                child, va = item
                # as walk_tree: a subtree beyond RAM or a node reached twice is not descended
                if child + PAGE_SIZE <= memory.ram_size and child not in seen:
                    visit(child, level - 1, va)

        visit(root, LEVELS, 0)
        return out


class QemuTranslation:
    """Every `every` ops (and on every op when `every` is 1), QEMU walks one VmSpace's tree
    (`info tlb` under CR3 = its root, lent by the guest after the op: abi OFF_VIEW_ROOT) and
    every line is compared with our walker's. The VmSpace is the op's, else a live one."""

    def __init__(self, memory: PhysMemory, layout: abi.Layout, hmp: Callable[[str], str], *, every: int,
                 walker: Walker = our_info_tlb, seed: int = 0):  # fmt: skip
        self.memory = memory
        self.layout = layout
        self.hmp = hmp
        self.every = max(1, every)
        self.walker = walker
        self.rng = random.Random(seed)
        self.checks = 0
        self.lines = 0
        self.seconds = 0.0
        self.last_index = -self.every  # the op of the last check (the first op is checked)
        self.refused = 0  # views the guest refused (abi.ROOT_REFUSED)
        self.last_lines = 0  # lines QEMU printed then
        # our walk, node by node, each node's lines kept while its bytes are unchanged
        self.walks = NodeLines()

    def carry_from(self, prev: QemuTranslation) -> None:
        """A new machine's oracle goes on counting (and re-validates the kept walks)."""
        self.checks, self.lines, self.seconds = prev.checks, prev.lines, prev.seconds
        self.last_index, self.last_lines, self.refused = prev.last_index, prev.last_lines, prev.refused
        self.walks = prev.walks

    def ours(self, root: int, user_only: bool) -> list[TlbLine]:
        if self.walker is not our_info_tlb:  # a test's walker: called every time
            return self.walker(self.memory, root, user_only)
        return self.walks(self.memory, root, user_only)

    def due(self, index: int) -> bool:
        """Every `every` ops, stretched in proportion to the size of the tables QEMU printed
        last (`LINES_PER_INTERVAL`): the check is O(mappings), so at 10,000 mappings it runs
        ~16x less often and costs per op what it costs at a few hundred (issue 15: an op's
        cost may not grow with the mapping count). `every` 1 (--paranoid): every op."""
        if self.every == 1:
            return True
        return index - self.last_index >= self.every * max(1.0, self.last_lines / LINES_PER_INTERVAL)

    def plan(self, index: int, before: State, op: m.Op) -> int | None:
        """The root to view after `op` (written into the mailbox), or None this op."""
        if not self.due(index) or isinstance(op, m.DropVmSpace) or not before.vm_spaces:
            return None
        vs = -1
        cursor = getattr(op, "cursor", None)
        if isinstance(cursor, int) and cursor in before.cursors:
            vs = before.cursors[cursor].vs
        if vs not in before.vm_spaces:
            vs = self.rng.choice(sorted(before.vm_spaces))
        root = before.vm_spaces[vs].root
        self.memory.write(self.layout.mailbox + abi.OFF_VIEW_ROOT, struct.pack("<Q", root))
        return root

    def check(self, index: int, root: int, after: State) -> list[Finding]:
        lent = int.from_bytes(self.memory.read(self.layout.mailbox + abi.OFF_VIEW_ROOT, 8), "little")
        if lent == abi.ROOT_REFUSED:
            self.refused += 1  # not a root the guest can run on (abi.ROOT_REFUSED): QEMU saw none
            self.last_index = index - self.every + 1  # try again at the next op
            return []
        t0 = time.perf_counter()
        vs = next((v for v, view in after.vm_spaces.items() if view.root == root), None)
        user_only = self.checks % FULL_EVERY != 0
        qemu = parse_info_tlb(self.hmp("info tlb"))
        if user_only:
            qemu = [line for line in qemu if line.va < USER_TOP]
        ours = self.ours(root, user_only)
        self.checks += 1
        self.lines += len(qemu)
        self.last_index, self.last_lines = index, len(qemu)
        out = [
            Finding(Kind.WALKER, index, "QEMU", "info tlb", vs=vs, va=d.key,
                    guest=str(d.qemu) if d.qemu else None, model=str(d.ours) if d.ours else None,
                    message=f"QEMU's walk of root {root:#x} (guest) and ours (model) differ")
            for d in compare_info_tlb(qemu, ours)
        ]  # fmt: skip
        self.seconds += time.perf_counter() - t0
        return out


# --- the flush log as data ----------------------------------------------------------------
FLUSH_ALL_OPS_THRESHOLD = 32  # ostd/src/mm/tlb.rs: more queued ops than this -> flush all
FLUSH_ALL_RANGE_PAGES = 32  # a range op longer than this many pages -> flush all


def expected_flushes(
    op: m.Op, before: State, after: State, result: m.OpResult, exec_name: str = "vostd"
) -> tuple[int, ...]:
    """The invalidations exec issues for `op` (spec §5.13, docs/semantics.md "TLB flusher"),
    in the guest's log format: invlpg VAs in order, or (FLUSH_LOG_ALL,) for a full flush.
    Map that replaced a leaf: its VA. Unmap: every item taken (a leaf: its page; a subtree:
    its range), then the thresholds. Everything else: none (protect_next issues none, §5.9)."""
    if result.status != m.Status.OK:
        return ()
    if isinstance(op, m.Map):
        cur = before.cursors.get(op.cursor)
        return (cur.va,) if cur is not None and result.get("replaced") else ()
    if not isinstance(op, m.Unmap):
        return ()
    cur = before.cursors.get(op.cursor)
    if cur is None or cur.vs not in before.vm_spaces or cur.vs not in after.vm_spaces:
        return ()
    old, new = before.vm_spaces[cur.vs].nodes, after.vm_spaces[cur.vs].nodes
    taken: list[tuple[int, int]] = []  # (va, pages) of each topmost entry the op cleared
    for paddr, node in old.items():
        kept = new.get(paddr)
        if kept is None or kept.path != node.path:
            continue  # freed with its subtree: inside a taken range
        if kept is node or kept.entries == node.entries:
            continue  # unchanged (the snapshot shares an unchanged node's object)
        for i, (b, a) in enumerate(zip(node.entries, kept.entries, strict=True)):
            if b & 0x81 and not a & 0x81:  # OSTD's is_present: bit 0 or bit 7
                va = _node_va(node.path, i) & ((1 << 48) - 1)
                taken.append((va, page_size(node.level) // PAGE_SIZE))
    taken.sort()
    if exec_name == "upstream":  # pages, not ops: U:mm/tlb.rs:223 for_range, :318 push (>= 32 pages queued)
        if sum(n for _, n in taken) >= FLUSH_ALL_OPS_THRESHOLD:
            return (abi.FLUSH_LOG_ALL,)
    elif len(taken) > FLUSH_ALL_OPS_THRESHOLD or any(n > FLUSH_ALL_RANGE_PAGES for _, n in taken):
        return (abi.FLUSH_LOG_ALL,)
    return tuple(va + k * PAGE_SIZE for va, n in taken for k in range(n))


def flush_findings(
    index: int, op: m.Op, before: State, after: State, result: m.OpResult, log: tuple[int, ...],
    exec_name: str = "vostd",
) -> list[Finding]:
    want = expected_flushes(op, before, after, result, exec_name)[: abi.FLUSH_LOG_CAP]
    if tuple(log) == want:
        return []
    return [Finding(Kind.IMPL, index, "FLUSH_LOG", "invalidations", guest=[hex(v) for v in log],
                    model=[hex(v) for v in want],
                    message=f"{op!r}: the TLB invalidations the guest issued differ from exec's "
                            f"({abi.FLUSH_LOG_ALL:#x} = flush all)")]  # fmt: skip
