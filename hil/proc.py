"""Ending the processes the harness starts: by PID, politely first, then SIGKILL, always reaped
(this container's init does not reap orphans, NOTES "Processes")."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable

from hil.errors import timeout_scale


def end_process(proc: subprocess.Popen[bytes], grace_s: float, ask: Callable[[], None]) -> None:
    """`ask` asks the process to exit (a signal, a quit command); after `grace_s` it is killed."""
    try:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                ask()
            try:
                proc.wait(timeout=grace_s * timeout_scale())
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    finally:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(proc.pid, os.WNOHANG)
