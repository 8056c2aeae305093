// The CPU gate's baseline variant for GCC on x86-64 (isa.h, MOE_ROUTE_SEPARATE_BASE): gate.cpp
// compiled once more without the AVX2 and AVX-512 variants, so that its 8-lane compares and
// shuffles are split into 16-byte pieces (vec.h) instead of being built lane by lane. gate.cpp's
// run_gate_cpu hands every call of the baseline variant to this unit's run_gate_cpu_base.
// Elsewhere (Clang, other CPUs) gate.cpp builds its baseline itself and this unit is empty.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(MOE_ROUTE_NO_X86_VARIANTS)
#define MOE_ROUTE_NO_X86_VARIANTS
#define MOE_ROUTE_GATE_BASE_UNIT 1
#include "gate.cpp"
#endif
