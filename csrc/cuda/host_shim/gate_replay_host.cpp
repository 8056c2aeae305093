// gate_replay.cu compiled for the host emulator (see cuda_runtime.h here).
#include "../gate_replay.cu"
