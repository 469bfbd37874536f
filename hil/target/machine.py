"""One QEMU process: argv from a qemu/ profile, its sockets, shared RAM file, logs, and its end.

Every path is unique per machine (a run directory under /tmp and a shared RAM file under
/dev/shm, both named after our PID and a random tag), so two runs never talk to each
other's stub (NOTES "Processes"). QEMU is ended by PID and reaped on every exit path, and
its files are removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from hil.errors import ConfigError, InfraError, timeout_scale
from hil.target.proc import die_with_parent, end_process, signals_held

REPO = Path(__file__).resolve().parents[2]
PROFILE_DIR = REPO / "qemu"
DEFAULT_IMAGE = REPO / "guest" / "build" / "kernel.elf"
QEMU_BINARY = "qemu-system-x86_64"
SHM_DIR = Path("/dev/shm")
RUN_PREFIX = "ostd-hil-"


@dataclass(frozen=True)
class Profile:
    name: str
    accel: str = "tcg"
    memory_mib: int = 64
    cpu: str = "qemu64,+nx,+smap"  # +smap: the MMU probes see U (oracles.py)
    extra_args: tuple[str, ...] = ()

    KEYS = ("name", "accel", "memory_mib", "cpu", "extra_args")

    @classmethod
    def load(cls, name_or_path: str) -> Profile:
        path = Path(name_or_path)
        if not path.suffix:
            path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.toml")))
            raise ConfigError(f"no machine profile {name_or_path!r} (known: {known})")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"profile {path}: {exc}") from exc
        unknown = set(data) - set(cls.KEYS)
        if unknown:
            raise ConfigError(f"profile {path}: unknown keys {sorted(unknown)} (allowed: {list(cls.KEYS)})")
        if data.get("accel", "tcg") not in ("tcg", "kvm"):
            raise ConfigError(f"profile {path}: accel must be tcg or kvm")
        mem = data.get("memory_mib", 64)
        if not isinstance(mem, int) or not 16 <= mem <= 3072:
            raise ConfigError(f"profile {path}: memory_mib must be an integer in 16..3072")
        return cls(
            name=str(data.get("name", path.stem)),
            accel=data.get("accel", "tcg"),
            memory_mib=mem,
            cpu=str(data.get("cpu", "qemu64,+nx,+smap")),
            extra_args=tuple(str(a) for a in data.get("extra_args", [])),
        )


def boot_image_for(elf: Path) -> Path:
    """QEMU's multiboot loader refuses 64-bit ELFs (NOTES "Booting"): the guest build puts a
    flat image with the multiboot a.out-kludge header next to the ELF gdb loads."""
    return elf.with_suffix(".bin")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        data = path.read_bytes()[-16384:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Machine:
    """A QEMU process started stopped (-S) with its gdb stub, HMP monitor and shared RAM."""

    profile: Profile
    image: Path = DEFAULT_IMAGE
    shared_ram: bool = True
    # HIL_RUN_TAG groups the machines of one run (a test session, a nightly) for leak census
    tag: str = field(
        default_factory=lambda: f"{os.environ.get('HIL_RUN_TAG', 'r')}-{os.getpid()}-{secrets.token_hex(4)}"
    )
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)
    # stop() moves qemu.log and serial.log here (CI and nightly artifacts) instead of deleting them
    log_dir: Path | None = field(default_factory=lambda: Path(d) if (d := os.environ.get("HIL_LOG_DIR")) else None)
    returncode: int | None = None  # kept after stop(): negative = killed by that signal
    _signalled: bool = False  # we sent QEMU a signal (stop()); any other death is reported as such

    def __post_init__(self) -> None:
        self.run_dir = Path("/tmp") / f"{RUN_PREFIX}{self.tag}"
        self.gdb_socket = self.run_dir / "gdb.sock"
        self.monitor_socket = self.run_dir / "hmp.sock"
        self.serial_log = self.run_dir / "serial.log"
        self.qemu_log = self.run_dir / "qemu.log"
        self.shm_path = SHM_DIR / f"{RUN_PREFIX}{self.tag}.ram"

    @property
    def ram_size(self) -> int:
        return self.profile.memory_mib << 20

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def build_argv(self) -> list[str]:
        boot = boot_image_for(self.image)
        argv = [
            QEMU_BINARY,
            # one vCPU: TCG in the main loop thread, no hand-off between QEMU's threads on every
            # stop and resume (a bare continue->stop ~0.15 ms instead of ~0.35 ms, issue 15)
            "-accel", "tcg,thread=single" if self.profile.accel == "tcg" else self.profile.accel,
            "-cpu", self.profile.cpu,
            "-m", f"{self.profile.memory_mib}M",
            "-nodefaults", "-display", "none", "-vga", "none",
            "-no-reboot",
            "-serial", f"file:{self.serial_log}",
            "-chardev", f"socket,id=hmp,path={self.monitor_socket},server=on,wait=off",
            "-mon", "chardev=hmp,mode=readline",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-gdb", f"unix:{self.gdb_socket},server=on,wait=off",
            "-S",
            "-kernel", str(boot),
        ]  # fmt: skip
        if self.shared_ram:
            size = f"{self.profile.memory_mib}M"
            argv += [
                "-object", f"memory-backend-file,id=ram0,size={size},mem-path={self.shm_path},share=on",
                "-machine", "memory-backend=ram0",
            ]  # fmt: skip
        argv += list(self.profile.extra_args)
        return argv

    def logs(self) -> dict[str, str]:
        return {"QEMU stderr": _tail(self.qemu_log), "serial log": _tail(self.serial_log)}

    def fate(self) -> str:
        """How QEMU ended, if it did: "QEMU was killed by signal 9 (not sent by the harness)"."""
        rc = self.returncode
        if self.proc is not None:
            # a lost connection is often seen a moment before QEMU's exit can be reaped
            try:
                rc = self.proc.wait(timeout=0.2 * timeout_scale())
            except subprocess.TimeoutExpired:
                return ""
        if rc is None:
            return ""
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            by = "sent by the harness" if self._signalled else "not sent by the harness"
            return f"QEMU was killed by {name} ({by})"
        if rc == 0 and not self._signalled:
            return "QEMU exited with status 0 (under -no-reboot, a guest triple fault or reset ends QEMU)"
        return f"QEMU exited with status {rc}"

    def infra(self, what: str, kind: type[InfraError] = InfraError) -> InfraError:
        fate = self.fate()
        if fate and fate not in what:
            what = f"{what}; {fate}"
        return kind(what, argv=self.argv, logs=self.logs())

    def start(self, deadline_s: float = 10.0) -> None:
        if self.proc is not None:
            raise InfraError(f"machine {self.tag} is already running (QEMU PID {self.proc.pid}); stop() it first")
        boot = boot_image_for(self.image)
        for needed in (self.image, boot):
            if not needed.is_file():
                raise ConfigError(f"guest image {needed} not found (build it: make -C guest)")
        if shutil.which(QEMU_BINARY) is None:
            raise InfraError(f"{QEMU_BINARY} not found on PATH (scripts/setup installs it)")
        sweep_stale_files()
        self.argv = self.build_argv()
        try:
            self.run_dir.mkdir(mode=0o700)
        except OSError as exc:
            # our names are unique per process and tag: an existing one is another run's
            raise InfraError(f"cannot create the run directory {self.run_dir}: {exc}", argv=self.argv) from exc
        self.returncode, self._signalled = None, False
        try:
            with open(self.qemu_log, "wb") as log, signals_held():
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C to the harness must not kill QEMU under us
                    preexec_fn=die_with_parent,
                )  # fmt: skip
        except OSError as exc:
            self.stop()
            raise InfraError(f"cannot start {QEMU_BINARY}: {exc}", argv=self.argv) from exc
        try:
            waits = [self.gdb_socket, self.monitor_socket] + ([self.shm_path] if self.shared_ram else [])
            self._wait_for(waits, deadline_s * timeout_scale())
        except BaseException:
            self.stop()
            raise

    def _wait_for(self, paths: list[Path], seconds: float) -> None:
        """Sockets and the shared RAM file appear shortly after QEMU starts (NOTES)."""
        end = time.monotonic() + seconds
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise self.infra("QEMU ended during start-up")
            missing = [p for p in paths if not p.exists()]
            if not missing:
                return
            if time.monotonic() > end:
                raise self.infra(f"QEMU did not create {', '.join(map(str, missing))} within {seconds:.1f} s")
            time.sleep(0.005)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 2.0) -> None:
        """End QEMU by PID (TERM, then KILL), reap it, remove its files. Safe to call twice."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None:
                if proc.poll() is None:
                    self._signalled = True
                end_process(proc, grace_s, lambda: os.kill(proc.pid, signal.SIGTERM))
                self.returncode = proc.returncode
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.shm_path.unlink()
            self._keep_logs()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _keep_logs(self) -> None:
        if self.log_dir is None:
            return
        with contextlib.suppress(OSError):
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for log in (self.qemu_log, self.serial_log):
                if log.exists():
                    shutil.move(str(log), str(self.log_dir / f"{self.tag}-{log.name}"))

    def __enter__(self) -> Machine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- HMP monitor (its own unix socket: ~4 ms per command, NOTES "Monitor") ---------
    def hmp(self, command: str, deadline_s: float = 10.0) -> str:
        """Run one human-monitor command and return its output (without echo and prompt)."""
        end = time.monotonic() + deadline_s * timeout_scale()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(deadline_s * timeout_scale())
            try:
                sock.connect(str(self.monitor_socket))
                self._read_until_prompt(sock, end)
                sock.sendall(command.encode() + b"\n")
                raw = self._read_until_prompt(sock, end)
            except OSError as exc:
                raise self.infra(f"HMP command {command!r} failed: {exc}") from exc
        return _clean_hmp(raw, command)

    def _read_until_prompt(self, sock: socket.socket, end: float) -> bytes:
        buf = b""
        while not buf.endswith(b"(qemu) "):
            if time.monotonic() > end:
                raise self.infra("HMP monitor did not answer before its deadline")
            chunk = sock.recv(65536)
            if not chunk:
                raise self.infra("HMP monitor closed the connection")
            buf += chunk
        return buf


