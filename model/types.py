"""Constants, PageProperty and the x86-64 PTE encoding of OSTD (spec §4, §5.1, §5.12).

This is the *exec* encoder/decoder (what OSTD's `new_page` / `set_prop` / `prop()` do).
The harness's page-table walker decodes PTEs on its own (from the Intel manual), so a
mistake here is caught by the walker and vice versa.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

PAGE_SIZE = 4096
NR_LEVELS = 4
NR_ENTRIES = 512
PTE_SIZE = 8
HIGHEST_TRANSLATION_LEVEL = 2
META_SLOT_SIZE = 64

REF_COUNT_UNUSED = (1 << 64) - 1
REF_COUNT_UNIQUE = (1 << 64) - 2
REF_COUNT_MAX = (1 << 63) - 1

MAX_PADDR = 0x8000_0000
MAX_USERSPACE_VADDR = 0x8000_0000_0000 - PAGE_SIZE
USER_VA_END = 1 << 47  # UserPtConfig manages [0, 2^47)
FRAME_METADATA_BASE_VADDR = 0xFFFF_E000_0000_0000
LINEAR_MAPPING_BASE_VADDR = 0xFFFF_8000_0000_0000
TOP_LEVEL_USER_ENTRIES = range(0, 256)  # UserPtConfig::TOP_LEVEL_INDEX_RANGE
TOP_LEVEL_KERNEL_ENTRIES = range(256, 512)

# TLB flusher thresholds (§5.13)
FLUSH_ALL_OPS_THRESHOLD = 32
FLUSH_ALL_RANGE_THRESHOLD = 32 * PAGE_SIZE


def page_size(level: int) -> int:
    """page_size(L) = 4096 * 512^(L-1) (L5 is 2^48: the whole address space)."""
    return PAGE_SIZE << (9 * (level - 1))


def pte_index(va: int, level: int) -> int:
    return (va >> (12 + 9 * (level - 1))) & (NR_ENTRIES - 1)


def align_down(value: int, align: int) -> int:
    return value & ~(align - 1)


def valid_frame_paddr(paddr: int) -> bool:
    return paddr % PAGE_SIZE == 0 and paddr < MAX_PADDR


def frame_to_index(paddr: int) -> int:
    return paddr // PAGE_SIZE


def index_to_frame(index: int) -> int:
    return index * PAGE_SIZE


def index_to_meta(index: int) -> int:
    """The slot's own (conceptual) address: `slot_vaddr` / `va` of the spec."""
    return FRAME_METADATA_BASE_VADDR + META_SLOT_SIZE * index


class Usage(enum.IntEnum):
    """Ghost PageUsage (§1.2). The guest stores it as the type tag in the vtable word (offset
    48) while the slot is in use; the ghost value of a freed slot persists (model-side)."""

    UNUSED = 0
    RESERVED = 1
    FRAME = 2
    PAGE_TABLE = 3
    META = 4
    KERNEL = 5
    MMIO = 6


class StorageTag(enum.IntEnum):
    """Storage byte 0 of a slot (vostd's MetaSlotStorage variants)."""

    EMPTY = 0
    UNTYPED = 1
    FRAME_LINK = 2
    PT_NODE = 3


class CachePolicy(enum.IntEnum):
    UNCACHEABLE = 0
    WRITE_COMBINING = 1
    WRITE_PROTECTED = 2
    WRITETHROUGH = 3
    WRITEBACK = 4


class PageFlags(enum.IntFlag):
    R = 0x01
    W = 0x02
    X = 0x04
    ACCESSED = 0x08
    DIRTY = 0x10
    AVAIL1 = 0x40
    AVAIL2 = 0x80


PAGE_FLAGS_ALL = 0xDF  # every defined PageFlags bit (0x20 is unused)


class PrivFlags(enum.IntFlag):
    USER = 0x01
    GLOBAL = 0x02


PRIV_FLAGS_ALL = 0x03


