#!/usr/bin/env python3
"""A stand-in for `gdb --interpreter=mi3`, for the session logic's unit tests (below the wire).

Behaviour by FAKE_GDB_MODE: "ok" (answers like gdb: exec commands reply ^running and then a
*stopped record), "hang" (never stops after a resume), "die" (exits on a resume), "noisy"
(async and console records before each reply)."""

import os
import re
import sys

mode = os.environ.get("FAKE_GDB_MODE", "ok")
memory = bytes(range(256)) * 16


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


for raw in sys.stdin:
    m = re.match(r"(\d*)(.*)", raw.strip())
    token, cmd = m.group(1), m.group(2)
    if mode == "noisy":
        out('=thread-group-added,id="i1"')
        out('~"some console noise\\n"')
        out('*running,thread-id="all"')
    if cmd.startswith("-gdb-exit"):
        out(f"{token}^exit")
        sys.exit(0)
    if cmd.startswith(("-exec-continue", "-exec-jump")):
        if mode == "die":
            sys.exit(3)
        out(f"{token}^running")
        if mode != "hang":
            out('*stopped,reason="breakpoint-hit",frame={addr="0x1000",func="hil_op_done"}')
        continue
    if cmd.startswith("-target-select"):
        out('*stopped,frame={addr="0xfff0"},thread-id="1"')  # the halted CPU, as QEMU reports it
        out(f"{token}^connected")
        continue
    if cmd.startswith("-data-read-memory-bytes"):
        _, addr, size = cmd.split()
        a, n = int(addr, 16), int(size)
        out(f'{token}^done,memory=[{{begin="{a:#x}",offset="0x0",end="{a + n:#x}",'
            f'contents="{memory[a:a + n].hex()}"}}]')
        continue
    if cmd.startswith("-data-evaluate-expression"):
        out(f'{token}^done,value="4096"')
        continue
    if cmd.startswith("-break-insert"):
        out(f'{token}^done,bkpt={{number="1",type="breakpoint",addr="0x1000"}}')
        continue
    if cmd.startswith("-bogus"):
        out(f'{token}^error,msg="Undefined MI command: bogus"')
        continue
    if cmd.startswith("-interpreter-exec"):
        out('~"console says hi\\n"')
    out(f"{token}^done")
