"""Physical-memory readers.

Interface part (top of the file): `PhysMemory`, the protocol every reader implements and the
snapshot code consumes; `PhysReadError`; `DictMemory`, a sparse fake for unit tests.

QEMU returns zeros (and gdb returns whatever its stub gives) for physical addresses beyond
RAM, so a reader must bound-check every access against `ram_size` itself and raise
`PhysReadError` instead of returning bytes that look like an empty page table.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hil.errors import HilError

if TYPE_CHECKING:
    from hil.target.stub import Target

_PAGE = 4096


class PhysReadError(HilError):
    """A physical access outside [0, ram_size) (or one the transport could not serve)."""

    def __init__(self, paddr: int, size: int, ram_size: int, what: str = "read"):
        self.paddr = paddr
        self.size = size
        self.ram_size = ram_size
        super().__init__(f"physical {what} [{paddr:#x}, {paddr + size:#x}) outside RAM [0, {ram_size:#x})")


class PhysMemory(Protocol):
    """Guest physical memory. `read` returns exactly `size` bytes or raises PhysReadError."""

    ram_size: int

    def read(self, paddr: int, size: int) -> bytes: ...

    def write(self, paddr: int, data: bytes) -> None: ...

    def close(self) -> None: ...


def check_range(paddr: int, size: int, ram_size: int, what: str = "read") -> None:
    """Raise PhysReadError unless [paddr, paddr + size) lies inside RAM."""
    if paddr < 0 or size < 0 or paddr + size > ram_size:
        raise PhysReadError(paddr, size, ram_size, what)


class DictMemory:
    """Sparse RAM for unit tests: a dict of 4 KiB pages; pages never written read as zeros.
    Accesses are bound-checked against `ram_size` like a real reader."""

    def __init__(self, ram_size: int):
        self.ram_size = ram_size
        self.pages: dict[int, bytearray] = {}
        self.reads = 0  # number of read() calls (tests check bulk reads)

    def read(self, paddr: int, size: int) -> bytes:
        check_range(paddr, size, self.ram_size)
        self.reads += 1
        out = bytearray()
        addr, end = paddr, paddr + size
        while addr < end:
            page, off = divmod(addr, _PAGE)
            n = min(end - addr, _PAGE - off)
            data = self.pages.get(page)
            out += data[off : off + n] if data is not None else bytes(n)
            addr += n
        return bytes(out)

    def write(self, paddr: int, data: bytes) -> None:
        check_range(paddr, len(data), self.ram_size, "write")
        addr, pos = paddr, 0
        while pos < len(data):
            page, off = divmod(addr, _PAGE)
            n = min(len(data) - pos, _PAGE - off)
            buf = self.pages.setdefault(page, bytearray(_PAGE))
            buf[off : off + n] = data[pos : pos + n]
            addr += n
            pos += n

    def close(self) -> None:
        pass

    def write_u64(self, paddr: int, value: int) -> None:
        self.write(paddr, value.to_bytes(8, "little"))

    def read_u64(self, paddr: int) -> int:
        return int.from_bytes(self.read(paddr, 8), "little")


# --- readers (shared RAM file, gdb physical mode) follow below -------------------------


# --- the real readers ----------------------------------------------------------------------


class SharedRamMemory:
    """The guest's RAM as QEMU's `memory-backend-file,share=on` file, mmapped: ~1 µs per page
    (NOTES "Reading guest memory"). File offset = guest paddr below the 4 GiB hole."""

    def __init__(self, path: Path, ram_size: int):
        self.path = path
        self.ram_size = ram_size
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < ram_size:
                raise PhysReadError(0, ram_size, size, "map")
            self._map: mmap.mmap | None = mmap.mmap(fd, ram_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def read(self, paddr: int, size: int) -> bytes:
        check_range(paddr, size, self.ram_size)
        assert self._map is not None, "reader closed"
        return self._map[paddr : paddr + size]

    def view(self, paddr: int, size: int) -> memoryview:
        """Zero-copy access for bulk comparisons (valid until close)."""
        check_range(paddr, size, self.ram_size)
        assert self._map is not None, "reader closed"
        return memoryview(self._map)[paddr : paddr + size]

    def write(self, paddr: int, data: bytes) -> None:
        check_range(paddr, len(data), self.ram_size, "write")
        assert self._map is not None, "reader closed"
        self._map[paddr : paddr + len(data)] = data

    def close(self) -> None:
        if self._map is not None:
            # a memoryview may still be alive; the mapping then goes with it
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None


class GdbPhysMemory:
    """Physical memory through QEMU's gdb stub (`Qqemu.PhyMemMode:1`), by gdb/MI or the stub
    client (`m` / `M` packets): the portable path, for a QEMU without a shared RAM file (e.g.
    remote). ~0.1 ms per KiB: read only what is needed."""

    CHUNK = 64 * 1024

    def __init__(self, gdb: Target, ram_size: int):
        self.gdb = gdb
        self.ram_size = ram_size
        gdb.set_physical_mode(True)
        self._phys = True

    def read(self, paddr: int, size: int) -> bytes:
        check_range(paddr, size, self.ram_size)
        out = bytearray()
        for off in range(0, size, self.CHUNK):
            out += self.gdb.read_memory(paddr + off, min(self.CHUNK, size - off))
        return bytes(out)

    def write(self, paddr: int, data: bytes) -> None:
        check_range(paddr, len(data), self.ram_size, "write")
        self.gdb.write_memory(paddr, data)

    def close(self) -> None:
        """Back to virtual addressing (symbol-based access, breakpoints by VA)."""
        if self._phys and self.gdb.alive():
            self.gdb.set_physical_mode(False)
        self._phys = False
