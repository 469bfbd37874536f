#include "mm.h"
u64 op_cursor(u64 op) { (void)op; return HIL_ERR_UNKNOWN_OP; }
