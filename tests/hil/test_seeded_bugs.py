"""Every seeded bug is caught: the fast slice of `scripts/mutants` (guest/README.md "Seeded
bugs"). Each bug runs on the seed where `scripts/mutants` catches it first, with an op cap a
little past that op, so a bug the checker stops seeing fails here; the unmodified guest gives
no IMPL / TLB / WALKER finding on the same seeds and lengths. The full table (seeds 1, 2, 3,
up to 2,000 ops each) is `scripts/mutants`' (README "Seeded bugs")."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.workflows import mutants

REPO = Path(__file__).resolve().parents[2]

# bug -> (seed, the op index where scripts/mutants caught it first, the kinds of finding there)
SLICE: dict[int, tuple[int, int, str]] = {
    1: (3, 44, "IMPL + TLB"),
    2: (2, 87, "IMPL + TLB"),  # the re-map also sets U: the SMAP read sees the stale entry
    3: (2, 85, "IMPL"),
    4: (2, 6, "IMPL"),
    5: (1, 8, "IMPL"),
    6: (1, 22, "IMPL"),
    7: (1, 48, "IMPL"),
    8: (1, 3, "IMPL"),
    9: (1, 40, "IMPL"),
    10: (1, 70, "IMPL"),
    11: (3, 4, "IMPL"),
    12: (1, 40, "IMPL + TLB"),
    13: (2, 53, "TLB"),
    14: (2, 87, "IMPL + TLB"),
    15: (3, 91, "IMPL"),
    16: (1, 47, "IMPL"),
    17: (2, 105, "IMPL"),
    18: (1, 92, "IMPL"),
    19: (1, 8, "IMPL"),
    20: (3, 121, "IMPL"),
    21: (2, 47, "IMPL"),
    22: (3, 177, "IMPL"),
    23: (1, 88, "IMPL"),
    24: (3, 117, "IMPL"),
    25: (3, 23, "IMPL"),
    26: (1, 18, "IMPL"),
    27: (2, 20, "IMPL"),
    28: (2, 360, "IMPL"),
    29: (2, 87, "IMPL + TLB"),
}


def cap(first_op: int) -> int:
    return first_op + 1 + max(20, first_op // 4)  # a margin for small workload drifts


def test_the_slice_covers_every_seeded_bug() -> None:
    assert sorted(SLICE) == sorted(mutants.BUGS)
    assert len(SLICE) >= 25


@pytest.mark.parametrize("bug", sorted(SLICE))
def test_seeded_bug_is_caught(bug: int) -> None:
    default_elf = REPO / "guest" / "build" / "kernel.elf"
    default_bytes = default_elf.read_bytes()
    seed, first_op, kind = SLICE[bug]
    h, _ = mutants.hunt(mutants.build(bug), bug, seed, cap(first_op))
    assert h.caught, f"seeded bug {bug} ({mutants.BUGS[bug][0]}) went unnoticed for {h.ops} ops on seed {seed}"
    assert h.kind == kind, (h.first_op, h.kind, h.clause, h.field)
    assert default_elf.read_bytes() == default_bytes, "the seeded build touched the default build"


@pytest.mark.parametrize("seed", sorted({s for s, _, _ in SLICE.values()}))
def test_the_unmodified_guest_gives_no_such_finding_on_the_same_runs(seed: int) -> None:
    longest = max(cap(first) for s, first, _ in SLICE.values() if s == seed)
    h, _ = mutants.hunt(mutants.build(0), 0, seed, longest)
    assert not h.caught, (h.first_op, h.kind, h.clause, h.field)
