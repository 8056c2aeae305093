// Instruction-set variants of the CPU kernels. A kernel's per-token loop is compiled once per
// variant (a wrapper with a target attribute around one always-inline body) and the variant runs
// that cpu_isa() names: the best this CPU supports, or MOE_ROUTE_CPU_ISA, or set_cpu_isa().
// Every variant computes the same bits: lanes are independent IEEE operations, reductions use 8
// fixed partial sums, and -ffp-contract=off keeps FMA out (tests/test_cpu_isa.py checks it).
#pragma once

#include <string>
#include <vector>

namespace moe_route {

enum class CpuIsa : int { Base = 0, Avx2 = 1, Avx512 = 2 };

// GCC and Clang on x86-64 build the AVX2 and AVX-512 variants (the same bits from either
// compiler, bench/RESULTS.md); elsewhere only the baseline exists. -DMOE_ROUTE_NO_X86_VARIANTS
// builds only the baseline on x86-64 too: with GCC, the code GCC builds for aarch64, on SSE2
// (.ci/aarch64_check tests it so).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(MOE_ROUTE_NO_X86_VARIANTS)
#define MOE_ROUTE_X86_VARIANTS 1
#define MOE_ROUTE_TARGET_AVX2 __attribute__((target("avx2")))
// AVX512VL for the 8-lane vectors in EVEX form (32 registers), BW/DQ as every AVX-512 CPU since
// Skylake-SP has them.
#define MOE_ROUTE_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq")))
#else
#define MOE_ROUTE_X86_VARIANTS 0
#endif
#define MOE_ROUTE_INLINE inline __attribute__((always_inline))

// GCC's x86-64 build compiles the gate's baseline variant in a unit of its own, gate_base.cpp
// (gate.cpp again, with MOE_ROUTE_NO_X86_VARIANTS): there the baseline is all there is, so its
// compares and shuffles are split as on aarch64 (below), which a variant inside gate.cpp's unit
// cannot do (its helpers are inlined into every variant alike).
#if MOE_ROUTE_X86_VARIANTS && !defined(__clang__)
#define MOE_ROUTE_SEPARATE_BASE 1
#else
#define MOE_ROUTE_SEPARATE_BASE 0
#endif

// GCC 12 expands a comparison, a ?: or a shuffle of vectors wider than the target's registers
// lane by lane (scalar compares, selects and lane moves), where it splits their arithmetic into
// register-wide pieces. Where the baseline is the only variant and its registers hold 16 bytes
// (GCC for aarch64, and gate_base.cpp's unit), the CPU kernels split them into 16-byte pieces
// themselves (vec.h's vgt, vsel and shuffle; checked by .ci/aarch64_check).
#if defined(__GNUC__) && !defined(__clang__) && !MOE_ROUTE_X86_VARIANTS && !defined(__AVX__)
#define MOE_ROUTE_SPLIT_CONDITIONS 1
#else
#define MOE_ROUTE_SPLIT_CONDITIONS 0
#endif

// The variant the CPU kernels run now.
CpuIsa cpu_isa();
// Variants this build and CPU can run, baseline first ("base", "avx2", "avx512").
std::vector<std::string> cpu_isas();
// Runs `name` from now on; ValueError naming the supported variants otherwise.
void set_cpu_isa(const std::string& name);
const char* cpu_isa_name(CpuIsa isa);
// Why MOE_ROUTE_CPU_ISA was not followed ("" when unset or followed).
const std::string& cpu_isa_env_error();

// Whether the CPU gate runs up to 128 experts eight tokens at a time (on by default). Both
// paths give the same bits; tests switch this off to compare them.
bool cpu_gate_lanes();
void set_cpu_gate_lanes(bool on);

}  // namespace moe_route
