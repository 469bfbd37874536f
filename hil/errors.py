"""Errors of the harness. Infrastructure trouble is never a finding (ARCHITECTURE "Errors")."""

from __future__ import annotations

import os
import time


def timeout_scale() -> float:
    """Every deadline is multiplied by HIL_TIMEOUT_SCALE (slow CI machines, valgrind...) and by
    the machine's load per CPU when it is above 1 (three test suites on two cores): a deadline
    only ever grows with load, so a busy machine is never mistaken for a hung guest."""
    return env_timeout_scale() * load_factor()


def env_timeout_scale() -> float:
    """HIL_TIMEOUT_SCALE alone (what a child process should be given: it adds the load itself)."""
    try:
        value = float(os.environ.get("HIL_TIMEOUT_SCALE", "1"))
    except ValueError:
        return 1.0
    return value if value > 0 else 1.0


_LOAD_TTL_S = 1.0  # the kernel updates the load average every 5 s; the drive asks every op
_load_cache: tuple[float, float] = (-_LOAD_TTL_S, 1.0)  # (monotonic time read, factor)


def load_factor() -> float:
    """max(1, 1-minute load average / CPUs); 1 where the load is unknown."""
    global _load_cache
    now = time.monotonic()
    if now - _load_cache[0] < _LOAD_TTL_S:
        return _load_cache[1]
    try:
        factor = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        factor = 1.0
    _load_cache = (now, factor)
    return factor


class HilError(Exception):
    """Base of the harness's own errors."""


class InfraError(HilError):
    """QEMU did not boot, gdb died, a stop did not come before its deadline...

    Carries the QEMU command line and the tails of its logs so the one paragraph printed for
    the user is enough to act on."""

    def __init__(self, what: str, *, argv: list[str] | None = None, logs: dict[str, str] | None = None):
        self.what = what
        self.argv = argv or []
        self.logs = logs or {}
        super().__init__(self.describe())

    def describe(self) -> str:
        parts = [self.what]
        if self.argv:
            parts.append("QEMU command line: " + " ".join(self.argv))
        for name, tail in self.logs.items():
            if tail.strip():
                parts.append(f"--- tail of {name} ---\n{tail.rstrip()}")
        return "\n".join(parts)


class InfraTimeout(InfraError):
    """A deadline passed (a stop, a reply, a socket). Its own type, so that "gdb exited" or
    "QEMU was killed" is never relabelled as "did not stop within"."""


class TraceWriteError(InfraError):
    """The trace could not be written (full disk, I/O error): the run ends, exit 2, and what
    was written before stays readable."""


class ConfigError(HilError):
    """Bad input from the user: unknown profile key, missing image, bad trace..."""


class AbiError(HilError):
    """The guest image does not speak our ABI (missing symbol, wrong version or magic)."""
