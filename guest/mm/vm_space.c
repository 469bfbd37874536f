#include "mm.h"
u64 op_vm_space(u64 op) { (void)op; return HIL_ERR_UNKNOWN_OP; }
