"""The seeded-bug build flag: a separate build with one plausible kernel mistake compiled in
is caught by the checker as an IMPL finding, and the default build is untouched by it.
(The full mutation table is issue 7's; this proves the flag and the pipeline end to end.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hil.check import Kind
from hil.run.runner import Runner
from hil.run.session import Session
from hil.run.workload import Workload

REPO = Path(__file__).resolve().parents[2]


def build(tmp: Path, bug: int) -> Path:
    out = tmp / f"bug{bug}"
    subprocess.run(["make", "-s", "-C", str(REPO / "guest"), f"B={out}", f"SEEDED_BUG={bug}"], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    return out / "kernel.elf"


# bugs 1 and 2 (a forgotten invlpg) leave memory exactly as it should be: only the MMU probes
# of the hardware oracle (issue 7) can see them
CAUGHT_BY_THE_CHECKER = [
    (3, "SLOT", "rc"),  # query forgets the rc bump
    (4, "SLOT", "node"),  # map forgets nr_children += 1
    (5, "SLOT", "rc"),  # frame_drop at rc 1 leaves rc 0
    (6, "SLOT", "paths"),  # protect_next rewrites the paddr bits
    (7, "SLOT", "paths"),  # a new page-table node is not zeroed
    (8, "RESULT", "status"),  # jump accepts va == barrier end
    (9, "SLOT", "rc"),  # unmap of a subtree forgets the frames under it
    (10, "CURSOR", None),  # find_next looks one entry past its end
]


@pytest.mark.parametrize("bug, clause, field", CAUGHT_BY_THE_CHECKER)
def test_seeded_bug_is_caught(tmp_path: Path, bug: int, clause: str, field: str | None) -> None:
    default_elf = REPO / "guest" / "build" / "kernel.elf"
    default_bytes = default_elf.read_bytes()
    session = Session(image=build(tmp_path, bug))
    runner = Runner(session)
    impl = []
    try:
        runner.start()
        assert session.layout is not None and session.layout.seeded_bug == bug
        workload = Workload(1, session.layout)
        for _ in range(1500):
            assert runner.state is not None
            impl = [f for f in runner.step(workload(runner.state)).findings if f.kind == Kind.IMPL]
            if impl:
                break
    finally:
        session.close()
    assert impl, f"seeded bug {bug} went unnoticed"
    assert any(f.clause == clause and field in (None, f.field) for f in impl), [f.describe() for f in impl]
    assert default_elf.read_bytes() == default_bytes, "the seeded build touched the default build"
