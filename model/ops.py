"""Operations as data: frozen dataclasses with valid-Python reprs, JSON round-trip.

One class per `Op` of spec §2 (EMBEDDING.md) plus the harness-only ops (Nop, Activate,
Probe, RaiseFault). Ids are the store's ids (per-kind counters starting at 1, never
reused within one boot); `0` never names a live object.

Also the result shape every op returns (`OpResult`), and the error / panic codes the guest
and the model agree on. `hil/abi.py` generates the guest's C header from these, so this
module is the single source of the codes.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from model.types import PageProperty, PropTransform


class Status(enum.IntEnum):
    """Response status word."""

    NONE = 0  # nothing published yet
    READY = 1  # guest booted and waits for its first request
    OK = 2
    ERR = 3  # rejected or failed: `code` is an ErrorCode, state unchanged
    PANIC = 4  # an OSTD panic condition (§5.14): `code` is a PanicCode; reboot follows
    EXCEPTION = 5  # an unexpected CPU exception inside the op; reboot follows


class ErrorCode(enum.IntEnum):
    """Why an op returned ERR. Exec errors (§5.10, §5.14) and request validation alike:
    every ERR leaves every byte of state as it was."""

    UNKNOWN_OP = 1
    BAD_ID = 2  # dead or never-issued id of the needed kind
    WRONG_KIND = 3  # map / unmap / protect_next on a read-only Cursor
    NOT_ALIGNED = 4  # get_slot: paddr % 4096 != 0
    OUT_OF_BOUND = 5  # get_slot: paddr beyond the metadata region / MAX_PADDR
    ACCESS_DENIED = 6  # VmSpace::cursor[_mut] on an invalid / unaligned / empty range
    INVALID_VADDR = 7  # query above the barrier, jump outside it
    UNUSED = 8  # from_in_use on an UNUSED slot
    UNIQUE = 9  # slot held by a UniqueFrame
    BUSY = 10  # slot rc == 0 (under construction)
    IN_USE = 11  # from_unused on a slot in use
    CURSOR_BUSY = 12  # a second live cursor on one VmSpace (exec would deadlock)
    VM_SPACE_BUSY = 13  # drop of a VmSpace that a live cursor still borrows
    NO_SPACE = 14  # the guest's handle registry is full
    BAD_ARG = 15  # malformed argument (unknown prop bits, R missing, bad segment offset)
    NOT_UFRAME = 16  # map of a frame handle that is not a UFrame (exec's types cannot express it)


class PanicCode(enum.IntEnum):
    """OSTD panic conditions (§5.14). The guest stops the op where exec would panic."""

    FIND_NEXT_LEN_UNALIGNED = 1  # find_next / unmap / protect_next: len % 4096 != 0
    FIND_NEXT_PAST_BARRIER = 2  # ... : va + len > barrier_va.end
    JUMP_UNALIGNED = 3  # jump: va % 4096 != 0
    MAP_OUT_OF_RANGE = 4  # map: va >= barrier end or va + 4096 > barrier end
    OUT_OF_MEMORY = 5  # no UNUSED slot left for a page-table node
    REF_COUNT_OVERFLOW = 6  # clone / from_in_use with previous rc >= REF_COUNT_MAX
    UNSUPPORTED_CACHE = 7  # set_prop with WriteCombining / WriteProtected
    KERNEL_ROOT_ENTRY = 8  # VmSpace::new: kernel root entry 256..511 absent or a leaf
    GUEST_ASSERT = 9  # a guest-internal consistency check failed (a guest bug)
    MAP_ALREADY_MAPPED = 10  # upstream exec only: map over a mapped page (U:mm/page_table/cursor/mod.rs:469)


@dataclass(frozen=True)
class OpResult:
    """What an op returned: status, code, and named result words (per op, see RESULTS)."""

    status: Status
    code: int = 0
    values: tuple[tuple[str, int], ...] = ()

    def get(self, name: str, default: int = 0) -> int:
        for key, value in self.values:
            if key == name:
                return value
        return default

    @classmethod
    def ok(cls, **values: int) -> OpResult:
        return cls(Status.OK, 0, tuple(values.items()))

    @classmethod
    def err(cls, code: ErrorCode) -> OpResult:
        return cls(Status.ERR, int(code))

    @classmethod
    def panic(cls, code: PanicCode) -> OpResult:
        return cls(Status.PANIC, int(code))

    def __repr__(self) -> str:
        if self.status == Status.ERR:
            return f"OpResult.err(ErrorCode.{ErrorCode(self.code).name})"
        if self.status == Status.PANIC:
            return f"OpResult.panic(PanicCode.{PanicCode(self.code).name})"
        if self.status == Status.OK:
            inner = ", ".join(f"{k}={v:#x}" for k, v in self.values)
            return f"OpResult.ok({inner})"
        return f"OpResult(Status.{self.status.name}, {self.code}, {self.values!r})"

    def to_json(self) -> dict[str, Any]:
        # pairs, not an object: traces are written with sorted keys and the word order matters
        return {"status": self.status.name, "code": self.code, "values": [[k, v] for k, v in self.values]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OpResult:
        try:
            values = tuple((str(k), int(v)) for k, v in data["values"])
            return cls(Status[data["status"]], int(data["code"]), values)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad result record {data!r}") from exc


def _hex(value: int) -> str:
    return f"{value:#x}"


@dataclass(frozen=True)
class Op:
    """Base of every op. `NAME` is the mailbox op name; `RESULTS` the result words on OK."""

    NAME: ClassVar[str] = ""
    RESULTS: ClassVar[tuple[str, ...]] = ()
    # argument fields printed in hex (addresses, lengths)
    HEX: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            text = _hex(value) if f.name in self.HEX and isinstance(value, int) else repr(value)
            parts.append(f"{f.name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": type(self).__name__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (PageProperty, PropTransform)):
                out[f.name] = value.to_json()
            elif isinstance(value, bool):
                out[f.name] = value
            else:
                out[f.name] = int(value)
        return out

    @staticmethod
    def from_json(data: dict[str, Any]) -> Op:
        """Rebuild an op; any malformed input raises ValueError with the reason."""
        if not isinstance(data, dict) or "op" not in data:
            raise ValueError(f"not an op record: {data!r}")
        cls = OP_CLASSES.get(data["op"])
        if cls is None:
            raise ValueError(f"unknown op {data['op']!r}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                raise ValueError(f"{data['op']}: missing field {f.name!r}")
            raw = data[f.name]
            if f.type in ("PageProperty", PageProperty):
                kwargs[f.name] = PageProperty.from_json(raw)
            elif f.type in ("PropTransform", PropTransform):
                kwargs[f.name] = PropTransform.from_json(raw)
            elif f.type in ("bool", bool):
                if not isinstance(raw, bool):
                    raise ValueError(f"{data['op']}.{f.name}: expected bool, got {raw!r}")
                kwargs[f.name] = raw
            else:
                if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0 or raw >= 1 << 64:
                    raise ValueError(f"{data['op']}.{f.name}: expected u64, got {raw!r}")
                kwargs[f.name] = raw
        extra = set(data) - {"op"} - {f.name for f in dataclasses.fields(cls)}
        if extra:
            raise ValueError(f"{data['op']}: unknown fields {sorted(extra)}")
        return cls(**kwargs)


# --- harness-only ops ------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Nop(Op):
    NAME = "nop"
    RESULTS = ("value",)
    HEX = ("value",)
    value: int = 0


@dataclass(frozen=True, repr=False)
class Activate(Op):
    """Load a VmSpace's root into CR3 (vs 0: the kernel root). Not a spec op."""

    NAME = "activate"
    vs: int = 0


