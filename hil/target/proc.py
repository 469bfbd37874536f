"""Ending the processes the harness starts: by PID, politely first, then SIGKILL, always reaped
(this container's init does not reap orphans, NOTES "Processes")."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator

from hil.errors import timeout_scale

PR_SET_PDEATHSIG = 1


INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


def die_with_parent() -> None:
    """preexec_fn for the processes we start: the kernel sends them SIGKILL when the harness
    dies, even by SIGKILL, so no QEMU or gdb outlives the run that started it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)  # held by signals_held() in the parent


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT / SIGTERM while a child is forked: Python runs at-fork hooks there and
    ignores (prints) any exception raised in them, so a Ctrl-C landing in one would be lost.
    Held, it arrives right after, where the harness acts on it."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_deferring = 0  # nesting depth of interrupts_deferred()


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A part that must not be cut by Ctrl-C / SIGTERM (an op's trace line and its counts):
    `hil run`'s handler only notes a signal that lands here (`deferring`), and acts on it at its
    next check between ops. Signals are also held for this thread (a handler that raises at
    once, in a process with no other thread, then raises after the part)."""
    global _deferring
    _deferring += 1
    try:
        with signals_held():
            yield
    finally:
        _deferring -= 1


def deferring() -> bool:
    return _deferring > 0


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
