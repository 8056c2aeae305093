// Function multi-versioning for the CPU kernels: MOE_ROUTE_CLONES builds a function for AVX2 and
// for the baseline ISA and picks one at load time; helpers are forced inline (MOE_ROUTE_INLINE)
// so that each clone compiles them for its own instruction set.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOE_ROUTE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MOE_ROUTE_CLONES
#endif
#define MOE_ROUTE_INLINE inline __attribute__((always_inline))