@dataclass(frozen=True, repr=False)
class Probe(Op):
    """Touch `va` from the guest with the active root: read, or write `value`."""

    NAME = "probe"
    RESULTS = ("faulted", "value", "error_code", "cr2")
    HEX = ("va", "value")
    va: int = 0
    write: bool = False
    value: int = 0


@dataclass(frozen=True, repr=False)
class RaiseFault(Op):
    """Fault on purpose (test op): 0 ud2, 1 non-canonical read, 2 unmapped read, 3 #DE."""

    NAME = "raise_fault"
    kind: int = 0


# --- VmSpace / cursor ops (spec §2, §5) -------------------------------------------------


@dataclass(frozen=True, repr=False)
class NewVmSpace(Op):
    NAME = "vm_space_new"
    RESULTS = ("vs", "root")


@dataclass(frozen=True, repr=False)
class DropVmSpace(Op):
    NAME = "vm_space_drop"
    vs: int = 0


@dataclass(frozen=True, repr=False)
class OpenCursor(Op):
    NAME = "cursor"
    RESULTS = ("cursor",)
    HEX = ("start", "end")
    vs: int = 0
    start: int = 0
    end: int = 0


@dataclass(frozen=True, repr=False)
class OpenCursorMut(Op):
    NAME = "cursor_mut"
    RESULTS = ("cursor",)
    HEX = ("start", "end")
    vs: int = 0
    start: int = 0
    end: int = 0


@dataclass(frozen=True, repr=False)
class DropCursor(Op):
    NAME = "cursor_drop"
    cursor: int = 0


@dataclass(frozen=True, repr=False)
class Query(Op):
    """present 0: no item (range = the whole slot where the walk stopped)."""

    NAME = "query"
    RESULTS = ("present", "start", "end", "paddr", "prop", "frame")
    cursor: int = 0


@dataclass(frozen=True, repr=False)
class FindNext(Op):
    NAME = "find_next"
    RESULTS = ("found", "va")
    HEX = ("len",)
    cursor: int = 0
    len: int = 0


@dataclass(frozen=True, repr=False)
class Jump(Op):
    NAME = "jump"
    HEX = ("va",)
    cursor: int = 0
    va: int = 0


