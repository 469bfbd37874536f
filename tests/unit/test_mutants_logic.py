"""scripts/mutants below the wire: a hunt that loses its machine (the guest triple-faulted,
QEMU died) is a miss with the reason in the table, and the other hunts go on."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.errors import InfraError
from hil.workflows import mutants


class DeadMachine:
    def __init__(self, image: Path):
        self.layout = self.memory = self.machine = None

    def boot(self) -> None:
        raise InfraError("QEMU exited with status 0 (injected)")

    def close(self) -> None:
        pass


def test_an_infrastructure_error_is_a_miss_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mutants, "Session", DeadMachine)
    h, _ = mutants.hunt(Path("kernel.elf"), 5, 1, 10)
    assert not h.caught and "injected" in h.error
    assert "NO (infra error)" in mutants.table([h], [1])
    clean, _ = mutants.hunt(Path("kernel.elf"), 0, 1, 10)
    assert "INFRA ERROR" in mutants.table([clean], [1])  # the unmodified guest is not "clean" then
