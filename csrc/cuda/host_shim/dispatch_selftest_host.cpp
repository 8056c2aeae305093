// dispatch_selftest.cu compiled for the host emulator (see cuda_runtime.h here).
#include "../dispatch_selftest.cu"
