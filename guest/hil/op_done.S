/* The harness's breakpoint target. In asm so the compiler can never inline or elide it;
 * a 1-byte nop first so a breakpoint there can be stepped over by jumping to ret. */
    .text
    .global hil_op_done
    .type hil_op_done, @function
hil_op_done:
    nop
    ret
    .size hil_op_done, . - hil_op_done
