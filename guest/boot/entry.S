/* Multiboot v1 entry and the 32 -> 64-bit switch.
 *
 * QEMU's -kernel refuses 64-bit ELFs, so the image is a flat binary (objcopy -O binary)
 * and the header carries the load addresses itself (the "a.out kludge", flag bit 16).
 * Everything here runs at VMA == LMA (identity); the rest of the kernel is linked at
 * KERNEL_BASE + LMA and reached through boot page tables that map phys [0, 1 GiB) twice:
 * identity (root entry 0) and at 0xffffffff80000000 (root entry 511, PDPT entry 510).
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS ((1 << 1) | (1 << 16))   /* want mem_lower/upper; header has addresses */

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header              /* header_addr */
    .long _kernel_start_phys     /* load_addr: the file starts here */
    .long _load_end_phys         /* load_end_addr */
    .long _kernel_end_phys       /* bss_end_addr: the loader zeroes .bss */
    .long _start                 /* entry_addr */

    .section .boot.text, "ax"
    .code32
    .global _start
_start:
    cli
    movl %eax, %edi              /* multiboot magic -> kmain arg 0 */
    movl %ebx, %esi              /* multiboot info paddr -> kmain arg 1 */

    /* boot PD: 512 x 2 MiB leaves covering phys [0, 1 GiB) (P | RW | PS) */
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, boot_pd(, %ecx, 8)
    movl $0, boot_pd + 4(, %ecx, 8)
    incl %ecx
    cmpl $512, %ecx
    jb 1b

    movl %cr4, %eax
    orl $(1 << 5), %eax          /* CR4.PAE: required for long mode */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3

    /* EFER.NXE only if CPUID says NX exists (else setting it #GPs). */
    xorl %ebp, %ebp
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb 2f
    movl $0x80000001, %eax
    cpuid
    btl $20, %edx                /* CPUID.80000001H:EDX.NX */
    jnc 2f
    movl $(1 << 11), %ebp        /* EFER.NXE */
2:  movl $0xC0000080, %ecx       /* IA32_EFER */
    rdmsr
    orl $(1 << 8), %eax          /* EFER.LME: long mode enable */
    orl %ebp, %eax
    wrmsr

    movl %cr0, %eax
    orl $((1 << 31) | (1 << 16) | 1), %eax   /* CR0.PG, CR0.WP (supervisor honours R/O), PE */
    movl %eax, %cr0

    lgdt boot_gdtr
    ljmp $0x08, $long_entry

    .code64
long_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movl %edi, %edi              /* upper halves are undefined after the switch */
    movl %esi, %esi
    movabsq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movabsq $kmain, %rax
    callq *%rax
3:  cli
    hlt
    jmp 3b

    .section .boot.data, "aw"
    .align 4096
boot_pml4:
    .quad boot_pdpt_lo + 3
    .fill 510, 8, 0
    .quad boot_pdpt_hi + 3
boot_pdpt_lo:
    .quad boot_pd + 3
    .fill 511, 8, 0
boot_pdpt_hi:
    .fill 510, 8, 0
    .quad boot_pd + 3            /* 0xffffffff80000000 -> phys 0 */
    .quad 0
boot_pd:
    .fill 512, 8, 0
    .align 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff     /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff     /* 0x10: data */
boot_gdt_end:
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .bss
    .align 16
    .global boot_stack_bottom, boot_stack_top
boot_stack_bottom:
    .skip 32768
boot_stack_top:
