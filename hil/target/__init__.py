"""The target: one QEMU, its gdb stub, guest memory, the mailbox ABI, the guest ELF, processes."""