@dataclass(frozen=True, repr=False)
class VirtAddr(Op):
    NAME = "virt_addr"
    RESULTS = ("va",)
    cursor: int = 0


@dataclass(frozen=True, repr=False)
class Map(Op):
    """replaced 1: an existing leaf was replaced and its frame released (old_paddr)."""

    NAME = "map"
    RESULTS = ("replaced", "old_paddr")
    cursor: int = 0
    frame: int = 0
    prop: PageProperty = field(default_factory=PageProperty.rw_user)


@dataclass(frozen=True, repr=False)
class Unmap(Op):
    NAME = "unmap"
    RESULTS = ("num",)
    HEX = ("len",)
    cursor: int = 0
    len: int = 0


@dataclass(frozen=True, repr=False)
class ProtectNext(Op):
    NAME = "protect_next"
    RESULTS = ("found", "start", "end")
    HEX = ("len",)
    cursor: int = 0
    len: int = 0
    transform: PropTransform = field(default_factory=PropTransform)


# --- frames, segments, unique frames (spec §2, §5.10) -----------------------------------


@dataclass(frozen=True, repr=False)
class FrameFromUnused(Op):
    NAME = "frame_from_unused"
    RESULTS = ("frame",)
    HEX = ("paddr",)
    paddr: int = 0


@dataclass(frozen=True, repr=False)
class FrameFromInUse(Op):
    NAME = "frame_from_in_use"
    RESULTS = ("frame",)
    HEX = ("paddr",)
    paddr: int = 0


@dataclass(frozen=True, repr=False)
class FrameDrop(Op):
    NAME = "frame_drop"
    frame: int = 0


@dataclass(frozen=True, repr=False)
class SegmentFromUnused(Op):
    NAME = "segment_from_unused"
    RESULTS = ("segment",)
    HEX = ("start", "end")
    start: int = 0
    end: int = 0


@dataclass(frozen=True, repr=False)
class SegmentDrop(Op):
    NAME = "segment_drop"
    segment: int = 0


@dataclass(frozen=True, repr=False)
class SegmentSplit(Op):
    """Consumes `segment`; two fresh ids for [start, start+offset) and [start+offset, end)."""

    NAME = "segment_split"
    RESULTS = ("left", "right")
    HEX = ("offset",)
    segment: int = 0
    offset: int = 0


@dataclass(frozen=True, repr=False)
class SegmentNext(Op):
    """Pop the first page as a Frame handle (rc unchanged); the id dies when empty."""

    NAME = "segment_next"
    RESULTS = ("frame",)
    segment: int = 0


@dataclass(frozen=True, repr=False)
class SegmentClone(Op):
    NAME = "segment_clone"
    RESULTS = ("segment",)
    segment: int = 0


@dataclass(frozen=True, repr=False)
class SegmentSlice(Op):
    """New segment over byte offsets [start, end) of `segment` (rc +1 on each page)."""

    NAME = "segment_slice"
    RESULTS = ("segment",)
    HEX = ("start", "end")
    segment: int = 0
    start: int = 0
    end: int = 0


@dataclass(frozen=True, repr=False)
class UniqueFromUnused(Op):
    NAME = "unique_from_unused"
    RESULTS = ("unique",)
    HEX = ("paddr",)
    paddr: int = 0


@dataclass(frozen=True, repr=False)
class UniqueDrop(Op):
    NAME = "unique_drop"
    unique: int = 0


@dataclass(frozen=True, repr=False)
class FromUnique(Op):
    NAME = "from_unique"
    RESULTS = ("frame",)
    unique: int = 0


@dataclass(frozen=True, repr=False)
class TryFromShared(Op):
    """ok 1: rc was 1, the frame id died and `unique` names the UniqueFrame."""

    NAME = "try_from_shared"
    RESULTS = ("ok", "unique")
    frame: int = 0


OP_CLASSES: dict[str, type[Op]] = {
    cls.__name__: cls
    for cls in (
        Nop, Activate, Probe, RaiseFault,
        NewVmSpace, DropVmSpace, OpenCursor, OpenCursorMut, DropCursor,
        Query, FindNext, Jump, VirtAddr, Map, Unmap, ProtectNext,
        FrameFromUnused, FrameFromInUse, FrameDrop,
        SegmentFromUnused, SegmentDrop, SegmentSplit, SegmentNext, SegmentClone, SegmentSlice,
        UniqueFromUnused, UniqueDrop, FromUnique, TryFromShared,
    )
}  # fmt: skip

# Spec ops (§2) only, without the harness-only ones.
SPEC_OPS: tuple[type[Op], ...] = tuple(
    cls for cls in OP_CLASSES.values() if cls not in (Nop, Activate, Probe, RaiseFault)
)


def dumps(op: Op) -> str:
    return json.dumps(op.to_json(), sort_keys=True)


def loads(text: str) -> Op:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    return Op.from_json(data)
