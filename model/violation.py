"""One failed clause instance: what the predicates (axioms, invariants) report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Violation:
    clause: str  # e.g. "MAP-2", "A3", "S1/R2", "S1/M1"
    slot: int | None  # slot index, or None for a store-level field
    field: str  # "rc", "paths", "frames", "cursor 3", ...
    before: object
    after: object
    message: str
    digest_only: bool = False  # a clause of the digest that the seed text does not have

    def __str__(self) -> str:
        where = f"slot {self.slot}" if self.slot is not None else "store"
        return f"{self.clause} {where} {self.field}: {self.before!r} -> {self.after!r}: {self.message}"
