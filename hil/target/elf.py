"""The guest ELF: symbols, VMA->LMA translation, and capstone disassembly around an address."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import capstone
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from hil.errors import AbiError

REQUIRED_SYMBOLS = ("hil_mailbox", "hil_op_done", "hil_layout")


@dataclass(frozen=True)
class Segment:
    vaddr: int
    paddr: int
    memsz: int
    offset: int
    filesz: int


class GuestElf:
    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise AbiError(f"guest image {path} not found")
        self.data = path.read_bytes()
        if self.data[:4] != b"\x7fELF":  # pyelftools' ELFError would read as a harness bug
            raise AbiError(f"{path}: not an ELF file (a guest image is guest/build/kernel.elf)")
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            if elf.get_machine_arch() != "x64":
                raise AbiError(f"{path}: not an x86-64 ELF (gdb needs the 64-bit image)")
            self.segments = [
                Segment(s["p_vaddr"], s["p_paddr"], s["p_memsz"], s["p_offset"], s["p_filesz"])
                for s in elf.iter_segments()
                if s["p_type"] == "PT_LOAD"
            ]
            self.symbols: dict[str, tuple[int, int]] = {}
            for section in elf.iter_sections():
                if isinstance(section, SymbolTableSection):
                    for sym in section.iter_symbols():
                        if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE"):
                            self.symbols.setdefault(sym.name, (sym["st_value"], sym["st_size"]))
        missing = [s for s in REQUIRED_SYMBOLS if s not in self.symbols]
        if missing:
            raise AbiError(f"{path}: guest image lacks the ABI symbol(s) {', '.join(missing)}")

    @cached_property
    def build_id(self) -> str:
        return hashlib.sha256(self.data).hexdigest()[:16]

    def symbol(self, name: str) -> int:
        try:
            return self.symbols[name][0]
        except KeyError:
            raise AbiError(f"{self.path}: no symbol {name!r}") from None

    def vaddr_to_paddr(self, vaddr: int) -> int:
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
                return vaddr - seg.vaddr + seg.paddr
        raise AbiError(f"{self.path}: {vaddr:#x} is in no loadable segment")

    def function_at(self, vaddr: int) -> tuple[str, int, int] | None:
        best: tuple[str, int, int] | None = None
        for name, (start, size) in self.symbols.items():
            if start <= vaddr < start + max(size, 1) and (best is None or start > best[1]):
                best = (name, start, size)
        return best

    def code_bytes(self, vaddr: int, size: int) -> bytes:
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
                off = seg.offset + (vaddr - seg.vaddr)
                avail = seg.vaddr + seg.filesz - vaddr
                return self.data[off : off + min(size, avail)]
        return b""

    def disassemble_around(self, rip: int, after: int = 4, before: int = 6) -> list[str]:
        """Instructions of the function holding `rip`, from a few before it to a few after.
        Lines are `=> addr: mnemonic ops` for rip itself. x86 cannot be decoded backwards,
        so we decode forward from the function's start."""
        func = self.function_at(rip)
        start = func[1] if func else rip
        if rip - start > 4096:
            start = rip
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        code = self.code_bytes(start, (rip - start) + 16 * (after + 1))
        insns = list(md.disasm(code, start))
        idx = next((i for i, ins in enumerate(insns) if ins.address == rip), None)
        if idx is None:
            return [f"   {rip:#x}: <not an instruction boundary in {self.path.name}>"]
        lines = []
        for ins in insns[max(0, idx - before) : idx + after + 1]:
            mark = "=>" if ins.address == rip else "  "
            where = ""
            if func and ins.address == rip:
                where = f"  <{func[0]}+{rip - func[1]:#x}>"
            lines.append(f"{mark} {ins.address:#x}: {ins.mnemonic} {ins.op_str}{where}".rstrip())
        return lines
