"""The upstream-OSTD guest (`make -C guest EXEC=upstream`): each decision where upstream differs
from vostd (docs/semantics.md, "upstream"), asserted on what the harness reads from guest memory
(page tables, metadata slots, registry, the PAT MSR as the guest read it back)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.errors import AbiError
from hil.run.session import Session
from hil.target import abi
from hil.target.machine import REPO
from model import ops as m
from model import upstream
from model.types import PAGE_SIZE, CachePolicy, PageFlags, PageProperty, PrivFlags, pte_index

UPSTREAM_BUILD = REPO / "guest" / "build-upstream"
UPSTREAM_IMAGE = UPSTREAM_BUILD / "kernel.elf"
P = m.PanicCode
PTE_PWT, PTE_PCD, PTE_HUGE = 1 << 3, 1 << 4, 1 << 7


def build_upstream() -> Path:
    subprocess.run(["make", "-s", "-C", str(REPO / "guest"), "EXEC=upstream", f"B={UPSTREAM_BUILD}"], check=True)
    return UPSTREAM_IMAGE


@pytest.fixture(scope="module")
def up() -> Iterator[Session]:
    s = Session(image=build_upstream(), exec_name="upstream")
    s.boot()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def fresh(up: Session) -> Session:
    up.reset()
    return up


def ok(s: Session, op: m.Op) -> m.OpResult:
    res = s.apply(op).result
    assert res.status == m.Status.OK, f"{op!r} -> {res!r}"
    return res


def new_space(s: Session, start: int = 0, end: int = 1 << 47) -> tuple[int, int]:
    vs = ok(s, m.NewVmSpace()).get("vs")
    return vs, ok(s, m.OpenCursorMut(vs=vs, start=start, end=end)).get("cursor")


def frame(s: Session, i: int) -> tuple[int, int]:
    assert s.layout is not None
    paddr = s.layout.data_pool_start + i * PAGE_SIZE
    return ok(s, m.FrameFromUnused(paddr=paddr)).get("frame"), paddr


def raw_rc(s: Session, paddr: int) -> int:
    assert s.memory is not None and s.layout is not None
    return int.from_bytes(s.memory.read(s.layout.meta_base + 64 * (paddr // PAGE_SIZE) + 40, 8), "little")


def leaf_pte(s: Session, vs: int, va: int) -> int:
    """The level-1 PTE of `va`, walked in guest memory from the VmSpace's root (registry w0)."""
    assert s.memory is not None
    node = s.snapshot().vm_spaces[vs].root
    for level in (4, 3, 2):
        pte = int.from_bytes(s.memory.read(node + 8 * pte_index(va, level), 8), "little")
        assert pte & 1 and not pte & PTE_HUGE, f"no table at level {level} for {va:#x}"
        node = pte & 0x000F_FFFF_FFFF_F000
    return int.from_bytes(s.memory.read(node + 8 * pte_index(va, 1), 8), "little")


def test_layout_names_the_exec_and_a_mismatch_is_refused(up: Session) -> None:
    assert up.layout is not None and up.layout.exec_name == "upstream"
    assert up.memory is not None
    word = up.memory.read(up._layout_paddr + 8 * abi.LAYOUT_FIELDS.index("exec"), 8)
    assert int.from_bytes(word, "little") == abi.EXEC_NAMES.index("upstream")
    wrong = Session(image=UPSTREAM_IMAGE, exec_name="vostd")
    try:
        with pytest.raises(AbiError, match="is an EXEC=upstream build; exec vostd needs an EXEC=vostd build"):
            wrong.boot()
    finally:
        wrong.close()


def test_query_borrows_the_item_rc_unchanged_no_handle(fresh: Session) -> None:
    s = fresh
    vs, c = new_space(s)
    f, paddr = frame(s, 0)
    ok(s, m.Jump(cursor=c, va=0x5000))
    ok(s, m.Map(cursor=c, frame=f, prop=PageProperty(int(PageFlags.R), CachePolicy.WRITETHROUGH, int(PrivFlags.USER))))
    ok(s, m.Jump(cursor=c, va=0x5000))
    before = s.snapshot()
    rc = raw_rc(s, paddr)
    res = ok(s, m.Query(cursor=c))
    after = s.snapshot(before)
    assert res.get("present") == 1 and res.get("paddr") == paddr and res.get("frame") == 0
    assert PageProperty.decode(res.get("prop")).cache == CachePolicy.WRITETHROUGH
    assert raw_rc(s, paddr) == rc == 1  # the PTE's reference only: query took none
    assert after.frames == before.frames and after.next_ids["frame"] == before.next_ids["frame"]