@dataclass(frozen=True)
class PageProperty:
    flags: int = int(PageFlags.R)
    cache: CachePolicy = CachePolicy.WRITEBACK
    priv: int = int(PrivFlags.USER)

    @classmethod
    def rw_user(cls) -> PageProperty:
        return cls(int(PageFlags.R | PageFlags.W), CachePolicy.WRITEBACK, int(PrivFlags.USER))

    def inv(self) -> bool:
        """PageProperty::inv: no unknown bits."""
        return self.flags & ~PAGE_FLAGS_ALL == 0 and self.priv & ~PRIV_FLAGS_ALL == 0

    def encode(self) -> int:
        """Mailbox word: flags bits 0-7, cache bits 8-15, priv bits 16-23."""
        return (self.flags & 0xFF) | (int(self.cache) << 8) | ((self.priv & 0xFF) << 16)

    @classmethod
    def decode(cls, word: int) -> PageProperty:
        cache = (word >> 8) & 0xFF
        if cache not in CachePolicy._value2member_map_:
            raise ValueError(f"unknown cache policy {cache}")
        return cls(word & 0xFF, CachePolicy(cache), (word >> 16) & 0xFF)

    def __repr__(self) -> str:
        cache = f"CachePolicy.{self.cache.name}"
        return f"PageProperty(flags={self.flags:#x}, cache={cache}, priv={self.priv:#x})"

    def to_json(self) -> dict[str, Any]:
        return {"flags": self.flags, "cache": self.cache.name, "priv": self.priv}

    @classmethod
    def from_json(cls, data: Any) -> PageProperty:
        try:
            return cls(int(data["flags"]), CachePolicy[data["cache"]], int(data["priv"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad PageProperty {data!r}") from exc


KEEP_CACHE = 0xFF


@dataclass(frozen=True)
class PropTransform:
    """The `op` closure of protect_next as data: new.flags = (old.flags & ~clear) | set,
    same for priv; cache replaced unless KEEP_CACHE."""

    set_flags: int = 0
    clear_flags: int = 0
    cache: int = KEEP_CACHE
    set_priv: int = 0
    clear_priv: int = 0

    def apply(self, old: PageProperty) -> PageProperty:
        flags = (old.flags & ~self.clear_flags & 0xFF) | self.set_flags
        priv = (old.priv & ~self.clear_priv & 0xFF) | self.set_priv
        cache = old.cache if self.cache == KEEP_CACHE else CachePolicy(self.cache)
        return PageProperty(flags, cache, priv)

    def valid(self) -> bool:
        """Requests the guest accepts: known bits, known cache, and R never cleared (exec
        requires `op` to keep the R bit, spec §5.9)."""
        return (
            (self.set_flags | self.clear_flags) & ~PAGE_FLAGS_ALL == 0
            and (self.set_priv | self.clear_priv) & ~PRIV_FLAGS_ALL == 0
            and not self.clear_flags & PageFlags.R
            and (self.cache == KEEP_CACHE or self.cache in CachePolicy._value2member_map_)
        )

    def encode(self) -> int:
        """Mailbox word: set 0-7, clear 8-15, cache 16-23, set_priv 24-31, clear_priv 32-39."""
        return (
            (self.set_flags & 0xFF)
            | (self.clear_flags & 0xFF) << 8
            | (self.cache & 0xFF) << 16
            | (self.set_priv & 0xFF) << 24
            | (self.clear_priv & 0xFF) << 32
        )

    @classmethod
    def decode(cls, word: int) -> PropTransform:
        return cls(
            word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF, (word >> 24) & 0xFF,
            (word >> 32) & 0xFF,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"PropTransform(set_flags={self.set_flags:#x}, clear_flags={self.clear_flags:#x}, "
            f"cache={self.cache:#x}, set_priv={self.set_priv:#x}, clear_priv={self.clear_priv:#x})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "set_flags": self.set_flags, "clear_flags": self.clear_flags, "cache": self.cache,
            "set_priv": self.set_priv, "clear_priv": self.clear_priv,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> PropTransform:
        try:
            keys = ("set_flags", "clear_flags", "cache", "set_priv", "clear_priv")
            return cls(**{k: int(data[k]) for k in keys})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad PropTransform {data!r}") from exc


# --- x86-64 PTE bits as OSTD's PageTableFlags names them (§5.12) -----------------------

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_HUGE = 1 << 7  # PS at L2/L3, PAT at L1; OSTD sets it on every leaf
PTE_G = 1 << 8
PTE_HIGH_IGN1 = 1 << 52
PTE_HIGH_IGN2 = 1 << 53
PTE_NX = 1 << 63
# what pte_is_present tests (either bit: OSTD sets PS on every leaf); the hot loops that inline
# it (PageTableNode.present, the model's skip of absent entries) use this mask too
PTE_PRESENT_BITS = PTE_P | PTE_HUGE
PHYS_ADDR_MASK = 0x000F_FFFF_FFFF_F000
PROP_MASK = ~PHYS_ADDR_MASK & ~PTE_HUGE & ((1 << 64) - 1)
PTE_AD_MASK = PTE_A | PTE_D  # hardware-set bits the checker masks


class UnsupportedCache(Exception):
    """set_prop with WriteCombining / WriteProtected: exec panics."""


def pte_new_absent() -> int:
    return 0


def pte_new_pt(paddr: int) -> int:
    return (paddr & PHYS_ADDR_MASK) | PTE_P | PTE_RW | PTE_US


def pte_prop_bits(prop: PageProperty) -> int:
    bits = 0
    if prop.flags & PageFlags.R:
        bits |= PTE_P
    if prop.flags & PageFlags.W:
        bits |= PTE_RW
    if not prop.flags & PageFlags.X:
        bits |= PTE_NX
    if prop.flags & PageFlags.ACCESSED:
        bits |= PTE_A
    if prop.flags & PageFlags.DIRTY:
        bits |= PTE_D
    if prop.flags & PageFlags.AVAIL1:
        bits |= PTE_HIGH_IGN1
    if prop.flags & PageFlags.AVAIL2:
        bits |= PTE_HIGH_IGN2
    if prop.priv & PrivFlags.USER:
        bits |= PTE_US
    if prop.priv & PrivFlags.GLOBAL:
        bits |= PTE_G
    if prop.cache == CachePolicy.WRITETHROUGH:
        bits |= PTE_PWT
    elif prop.cache == CachePolicy.UNCACHEABLE:
        bits |= PTE_PCD
    elif prop.cache != CachePolicy.WRITEBACK:
        raise UnsupportedCache(prop.cache.name)
    return bits


def pte_set_prop(raw: int, prop: PageProperty) -> int:
    if not pte_is_present(raw):
        return raw
    return (raw & ~PROP_MASK) | pte_prop_bits(prop)


def pte_new_page(paddr: int, prop: PageProperty) -> int:
    return pte_set_prop((paddr & PHYS_ADDR_MASK) | PTE_HUGE, prop)


def pte_is_present(raw: int) -> bool:
    return bool(raw & PTE_PRESENT_BITS)


def pte_is_last(raw: int) -> bool:
    return bool(raw & PTE_HUGE)


def pte_paddr(raw: int) -> int:
    return raw & PHYS_ADDR_MASK


def pte_prop(raw: int) -> PageProperty:
    flags = 0
    if raw & PTE_P:
        flags |= PageFlags.R
    if raw & PTE_RW:
        flags |= PageFlags.W
    if not raw & PTE_NX:
        flags |= PageFlags.X
    if raw & PTE_A:
        flags |= PageFlags.ACCESSED
    if raw & PTE_D:
        flags |= PageFlags.DIRTY
    if raw & PTE_HIGH_IGN1:
        flags |= PageFlags.AVAIL1
    if raw & PTE_HIGH_IGN2:
        flags |= PageFlags.AVAIL2
    priv = 0
    if raw & PTE_US:
        priv |= PrivFlags.USER
    if raw & PTE_G:
        priv |= PrivFlags.GLOBAL
    if raw & PTE_PCD:
        cache = CachePolicy.UNCACHEABLE
    elif raw & PTE_PWT:
        cache = CachePolicy.WRITETHROUGH
    else:
        cache = CachePolicy.WRITEBACK
    return PageProperty(int(flags), cache, int(priv))
