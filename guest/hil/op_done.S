/* The harness's stop spot. In asm so the compiler can never inline or elide it.
 *
 * hil_op_done_rung: the stub drive under TCG stops on a write watchpoint on hil_doorbell, not
 * a breakpoint: QEMU 7.2's gdbstub flushes every translated block at a breakpoint stop (not at
 * a watchpoint's), and retranslating the guest's code after each op cost ~130 us of a ~270 us
 * round trip, plus ~100-250 us more for an op with MMU probes (their own code paths). The
 * stop comes after the write, at hil_op_done_rung; a plain continue goes on from there.
 * Translated code now outlives an op, and the harness's writes through the shared RAM file
 * bypass QEMU's self-modifying-code checks: it never writes other bytes where code ran (a fast
 * reset writes the kernel image's own bytes back; the exec probe's `ret` is only ever
 * rewritten as the same `ret`). The TLB is unaffected: a TB flush never touched it.
 *
 * hil_op_done: gdb (hil debug, the gdb/MI drive) and KVM stop on a breakpoint here; the 1-byte
 * nop lets them resume at hil_op_done + 1 without a step-over. */
    .text
    .global hil_op_done
    .type hil_op_done, @function
hil_op_done:
    nop
    incq hil_doorbell(%rip)
    .global hil_op_done_rung
hil_op_done_rung:
    ret
    .size hil_op_done, . - hil_op_done

    /* a page of its own: every access to a watched page takes QEMU's slow path */
    .section .data.hil_doorbell, "aw", @progbits
    .balign 4096
    .global hil_doorbell
    .type hil_doorbell, @object
hil_doorbell:
    .quad 0
    .size hil_doorbell, 8
    .balign 4096