def test_map_over_a_mapped_page_panics_and_keeps_the_old_leaf(fresh: Session) -> None:
    s = fresh
    vs, c = new_space(s)
    fa, pa = frame(s, 0)
    fb, pb = frame(s, 1)
    ok(s, m.Map(cursor=c, frame=fa))
    ok(s, m.Jump(cursor=c, va=0))
    before = leaf_pte(s, vs, 0)
    res = s.apply(m.Map(cursor=c, frame=fb)).result
    assert res == m.OpResult.panic(P.MAP_ALREADY_MAPPED), res
    assert "already mapped" in s.response().message
    assert leaf_pte(s, vs, 0) == before and before & 0x000F_FFFF_FFFF_F000 == pa
    assert raw_rc(s, pa) == 1 and raw_rc(s, pb) == 1  # no replace; the new frame's handle was moved in
    s.reset()


def test_pat_programmed_and_wc_uc_encoded_through_it(fresh: Session) -> None:
    s = fresh
    assert s.memory is not None
    pat = s.memory.read(s.elf.vaddr_to_paddr(s.elf.symbol("hil_pat_msr")), 8)
    assert int.from_bytes(pat, "little") == upstream.PAT_MSR  # as rdmsr read it back after configure_pat
    vs, c = new_space(s)
    want = {CachePolicy.WRITE_COMBINING: PTE_PCD, CachePolicy.UNCACHEABLE: PTE_PCD | PTE_PWT,
            CachePolicy.WRITETHROUGH: PTE_PWT, CachePolicy.WRITEBACK: 0}  # fmt: skip
    for i, (cache, bits) in enumerate(want.items()):
        f, _ = frame(s, i)
        ok(s, m.Map(cursor=c, frame=f, prop=PageProperty(int(PageFlags.R), cache, int(PrivFlags.USER))))
        pte = leaf_pte(s, vs, i * PAGE_SIZE)
        assert pte & (PTE_PCD | PTE_PWT | PTE_HUGE) == bits | PTE_HUGE, (cache, hex(pte))
        # PAT index (bit 7 << 2 | PCD << 1 | PWT) selects the programmed entry of this policy
        index = 4 | (2 if pte & PTE_PCD else 0) | (1 if pte & PTE_PWT else 0)
        entry = (upstream.PAT_MSR >> (8 * index)) & 0xFF
        assert entry == {CachePolicy.WRITE_COMBINING: 0x01, CachePolicy.UNCACHEABLE: 0x00,
                         CachePolicy.WRITETHROUGH: 0x04, CachePolicy.WRITEBACK: 0x06}[cache]  # fmt: skip
    ok(s, m.Jump(cursor=c, va=0))
    res = ok(s, m.Query(cursor=c))
    assert PageProperty.decode(res.get("prop")).cache == CachePolicy.WRITE_COMBINING
    f, _ = frame(s, 10)
    ok(s, m.Jump(cursor=c, va=0x10_0000))
    res = s.apply(m.Map(cursor=c, frame=f, prop=PageProperty(1, CachePolicy.WRITE_PROTECTED, 1))).result
    assert res == m.OpResult.panic(P.UNSUPPORTED_CACHE)
    s.reset()


@pytest.mark.parametrize(("pages", "flush_all"), [(31, False), (32, True)])
def test_tlb_flush_threshold_counts_pages(fresh: Session, pages: int, flush_all: bool) -> None:
    """Upstream: >= 32 pages queued is a full flush (vostd: more than 32 ops)."""
    s = fresh
    vs, c = new_space(s)
    for i in range(pages):
        f, _ = frame(s, i)
        ok(s, m.Map(cursor=c, frame=f))
    ok(s, m.Jump(cursor=c, va=0))
    r0 = s.response()
    ok(s, m.Unmap(cursor=c, len=pages * PAGE_SIZE))
    r1 = s.response()
    if flush_all:
        assert r1.flush_log == (abi.FLUSH_LOG_ALL,) and r1.flush_all_total == r0.flush_all_total + 1
    else:
        assert r1.flush_log == tuple(i * PAGE_SIZE for i in range(pages))


