/* The two libc routines gcc may emit calls to even with -fno-builtin. */
#include "kernel.h"

void *memset(void *d, int c, u64 n) {
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, u64 n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}
