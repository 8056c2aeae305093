#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace moe_route {
namespace {

constexpr const char* kNames[] = {"base", "avx2", "avx512"};

CpuIsa best_supported() {
#if MOE_ROUTE_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return CpuIsa::Avx512;
  if (__builtin_cpu_supports("avx2")) return CpuIsa::Avx2;
#endif
  return CpuIsa::Base;
}

// The variant called `name`, if this CPU runs it; ValueError otherwise.
CpuIsa parse_isa(const std::string& name) {
  for (int i = 0; i <= int(best_supported()); ++i)
    if (name == kNames[i]) return CpuIsa(i);
  std::string supported;
  for (const std::string& n : cpu_isas()) supported += (supported.empty() ? "" : ", ") + n;
  TORCH_CHECK_VALUE(false, "cpu_isa: '", name, "' must be one this CPU runs (", supported, ")");
}

struct State {
  std::atomic<int> isa;
  std::string env_error;

  State() : isa(int(best_supported())) {
    const char* env = std::getenv("MOE_ROUTE_CPU_ISA");
    if (!env || !*env) return;
    try {
      isa.store(int(parse_isa(env)));
    } catch (const c10::Error& e) {
      env_error = e.what_without_backtrace();
    }
  }
};

State& state() {
  static State s;
  return s;
}

}  // namespace

CpuIsa cpu_isa() { return CpuIsa(state().isa.load(std::memory_order_relaxed)); }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= int(best_supported()); ++i) out.push_back(kNames[i]);
  return out;
}

void set_cpu_isa(const std::string& name) {
  const CpuIsa isa = parse_isa(name);
  state().isa.store(int(isa), std::memory_order_relaxed);
}

const char* cpu_isa_name(CpuIsa isa) { return kNames[int(isa)]; }

const std::string& cpu_isa_env_error() { return state().env_error; }

namespace {
std::atomic<bool> gate_lanes{true};
}  // namespace

bool cpu_gate_lanes() { return gate_lanes.load(std::memory_order_relaxed); }

void set_cpu_gate_lanes(bool on) { gate_lanes.store(on, std::memory_order_relaxed); }

}  // namespace moe_route