def test_open_locks_the_lowest_covering_node_and_disjoint_cursors_coexist(fresh: Session) -> None:
    """lock_range: guard level = the lowest node covering the range, the nodes down to it are
    allocated at open; cursors whose guard nodes are disjoint live on one VmSpace at once."""
    s = fresh
    vs = ok(s, m.NewVmSpace()).get("vs")
    before = s.snapshot()
    c1 = ok(s, m.OpenCursorMut(vs=vs, start=0x1000, end=0x3000)).get("cursor")
    after = s.snapshot(before)
    reg = after.cursors[c1]  # read from the guest's registry entry (w5 = level | guard << 8)
    assert (reg.level, reg.guard_level, reg.va) == (1, 1, 0x1000)
    new = {i: after.slot(i).sto for i in after.slots if before.slot(i).rc != after.slot(i).rc}
    assert sorted(sto[1] for sto in new.values() if sto) == [1, 2, 3]  # levels 3, 2, 1 allocated at open
    view = after.vm_spaces[vs]
    assert len(view.nodes) == 4 and view.cursor == 1  # VmSpace w1: the number of live cursors
    # a 1 GiB-aligned page elsewhere: guard level 1 in another level-1 node, its own path allocated
    c2 = ok(s, m.OpenCursorMut(vs=vs, start=1 << 30, end=(1 << 30) + 0x1000)).get("cursor")
    # spanning two level-2 entries: guard level 2, whose node holds both cursors' nodes: busy
    res = s.apply(m.OpenCursor(vs=vs, start=0x1F_F000, end=0x20_1000)).result
    assert res == m.OpResult.err(m.ErrorCode.CURSOR_BUSY)
    res = s.apply(m.OpenCursor(vs=vs, start=0x2000, end=0x4000)).result  # the same level-1 node
    assert res == m.OpResult.err(m.ErrorCode.CURSOR_BUSY)
    st = s.snapshot()
    assert st.vm_spaces[vs].cursor == 2 and st.cursors[c2].guard_level == 1 and len(st.vm_spaces[vs].nodes) == 6
    f, paddr = frame(s, 0)
    ok(s, m.Map(cursor=c2, frame=f))
    assert leaf_pte(s, vs, 1 << 30) & 0x000F_FFFF_FFFF_F000 == paddr
    res = s.apply(m.DropVmSpace(vs=vs)).result
    assert res == m.OpResult.err(m.ErrorCode.VM_SPACE_BUSY)
    ok(s, m.DropCursor(cursor=c1))
    assert s.snapshot().vm_spaces[vs].cursor == 1
    ok(s, m.DropCursor(cursor=c2))
    assert s.snapshot().vm_spaces[vs].cursor == 0
    ok(s, m.DropVmSpace(vs=vs))


def test_find_next_clamps_to_the_barrier_and_jump_from_there_pops_to_the_guard(fresh: Session) -> None:
    s = fresh
    vs = ok(s, m.NewVmSpace()).get("vs")
    # two level-2 entries, both absent: move_forward steps 2 MiB at a time, past the end
    c = ok(s, m.OpenCursor(vs=vs, start=0x1000, end=0x20_3000)).get("cursor")
    assert s.snapshot().cursors[c].guard_level == 2
    res = ok(s, m.FindNext(cursor=c, len=0x20_2000))
    cur = s.snapshot().cursors[c]
    assert res.get("found") == 0 and cur.va == 0x20_3000  # clamped (vostd leaves 0x40_0000)
    ok(s, m.Jump(cursor=c, va=0x1000))
    cur = s.snapshot().cursors[c]
    assert (cur.va, cur.level) == (0x1000, 2)


