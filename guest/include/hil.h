/* The guest side of the harness ABI: mailbox, layout block, registry, op reporting. */
#ifndef HIL_H
#define HIL_H
#include "kernel.h"
#include "hil_abi.h"

extern volatile u8 hil_mailbox[HIL_MAILBOX_SIZE];
extern u64 hil_layout[HIL_LAYOUT_NR_WORDS];
void hil_op_done(void);

static inline volatile u64 *mb_word(u64 off) { return (volatile u64 *)(hil_mailbox + off); }
static inline u64 mb_arg(int i) { return *mb_word(HIL_OFF_REQ_ARGS + 8 * i); }
static inline void mb_result(int i, u64 v) { *mb_word(HIL_OFF_RESP_RESULTS + 8 * i) = v; }

/* Report and leave the op: status PANIC with code and a one-line reason. */
void hil_panic(u64 code, const char *why) __attribute__((noreturn));
/* A guest-internal consistency check (a guest bug, not an OSTD panic). */
#define GUEST_ASSERT(c) do { if (!(c)) hil_panic(HIL_PANIC_GUEST_ASSERT, "guest assert: " #c); } while (0)

/* --- handle registry (hil/registry.c) --- */
struct reg_entry { u64 kind, id, w[6]; };
enum { ID_VM_SPACE, ID_CURSOR, ID_FRAME, ID_SEGMENT, ID_UNIQUE, NR_ID_KINDS };
#define REGISTRY_ENTRIES 2048
extern struct reg_entry *registry;   /* linear-map pointer; entry 0 = counters */
void registry_init(u64 base_pa);
struct reg_entry *reg_find(u64 kind, u64 id);   /* NULL if no live entry */
u64 reg_free_count(void);
/* New entry with a fresh id of `idkind` (caller checked the room first). */
struct reg_entry *reg_new(u64 kind, int idkind);
void reg_free(struct reg_entry *e);

void hil_main_loop(void) __attribute__((noreturn));
#endif