# an ESC sequence as HMP's readline echo writes it: CSI (ESC [ params letter) or ESC + one char
_HMP_ESCAPE = re.compile(r"\x1b(?:\[[^A-Za-z]*[A-Za-z]?|[\s\S])?|\r")


def _clean_hmp(raw: bytes, command: str) -> str:
    # one regex pass: `info tlb` of a 10,000-mapping table is ~1 MB, a per-character loop cost ~30 ms
    text = _HMP_ESCAPE.sub("", raw.decode("utf-8", "replace"))
    lines = text.split("\n")
    if lines and lines[-1].endswith("(qemu) "):
        lines = lines[:-1]
    if lines and command in lines[0]:
        lines = lines[1:]
    return "\n".join(lines)


def leftover_processes(run_tag: str = "") -> list[int]:
    """PIDs of QEMU processes started by ostd-hil machines (of run `run_tag`, if given) that
    are still running."""
    # the tag is followed by "-": run "t12" must not count run "t123"'s machines
    marker = f"{RUN_PREFIX}{run_tag}-".encode() if run_tag else RUN_PREFIX.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(QEMU_BINARY.encode()) and marker in cmd and _pid_alive(int(entry.name)):
            try:
                state = (entry / "stat").read_text().split()[2]
            except (OSError, IndexError):
                continue
            if state != "Z":
                pids.append(int(entry.name))
    return pids


def sweep_stale_files() -> list[Path]:
    """Remove the run directories and shared RAM files of machines whose harness process is
    gone (killed before it could clean up). The harness PID is the tag's second field."""
    removed = []
    for path in leftover_files():
        parts = path.name.removeprefix(RUN_PREFIX).removesuffix(".ram").split("-")
        if len(parts) < 3 or not parts[-2].isdigit() or _pid_alive(int(parts[-2])):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


def leftover_gdbs(run_tag: str) -> list[int]:
    """PIDs of gdb processes started by the harness under HIL_RUN_TAG `run_tag` still running."""
    want = f"HIL_RUN_TAG={run_tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split()[2]
        except (OSError, IndexError):
            continue
        if cmd and Path(cmd[0].decode(errors="replace")).name == "gdb" and want in env and state != "Z":
            pids.append(int(entry.name))
    return pids


def leftover_files(run_tag: str = "") -> list[Path]:
    pattern = f"{RUN_PREFIX}{run_tag}-*" if run_tag else f"{RUN_PREFIX}*"
    return sorted(SHM_DIR.glob(pattern)) + sorted(Path("/tmp").glob(pattern))
