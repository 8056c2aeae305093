// gate_wide.cu compiled for the host emulator (see cuda_runtime.h here).
#include "../gate_wide.cu"
