// gate_selftest.cu compiled for the host emulator (see cuda_runtime.h here).
#include "../gate_selftest.cu"
