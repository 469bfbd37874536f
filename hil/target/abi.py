"""The guest ABI: mailbox layout, op codes, argument/result words, layout block, registry.

The single source of truth: `scripts/gen-abi` renders `guest/include/hil_abi.h` from this
module (`render_header`), and a test fails when the committed header is stale.

Protocol (gdb drive): the guest publishes a response, then calls `hil_op_done` (asm: `nop`,
a write to `hil_doorbell`, `ret`) where the harness stops it: a write watchpoint on the
doorbell (our stub under TCG) or a breakpoint on the `nop` (gdb/MI, KVM; docs/abi.md). The
harness writes the next request (args, op, then seq last), resumes, and the guest executes the
request once it sees `req_seq != resp_seq`. At boot the guest publishes status READY with seq 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from model import ops as m
from model.types import PageProperty, PropTransform

ABI_VERSION = 2  # 2: layout word probe_user, probe mode PROBE_SMAP
LAYOUT_MAGIC = int.from_bytes(b"OSTDHIL1", "little")  # hil_layout word 0; checked at boot

# --- mailbox (one 4 KiB page, symbol `hil_mailbox`) -----------------------------------
MAILBOX_SIZE = 4096
NR_ARGS = 8
NR_RESULTS = 8
OFF_REQ_SEQ = 0
OFF_REQ_OP = 8
OFF_REQ_ARGS = 16  # u64[NR_ARGS]
OFF_RESP_SEQ = 128
OFF_RESP_STATUS = 136
OFF_RESP_CODE = 144
OFF_RESP_RESULTS = 152  # u64[NR_RESULTS]
OFF_EXC_VECTOR = 256  # CPU exception caught inside the op (status EXCEPTION)
OFF_EXC_ERROR = 264
OFF_EXC_RIP = 272
OFF_EXC_CR2 = 280
OFF_EXC_RSP = 288
OFF_TLB_INVLPG = 320  # cumulative count of invlpg executed by the TLB flusher
OFF_TLB_FLUSH_ALL = 328  # cumulative count of full flushes (CR3 reload)
OFF_FLUSH_LOG_LEN = 336  # invlpg VAs of the current op (first FLUSH_LOG_CAP of them)
OFF_VIEW_ROOT = 344  # harness: nonzero -> CR3 = this root while stopped after the op (QEMU's monitor
#                      walks the current CR3); the guest restores its CR3 before the next op
OFF_MESSAGE = 512  # NUL-terminated text (panic reason)
MESSAGE_SIZE = 512
OFF_FLUSH_LOG = 1024  # u64[FLUSH_LOG_CAP]
FLUSH_LOG_CAP = 128
FLUSH_LOG_ALL = (1 << 64) - 1  # entry meaning "full flush"
# MMU probes around one op (hil/check/oracles.py): with OFF_PROBE_COUNT > 0 the guest loads
# CR3 = OFF_PROBE_ROOT, runs the TOUCH entries, the op, then the other entries, restores CR3 and
# zeroes OFF_PROBE_COUNT (the request is consumed). Entry: u64 va, u64 mode, u64 outcome, u64 value.
OFF_PROBE_ROOT = 2048
OFF_PROBE_COUNT = 2056
OFF_PROBES = 2064  # PROBE_CAP entries of PROBE_ENTRY_SIZE bytes
PROBE_CAP = 60
PROBE_ENTRY_SIZE = 32
PROBE_READ = 1  # mode bits: read a u64 (value = what was read)
PROBE_WRITE = 2  # `lock add $0`: a write that keeps the bytes
PROBE_EXEC = 4  # call va + PROBE_EXEC_OFFSET (the harness puts a `ret` there)
PROBE_TOUCH = 8  # run before the op (to fill the TLB), not after it
# the access runs with EFLAGS.AC clear, so under CR4.SMAP it faults on a user page: the probe
# sees U (only planned when the layout's probe_user is 1; without SMAP the guest leaves the
# outcome 0, not run). Without this bit an access runs with AC set: U plays no part.
PROBE_SMAP = 16
PROBE_EXEC_OFFSET = 8
PROBE_OK = 1  # outcome word: 1 no fault; 2 | error_code << 8 a #PF
PROBE_FAULT = 2
# written by the guest into OFF_PROBE_COUNT / OFF_VIEW_ROOT instead of 0 when it refused the root:
# one whose kernel half (entries 256..511) is not the kernel root's, or outside RAM. The guest
# would run on under that CR3 and fault with no handler mapped (a triple fault: a seeded bug
# that hands out an in-use node as a new root did); the probes and QEMU's view are then not run.
ROOT_REFUSED = 1

# --- layout block (symbol `hil_layout`, u64 words) ------------------------------------
LAYOUT_FIELDS = (
    "magic",
    "abi_version",
    "ram_size",
    "meta_base",  # paddr of slot 0
    "slot_size",
    "slot_count",
    "kernel_root",  # paddr of the kernel's level-4 node
    "registry_base",  # paddr of the handle registry
    "registry_entry_size",
    "registry_entries",
    "mailbox",  # paddr of hil_mailbox
    "pt_pool_start",  # page-table nodes are allocated from [start, end)
    "pt_pool_end",
    "data_pool_start",  # free RAM the workload may hand to FrameFromUnused
    "data_pool_end",
    "kernel_virt_offset",  # kernel VMA - LMA
    "linear_map_base",  # paddr_to_vaddr(p) = p + this
    "seeded_bug",  # 0 in the default build
    "exec",  # index into EXEC_NAMES: which exec the guest follows (make EXEC=...)
    "probe_user",  # 1: the CPU has SMAP and the guest enabled it, so the MMU probes see U
)
# The exec a guest build follows (docs/semantics.md): the model is selected by the same name.
EXEC_NAMES = ("vostd", "upstream")
LAYOUT_SIZE = 8 * len(LAYOUT_FIELDS)


@dataclass(frozen=True)
class Layout:
    magic: int
    abi_version: int
    ram_size: int
    meta_base: int
    slot_size: int
    slot_count: int
    kernel_root: int
    registry_base: int
    registry_entry_size: int
    registry_entries: int
    mailbox: int
    pt_pool_start: int
    pt_pool_end: int
    data_pool_start: int
    data_pool_end: int
    kernel_virt_offset: int
    linear_map_base: int
    seeded_bug: int
    exec: int = 0
    probe_user: int = 0

    @property
    def exec_name(self) -> str:
        return EXEC_NAMES[self.exec] if 0 <= self.exec < len(EXEC_NAMES) else f"exec#{self.exec}"

    @classmethod
    def unpack(cls, raw: bytes) -> Layout:
        words = struct.unpack_from(f"<{len(LAYOUT_FIELDS)}Q", raw)
        return cls(*words)


# --- handle registry (registry_entries entries of 64 bytes) ----------------------------
REGISTRY_ENTRY_SIZE = 64
REG_FREE = 0
REG_FRAME = 1  # w0 paddr, w1 handle type (REG_FRAME_TYPE_*)
REG_SEGMENT = 2  # w0 start, w1 end
REG_UNIQUE = 3  # w0 paddr
REG_VM_SPACE = 4  # w0 root paddr, w1 live cursor id (0 none)
REG_CURSOR = 5  # w0 vs id, w1 mutable, w2 barrier start, w3 barrier end, w4 va,
#                 w5 level | guard_level << 8
REG_COUNTERS = 6  # entry 0 only: w0..w4 next id of vm_space, cursor, frame, segment, unique
REG_LEAKED_ROOT = 7  # a dropped VmSpace's root (still walked): id = its old vs id, w0 root
#                      (no longer written: a dropped VmSpace frees its tree; kept for old images)
# A frame handle's type, as exec types it: UFrame (the slot's metadata is untyped: a data frame)
# or any other Frame<dyn AnyFrameMeta> that from_in_use returned (a page-table node, metadata,
# kernel frame), which `map` cannot take (ERR NOT_UFRAME).
REG_FRAME_TYPE_UFRAME = 0
REG_FRAME_TYPE_OTHER = 1
# entry: u64 kind, u64 id, u64 w[6]

# --- metadata slot layout (spec §4.1, our choices for storage) --------------------------
SLOT_OFF_STORAGE = 0  # byte 0: StorageTag; PT node: level @1, stray @2, lock @3, nr_children u16 @4
SLOT_OFF_PT_LEVEL = 1
SLOT_OFF_PT_STRAY = 2
SLOT_OFF_PT_LOCK = 3
SLOT_OFF_PT_NR_CHILDREN = 4
SLOT_OFF_REF_COUNT = 40
SLOT_OFF_VTABLE = 48  # type tag: model.types.Usage value while in use, 0 when uninit
SLOT_OFF_IN_LIST = 56


# --- op codes and their argument / result words ----------------------------------------
@dataclass(frozen=True)
class OpSpec:
    code: int
    cls: type[m.Op]
    args: tuple[str, ...]


OP_SPECS: tuple[OpSpec, ...] = (
    OpSpec(1, m.Nop, ("value",)),
    OpSpec(2, m.NewVmSpace, ()),
    OpSpec(3, m.DropVmSpace, ("vs",)),
    OpSpec(4, m.OpenCursor, ("vs", "start", "end")),
    OpSpec(5, m.OpenCursorMut, ("vs", "start", "end")),
    OpSpec(6, m.DropCursor, ("cursor",)),
    OpSpec(7, m.Query, ("cursor",)),
    OpSpec(8, m.FindNext, ("cursor", "len")),
    OpSpec(9, m.Jump, ("cursor", "va")),
    OpSpec(10, m.VirtAddr, ("cursor",)),
    OpSpec(11, m.Map, ("cursor", "frame", "prop")),
    OpSpec(12, m.Unmap, ("cursor", "len")),
    OpSpec(13, m.ProtectNext, ("cursor", "len", "transform")),
    OpSpec(14, m.FrameFromUnused, ("paddr",)),
    OpSpec(15, m.FrameFromInUse, ("paddr",)),
    OpSpec(16, m.FrameDrop, ("frame",)),
    OpSpec(17, m.SegmentFromUnused, ("start", "end")),
    OpSpec(18, m.SegmentDrop, ("segment",)),
    OpSpec(19, m.SegmentSplit, ("segment", "offset")),
    OpSpec(20, m.SegmentNext, ("segment",)),
    OpSpec(21, m.SegmentClone, ("segment",)),
    OpSpec(22, m.SegmentSlice, ("segment", "start", "end")),
    OpSpec(23, m.UniqueFromUnused, ("paddr",)),
    OpSpec(24, m.UniqueDrop, ("unique",)),
    OpSpec(25, m.FromUnique, ("unique",)),
    OpSpec(26, m.TryFromShared, ("frame",)),
    OpSpec(27, m.Activate, ("vs",)),
    OpSpec(28, m.Probe, ("va", "write", "value")),
    OpSpec(29, m.RaiseFault, ("kind",)),
)
SPEC_BY_CLASS = {s.cls: s for s in OP_SPECS}
SPEC_BY_CODE = {s.code: s for s in OP_SPECS}


def _word(value: object) -> int:
    if isinstance(value, PageProperty):
        return value.encode()
    if isinstance(value, PropTransform):
        return value.encode()
    if isinstance(value, bool):
        return int(value)
    assert isinstance(value, int)
    return value


def encode_request(op: m.Op, seq: int) -> bytes:
    """The request area (offsets 0..80): seq, op code, args."""
    spec = SPEC_BY_CLASS[type(op)]
    args = [_word(getattr(op, name)) for name in spec.args]
    args += [0] * (NR_ARGS - len(args))
    return struct.pack(f"<QQ{NR_ARGS}Q", seq, spec.code, *args)


def encode_raw_request(code: int, args: list[int], seq: int) -> bytes:
    """A request that need not be a valid op (tests of the guest's validation)."""
    padded = list(args) + [0] * (NR_ARGS - len(args))
    return struct.pack(f"<QQ{NR_ARGS}Q", seq, code, *padded)


@dataclass(frozen=True)
class Response:
    seq: int
    status: m.Status
    code: int
    results: tuple[int, ...]
    exc_vector: int
    exc_error: int
    exc_rip: int
    exc_cr2: int
    message: str
    flush_log: tuple[int, ...]
    invlpg_total: int
    flush_all_total: int


def decode_response(page: bytes) -> Response:
    seq, status, code = struct.unpack_from("<QQQ", page, OFF_RESP_SEQ)
    results = struct.unpack_from(f"<{NR_RESULTS}Q", page, OFF_RESP_RESULTS)
    vec, err, rip, cr2 = struct.unpack_from("<QQQQ", page, OFF_EXC_VECTOR)
    invlpg, flush_all, log_len = struct.unpack_from("<QQQ", page, OFF_TLB_INVLPG)
    msg = page[OFF_MESSAGE : OFF_MESSAGE + MESSAGE_SIZE].split(b"\0", 1)[0]
    n = min(log_len, FLUSH_LOG_CAP)
    log = struct.unpack_from(f"<{n}Q", page, OFF_FLUSH_LOG) if n else ()
    try:
        st = m.Status(status)
    except ValueError:
        st = m.Status.NONE
    return Response(
        seq, st, code, results, vec, err, rip, cr2, msg.decode("ascii", "replace"), log,
        invlpg, flush_all,
    )  # fmt: skip


def op_result(op: m.Op, resp: Response) -> m.OpResult:
    """The model-comparable result of `op` from a decoded response."""
    if resp.status == m.Status.OK:
        names = type(op).RESULTS
        return m.OpResult(m.Status.OK, 0, tuple(zip(names, resp.results[: len(names)], strict=True)))
    return m.OpResult(resp.status, resp.code)


# --- C header --------------------------------------------------------------------------
def render_header() -> str:
    from model.types import StorageTag, Usage

    out = [
        "/* Generated by scripts/gen-abi from hil/target/abi.py and model/ops.py. Do not edit. */",
        "#ifndef HIL_ABI_H",
        "#define HIL_ABI_H",
        "",
        f"#define HIL_ABI_VERSION {ABI_VERSION}",
        f"#define HIL_MAGIC {LAYOUT_MAGIC:#x}ULL",
        "",
        "/* mailbox byte offsets */",
    ]
    for name, value in sorted(globals().items(), key=lambda kv: str(kv[0])):
        if name.startswith(("OFF_", "SLOT_OFF_", "REG_")) and isinstance(value, int):
            out.append(f"#define HIL_{name} {value}")
    for name in ("MAILBOX_SIZE", "NR_ARGS", "NR_RESULTS", "MESSAGE_SIZE", "FLUSH_LOG_CAP",
                 "REGISTRY_ENTRY_SIZE", "LAYOUT_SIZE", "PROBE_CAP", "PROBE_ENTRY_SIZE", "PROBE_READ",
                 "PROBE_WRITE", "PROBE_EXEC", "PROBE_TOUCH", "PROBE_SMAP", "PROBE_EXEC_OFFSET", "PROBE_OK",
                 "PROBE_FAULT", "ROOT_REFUSED"):  # fmt: skip
        out.append(f"#define HIL_{name} {globals()[name]}")
    out.append(f"#define HIL_FLUSH_LOG_ALL {FLUSH_LOG_ALL:#x}ULL")
    out.append("")
    out.append("/* layout block: u64 word indices */")
    for i, name in enumerate(LAYOUT_FIELDS):
        out.append(f"#define HIL_LAYOUT_{name.upper()} {i}")
    out.append(f"#define HIL_LAYOUT_NR_WORDS {len(LAYOUT_FIELDS)}")
    out.append("")
    out.append("/* status */")
    for s in m.Status:
        out.append(f"#define HIL_STATUS_{s.name} {int(s)}")
    out.append("")
    out.append("/* error codes (status ERR) */")
    for e in m.ErrorCode:
        out.append(f"#define HIL_ERR_{e.name} {int(e)}")
    out.append("")
    out.append("/* panic codes (status PANIC) */")
    for p in m.PanicCode:
        out.append(f"#define HIL_PANIC_{p.name} {int(p)}")
    out.append("")
    out.append("/* type tag (vtable word) = ghost PageUsage */")
    for u in Usage:
        out.append(f"#define HIL_USAGE_{u.name} {int(u)}")
    out.append("/* storage tag (storage byte 0) */")
    for t in StorageTag:
        out.append(f"#define HIL_STORAGE_{t.name} {int(t)}")
    out.append("")
    out.append("/* op codes; HIL_ARG_<OP>_<NAME> = argument word index, HIL_RES_<OP>_<NAME> = result word index */")
    for spec in OP_SPECS:
        op = spec.cls.NAME.upper()
        out.append(f"#define HIL_OP_{op} {spec.code}")
        for i, a in enumerate(spec.args):
            out.append(f"#define HIL_ARG_{op}_{a.upper()} {i}")
        for i, r in enumerate(spec.cls.RESULTS):
            out.append(f"#define HIL_RES_{op}_{r.upper()} {i}")
    out.append(f"#define HIL_OP_MAX {max(s.code for s in OP_SPECS)}")
    out.append("")
    out.append("#endif /* HIL_ABI_H */")
    return "\n".join(out) + "\n"