# --- the README comparison: each root-cause finding class on each exec --------------------------
FINDINGS = sorted((REPO / "tests" / "data" / "findings").glob("*.jsonl"))
# the confirmed (vostd) findings whose minimal trace does not reach them on upstream, and why
NOT_ON_UPSTREAM = {
    "spec-MAP-2": "map over a mapped page panics (MAP_ALREADY_MAPPED): no replace",
    "spec-MAP-3": "map over a mapped page panics (MAP_ALREADY_MAPPED): no replace",
    "spec-MAP-7": "map over a mapped page panics (MAP_ALREADY_MAPPED): no replace",
    "spec-MAP-4": "query borrows: no clone handle to re-map (BAD_ID); re-map would panic anyway",
    "spec-MAP-5": "query borrows: no clone handle to re-map (BAD_ID); re-map would panic anyway",
}
_VS = [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=1 << 47), m.FrameFromUnused(paddr=0x77_8000)]
# spec findings only upstream's exec reaches: (kind, clause) -> a minimal trace (frame paddr in the data pool)
UPSTREAM_ONLY: dict[tuple[str, str], list[m.Op]] = {
    ("SPEC", "Q-4"): _VS + [m.Map(cursor=1, frame=1), m.Jump(cursor=1, va=0), m.Query(cursor=1)],  # rc not +1
    ("SPEC", "Q-6"): _VS + [m.Map(cursor=1, frame=1), m.Jump(cursor=1, va=0), m.Query(cursor=1)],  # no new handle
    ("SPEC", "OC-1"): [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0x1000, end=0x3000)],  # nodes allocated at open
    ("SPEC", "OC-4"): [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0x1000, end=0x3000)],  # guard level 1, not 4
    ("INVARIANT", "S6"): [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0x1000, end=0x3000)],  # guard_level == 4
    ("SPEC", "NAV-2"): [m.NewVmSpace(), m.OpenCursor(vs=1, start=0x1000, end=0x3000), m.Jump(cursor=1, va=0x2000)],
}


def run_on(image: Path, events: list) -> list:  # type: ignore[type-arg]
    from hil.run.runner import Runner

    s = Session(image=image)
    runner = Runner(s)
    try:
        runner.start()
        return runner.run(events)
    finally:
        s.close()


def _image(exec_name: str) -> Path:
    return REPO / "guest" / "build" / "kernel.elf" if exec_name == "vostd" else build_upstream()


@pytest.mark.parametrize("exec_name", upstream.EXECS)
@pytest.mark.parametrize("path", FINDINGS, ids=lambda p: p.stem)
def test_confirmed_finding_class_on_each_exec(path: Path, exec_name: str) -> None:
    """Each confirmed finding's minimal trace: reported on vostd; on upstream as NOT_ON_UPSTREAM says."""
    from hil.check import Kind
    from hil.run.trace import read_trace

    trace = read_trace(path)
    signature = tuple(trace.header["finding"])
    findings = run_on(_image(exec_name), trace.events)
    reported = any(f.signature() == signature for f in findings)
    assert reported == (exec_name == "vostd" or path.stem not in NOT_ON_UPSTREAM), [f.describe() for f in findings]
    assert not [f for f in findings if f.kind == Kind.IMPL], "guest and model must agree"


@pytest.mark.parametrize("exec_name", upstream.EXECS)
@pytest.mark.parametrize("key", sorted(UPSTREAM_ONLY), ids=lambda k: k[1])
def test_upstream_only_finding_class(key: tuple[str, str], exec_name: str) -> None:
    from hil.check import Kind

    findings = run_on(_image(exec_name), UPSTREAM_ONLY[key])
    reported = any((str(f.kind), f.clause) == key for f in findings)
    assert reported == (exec_name == "upstream"), [f.describe() for f in findings]
    assert not [f for f in findings if f.kind == Kind.IMPL], "guest and model must agree"


def counters_w5(s: Session) -> int:
    assert s.memory is not None and s.layout is not None
    return int.from_bytes(s.memory.read(s.layout.registry_base + 16 + 5 * 8, 8), "little")


def test_activate_takes_a_reference_and_an_active_dropped_vm_space_lives_until_the_next(fresh: Session) -> None:
    s = fresh
    assert s.layout is not None
    kr = s.layout.kernel_root
    assert raw_rc(s, kr) == 2 and counters_w5(s) == 0  # first_activate: the CPU's reference
    vs, c = new_space(s)
    root = s.snapshot().vm_spaces[vs].root
    f, paddr = frame(s, 0)
    ok(s, m.Map(cursor=c, frame=f))
    ok(s, m.DropCursor(cursor=c))
    ok(s, m.Activate(vs=vs))
    assert s.cr3() & ~0xFFF == root and counters_w5(s) == vs
    assert raw_rc(s, root) == 2 and raw_rc(s, kr) == 1  # moved from the kernel root to this one
    ok(s, m.Activate(vs=vs))  # already active: nothing
    assert raw_rc(s, root) == 2 and raw_rc(s, kr) == 1
    ok(s, m.DropVmSpace(vs=vs))  # the activation's Arc keeps it: nothing freed
    st = s.snapshot()
    assert vs not in st.vm_spaces and st.leaked[vs].root == root and st.active == vs
    assert raw_rc(s, root) == 2 and raw_rc(s, paddr) == 1 and s.cr3() & ~0xFFF == root
    ok(s, m.Activate(vs=0))  # the last Arc and the CPU's reference go: the tree is freed
    st = s.snapshot()
    assert not st.leaked and st.active == 0 and s.cr3() & ~0xFFF == kr
    assert raw_rc(s, root) == (1 << 64) - 1 and raw_rc(s, paddr) == (1 << 64) - 1 and raw_rc(s, kr) == 2


def test_a_page_table_nodes_last_handle_drop_runs_on_drop(fresh: Session) -> None:
    """FrameFromInUse on a level-1 node, unmap its 2 MiB subtree (the handle keeps the node
    alive, out of every tree), drop the handle: on_drop releases the node's leaf."""
    s = fresh
    vs, c = new_space(s)
    f, paddr = frame(s, 0)
    ok(s, m.Map(cursor=c, frame=f))
    view = s.snapshot().vm_spaces[vs]  # the walk, from guest memory
    node = next(n.paddr for n in view.nodes.values() if n.level == 1)
    h = ok(s, m.FrameFromInUse(paddr=node)).get("frame")
    ok(s, m.Jump(cursor=c, va=4 << 20))  # out of the 2 MiB slot: the cursor pops to level 2
    ok(s, m.Jump(cursor=c, va=0))
    assert ok(s, m.Unmap(cursor=c, len=2 << 20)).get("num") == 1
    st = s.snapshot()
    assert raw_rc(s, node) == 1 and raw_rc(s, paddr) == 1 and node in st.held_nodes
    assert st.held_nodes[node].entries[0] & 0x000F_FFFF_FFFF_F000 == paddr  # read from guest memory
    ok(s, m.FrameDrop(frame=h))
    assert raw_rc(s, node) == (1 << 64) - 1 and raw_rc(s, paddr) == (1 << 64) - 1
    assert not s.snapshot().held_nodes


@pytest.mark.parametrize("last_drop", ["FrameDrop", "UniqueDrop"])
def test_on_drop_through_the_checked_run_guest_and_model_agree(last_drop: str) -> None:
    """The same sequence through the Runner: the model (held_nodes from the snapshot) predicts
    what the guest did, op by op (no IMPL finding); the leaf's slot ends UNUSED. The last
    reference goes as a Frame, or as a UniqueFrame (TryFromShared at rc 1 first)."""
    from hil.check import Kind
    from hil.run.runner import Runner

    s = Session(image=build_upstream())
    runner = Runner(s)
    try:
        runner.start()
        assert s.layout is not None
        data0 = s.layout.data_pool_start
        for op in [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=1 << 47), m.FrameFromUnused(paddr=data0),
                   m.Map(cursor=1, frame=1)]:  # fmt: skip
            runner.step(op)
        assert runner.state is not None
        node = next(n.paddr for n in runner.state.vm_spaces[1].nodes.values() if n.level == 1)
        for op in [m.FrameFromInUse(paddr=node), m.Jump(cursor=1, va=4 << 20), m.Jump(cursor=1, va=0),
                   m.Unmap(cursor=1, len=2 << 20)]:  # fmt: skip
            runner.step(op)
        last: list[m.Op] = [m.FrameDrop(frame=2)]
        if last_drop == "UniqueDrop":
            last = [m.TryFromShared(frame=2), m.UniqueDrop(unique=1)]
        for op in last:
            rec = runner.step(op)
            assert rec.result is not None and rec.result.status == m.Status.OK
        assert not runner.state.held_nodes
        findings = [f for r in runner.records for f in r.findings]
        assert not [f for f in findings if f.kind == Kind.IMPL], [f.describe() for f in findings]
        assert runner.state.slot_of(data0).rc == (1 << 64) - 1 and runner.state.slot_of(node).rc == (1 << 64) - 1
    finally:
        s.close()


