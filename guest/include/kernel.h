/* Basic types, CPU helpers and the kernel's address-space constants. */
#ifndef KERNEL_H
#define KERNEL_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned __int128 u128;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#ifndef HIL_SEEDED_BUG
#define HIL_SEEDED_BUG 0
#endif
/* SEEDED(n): true only in a build made with `make SEEDED_BUG=n`. */
#define SEEDED(n) (HIL_SEEDED_BUG == (n))

/* VA layout (OSTD's kspace):
 *   0x0000_0000_0000_0000 .. 0x0000_8000_0000_0000  user half (root entries 0..255)
 *   0xffff_8000_0000_0000 ..                        linear map of all RAM (root entry 256)
 *   0xffff_c000_0000_0000                           (vmalloc base: unmapped here)
 *   0xffff_ffff_8000_0000 ..                        kernel image, VMA = base + LMA (entry 511)
 */
#define KERNEL_BASE 0xffffffff80000000UL
#define LINEAR_MAPPING_BASE 0xffff800000000000UL
#define UNMAPPED_KERNEL_VA 0xffffc00000000000UL

#define PAGE_SIZE 4096UL
#define NR_LEVELS 4
#define NR_ENTRIES 512
#define MAX_PADDR 0x80000000UL
#define USER_VA_END (1UL << 47)
#define META_SLOT_SIZE 64

#define REF_COUNT_UNUSED (~0UL)
#define REF_COUNT_UNIQUE (~0UL - 1)
#define REF_COUNT_MAX 0x7fffffffffffffffUL

#define ALIGN_DOWN(x, a) ((x) & ~((a) - 1))
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((a) - 1))

static inline void *paddr_to_vaddr(u64 pa) { return (void *)(pa + LINEAR_MAPPING_BASE); }
static inline u64 kimage_paddr(const void *p) { return (u64)p - KERNEL_BASE; }

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 read_cr2(void) { u64 v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" ::"r"(va) : "memory"); }
#define barrier() __asm__ volatile("" ::: "memory")

void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);

/* boot/serial.c */
void serial_init(void);
void serial_puts(const char *s);
void serial_hex(u64 v);
void serial_dec(u64 v);

/* boot/cpu.c */
struct jmp_buf { u64 rbx, rbp, r12, r13, r14, r15, rsp, rip; };
int hil_setjmp(struct jmp_buf *jb) __attribute__((returns_twice));
void hil_longjmp(struct jmp_buf *jb, int val) __attribute__((noreturn));
void cpu_init(void);
/* Recovery point of the current op: panics and unexpected exceptions longjmp here. */
extern struct jmp_buf op_recover;
extern volatile int op_recover_armed;
/* Probe: a #PF while probe_armed longjmps to probe_recover with the fault recorded. */
extern struct jmp_buf probe_recover;
extern volatile int probe_armed;
extern volatile u64 probe_error_code, probe_cr2;
/* CR4.SMAP is on (CPUID reported it; hil_layout probe_user): a kernel data access to a user
 * page faults unless EFLAGS.AC is set, which is how the probes see a translation's U bit.
 * AC goes through pushf/popf, not stac/clac: the software KVM of this workplace (kvm_pvm)
 * cannot emulate stac/clac (an emulation failure at boot), and popf works everywhere. */
extern bool cpu_smap;
void smap_ensure(void);
static inline void smap_allow(void) {
    if (cpu_smap)
        __asm__ volatile("pushfq; orq $0x40000, (%%rsp); popfq" ::: "memory", "cc");
}
static inline void smap_enforce(void) {
    if (cpu_smap)
        __asm__ volatile("pushfq; andq $~0x40000, (%%rsp); popfq" ::: "memory", "cc");
}

#endif