def test_hil_run_exec_upstream_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`hil run --exec upstream` boots the upstream image, checks with the upstream model (no IMPL
    finding; its SPEC findings are about the spec against upstream); a vostd image with --exec
    upstream is one line, exit 2; an upstream image without --exec runs the upstream model."""
    import json

    from hil import cli

    build_upstream()
    trace = tmp_path / "up.jsonl"
    code = cli.main(["run", "--exec", "upstream", "--ops", "150", "--seed", "1", "--show", "none",
                     "--trace", str(trace)])  # fmt: skip
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert code == 1 and lines[0]["exec"] == "upstream" and lines[0]["image"].endswith("build-upstream/kernel.elf")
    kinds = {f["kind"] for x in lines for f in x.get("findings") or []}
    assert "IMPL" not in kinds and "SPEC" in kinds
    capsys.readouterr()
    code = cli.main(["run", "--exec", "upstream", "--image", str(REPO / "guest" / "build" / "kernel.elf"),
                     "--ops", "5", "--trace", str(tmp_path / "x.jsonl")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (f"hil: {REPO / 'guest' / 'build' / 'kernel.elf'} is an EXEC=vostd build; exec "
                                     "upstream needs an EXEC=upstream build (make -C guest EXEC=upstream "
                                     "B=build-upstream)")  # fmt: skip
    trace2 = tmp_path / "img.jsonl"
    code = cli.main(["run", "--image", str(UPSTREAM_IMAGE), "--ops", "60", "--seed", "2", "--show", "none",
                     "--trace", str(trace2)])  # fmt: skip
    lines = [json.loads(x) for x in trace2.read_text().splitlines()]
    assert code == 1 and not [f for x in lines for f in x.get("findings") or [] if f["kind"] == "IMPL"]
    # the upstream model ran: query results carry no handle (vostd's clone would)
    queries = [x for x in lines if (x.get("event") or {}).get("op") == "Query" and x["result"]["status"] == "OK"]
    assert all(dict(x["result"]["values"]).get("frame", 0) == 0 for x in queries)


def test_flush_oracle_counts_pages_on_upstream() -> None:
    """hil/check/oracles.expected_flushes: 32 single pages are 32 invlpgs on vostd (ops > 32 is
    the threshold) but a flush-all on upstream (>= 32 pages)."""
    from hil.check import oracles
    from model import store
    from tests.model.model_helpers import BASE, LAY

    state: object = BASE
    ops: list[m.Op] = [m.NewVmSpace(), m.OpenCursorMut(vs=1, start=0, end=1 << 47)]
    for i in range(32):
        ops += [m.FrameFromUnused(paddr=LAY.data_pool_start + i * PAGE_SIZE), m.Map(cursor=1, frame=i + 1)]
    ops.append(m.Jump(cursor=1, va=0))
    for op in ops:
        _, state = store.step(state, op)  # type: ignore[arg-type]
    unmap = m.Unmap(cursor=1, len=32 * PAGE_SIZE)
    res, after = store.step(state, unmap)  # type: ignore[arg-type]
    assert res.get("num") == 32
    vostd = oracles.expected_flushes(unmap, state, after, res)  # type: ignore[arg-type]
    up = oracles.expected_flushes(unmap, state, after, res, "upstream")  # type: ignore[arg-type]
    assert vostd == tuple(i * PAGE_SIZE for i in range(32)) and up == (abi.FLUSH_LOG_ALL,)
