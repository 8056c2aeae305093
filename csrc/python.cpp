// The Python module moe_route._C: build info and the eager fast paths into the dispatcher.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
// torch/extension.h would add the C++ frontend (torch/all.h), unused here: about 15 s of compile
#include <torch/python.h>
#include <torch/version.h>

#include <optional>
#include <string>

#include "cpu/isa.h"
#include "gate_op.h"

namespace moe_route {
namespace {

// The non-tensor knobs of a gate, converted once (RouterSpec caches one) instead of per call.
struct GateConfig {
  std::string score = "softmax", select_on = "scores", group_score = "max";
  int64_t n_group = 1, topk_group = 1;
  bool renormalize = false;
  double renorm_eps = 0.0, scale = 1.0;
  bool round_scores = false, steer_select_only = false, std_unbiased = false;
};

using GateSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, int64_t, c10::string_view, c10::string_view, const OptTensor&, int64_t,
    int64_t, c10::string_view, bool, double, double, bool, const OptTensor&, bool, bool,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&);

OptTensor opt_tensor(const py::handle& h) {
  if (h.is_none()) return std::nullopt;
  return h.cast<at::Tensor>();
}

// Whether this build has a kernel for t's device (CPU always, CUDA when built with it).
bool kernel_device(const at::Tensor& t) {
#ifdef MOE_ROUTE_WITH_CUDA
  return t.is_cpu() || t.is_cuda();
#else
  return t.is_cpu();
#endif
}

bool needs_grad(const at::Tensor& t) { return t.requires_grad() && c10::GradMode::is_enabled(); }

// call() (an op's typed dispatcher call) below autograd, its outputs wrapped for Python. Without
// the GIL for an op over at least 2^16 elements: releasing it costs more than a small op, and a
// large one lets other Python threads run.
template <typename Call>
py::object call_below_autograd(int64_t numel, Call&& call) {
  decltype(call()) out;
  {
    std::optional<py::gil_scoped_release> no_gil;
    if (numel >= (1 << 16)) no_gil.emplace();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = call();
  }
  return py::cast(std::move(out));
}

// Eager calls from Python through the typed dispatcher handle: the same kernels (CPU or CUDA, and
// any mode keys) as torch.ops.moe_route.topk_gate, without parsing 22 boxed arguments per call.
// Returns None, having done nothing, for a call that moe_route.topk_gate's checked path must
// take: k not a Python int (a bool, a NumPy integer), logits on a device without a kernel here,
// logits that autograd needs a gradient from, or a steering table for another E or device (the
// one its SteerSpec gave last). Those tests cost about 0.4 us in Python, on decode-sized gates
// of about 2 us.
py::object topk_gate_fast(const at::Tensor& logits, const py::handle& k_obj, const GateConfig& c,
                          const OptTensor& bias, const OptTensor& steer, const OptTensor& groups,
                          const OptTensor& replay, const py::handle& stats) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_route::topk_gate", "")
                       .typed<GateSig>();
  if (!PyLong_CheckExact(k_obj.ptr())) return py::none();
  int overflow = 0;
  const long long k = PyLong_AsLongLongAndOverflow(k_obj.ptr(), &overflow);
  if (overflow) return py::none();
  if (!kernel_device(logits) || needs_grad(logits)) return py::none();
  if (steer && (logits.dim() != 2 || steer->dim() != 2 || steer->size(1) != logits.size(1) ||
                steer->device() != logits.device()))
    return py::none();
  OptTensor buf[6];
  if (!stats.is_none()) {
    auto seq = py::reinterpret_borrow<py::tuple>(stats);
    TORCH_CHECK_VALUE(seq.size() == 6, "topk_gate: stats must hold 6 buffers, got ", seq.size());
    for (int i = 0; i < 6; ++i) buf[i] = opt_tensor(seq[i]);
  }
  // The autograd kernel's two jobs (registration.cpp), without a boxed trip through it: refuse
  // a call that autograd would need a gradient from, and bump the written buffers' versions.
  check_no_grad(logits, bias, steer);
  py::object out = call_below_autograd(logits.numel(), [&] {
    return op.call(logits, k, c.score, c.select_on, bias, c.n_group, c.topk_group, c.group_score,
                   c.renormalize, c.renorm_eps, c.scale, c.round_scores, steer,
                   c.steer_select_only, c.std_unbiased, groups, replay, buf[0], buf[1], buf[2],
                   buf[3], buf[4], buf[5]);
  });
  for (const OptTensor& b : buf)
    if (b && b->defined()) torch::autograd::impl::bump_version(*b);
  return out;
}

// The dispatch ops as topk_gate_fast calls the gate: through the typed dispatcher handle, below
// autograd. Each returns None, having done nothing, for a call that moe_route.dispatch's
// checked path must take: a device without a kernel here, tensors on different devices, shapes
// the checked path explains, or an input autograd needs a gradient from (permute and unpermute
// have Python backward formulas; the plan is integer). About 2 us at T = 1 against 6-10 us
// through torch.ops and torch.library's Python autograd kernel.
py::object dispatch_plan_fast(const at::Tensor& ids, int64_t num_experts, int64_t block_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_route::dispatch_plan", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, int64_t, int64_t)>();
  if (!kernel_device(ids)) return py::none();
  return call_below_autograd(ids.numel(), [&] { return op.call(ids, num_experts, block_size); });
}

py::object permute_fast(const at::Tensor& x, const at::Tensor& row_slot,
                        const at::Tensor& slot_row, int64_t k, const OptTensor& expert_offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_route::permute", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, const OptTensor&)>();
  const auto device = x.device();
  if (!kernel_device(x) || needs_grad(x) || row_slot.device() != device ||
      slot_row.device() != device || (expert_offsets && expert_offsets->device() != device) ||
      k < 1 || x.dim() != 2 || slot_row.dim() != 1 || x.size(0) * k != slot_row.size(0))
    return py::none();
  return call_below_autograd(
      x.numel(), [&] { return op.call(x, row_slot, slot_row, k, expert_offsets); });
}

py::object unpermute_fast(const at::Tensor& y, const at::Tensor& row_slot,
                          const at::Tensor& slot_row, int64_t k, const at::Tensor& weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_route::unpermute", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  const auto device = y.device();
  if (!kernel_device(y) || needs_grad(y) || needs_grad(weights) ||
      slot_row.device() != device || weights.device() != device || y.dim() != 2 ||
      row_slot.dim() != 1 || slot_row.dim() != 1 || weights.dim() != 2 ||
      k < 1 || y.size(0) != row_slot.size(0) || weights.size(1) != k ||
      weights.size(0) * k != slot_row.size(0))
    return py::none();
  return call_below_autograd(y.numel(), [&] { return op.call(y, slot_row, weights); });
}

py::dict build_info() {
  py::dict d;
#ifdef MOE_ROUTE_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                       std::to_string(TORCH_VERSION_MINOR) + "." +
                       std::to_string(TORCH_VERSION_PATCH);
#if defined(__VERSION__)
  d["compiler"] = std::string(__VERSION__);
#endif
#if defined(_GLIBCXX_USE_CXX11_ABI)  // libstdc++ only (not libc++, as on macOS)
  d["cxx11_abi"] = bool(_GLIBCXX_USE_CXX11_ABI);
#endif
  // Whether at::parallel_for runs the CPU kernels on several threads (setup.py's OpenMP probe).
#if defined(_OPENMP)
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  // Whether this build has only the baseline variant, its vector compares and shuffles split
  // into 16-byte pieces (isa.h: GCC on aarch64, or -DMOE_ROUTE_NO_X86_VARIANTS). GCC's x86-64
  // build splits them too, in its baseline variant's own unit (gate_base.cpp).
  d["split_vectors"] = bool(MOE_ROUTE_SPLIT_CONDITIONS);
  d["parallel"] = at::get_parallel_info();
  return d;
}

}  // namespace
}  // namespace moe_route

PYBIND11_MODULE(_C, m) {
  using moe_route::GateConfig;
  m.doc() = "moe_route native ops (registered under torch.ops.moe_route)";
  py::class_<GateConfig>(m, "GateConfig")
      .def(py::init([](std::string score, std::string select_on, int64_t n_group,
                       int64_t topk_group, std::string group_score, bool renormalize,
                       double renorm_eps, double scale, bool round_scores,
                       bool steer_select_only, bool std_unbiased) {
             return GateConfig{score,      select_on,    group_score,       n_group,
                               topk_group, renormalize,  renorm_eps,        scale,
                               round_scores, steer_select_only, std_unbiased};
           }),
           py::arg("score"), py::arg("select_on"), py::arg("n_group"), py::arg("topk_group"),
           py::arg("group_score"), py::arg("renormalize"), py::arg("renorm_eps"),
           py::arg("scale"), py::arg("round_scores"), py::arg("steer_select_only"),
           py::arg("std_unbiased"));
  m.def("topk_gate_fast", &moe_route::topk_gate_fast, py::arg("logits"), py::arg("k"),
        py::arg("config"), py::arg("selection_bias"), py::arg("steer"), py::arg("groups"),
        py::arg("replay"), py::arg("stats"));
  m.def("dispatch_plan_fast", &moe_route::dispatch_plan_fast, py::arg("ids"),
        py::arg("num_experts"), py::arg("block_size"));
  m.def("permute_fast", &moe_route::permute_fast, py::arg("x"), py::arg("row_slot"),
        py::arg("slot_row"), py::arg("k"), py::arg("expert_offsets"));
  m.def("unpermute_fast", &moe_route::unpermute_fast, py::arg("y"), py::arg("row_slot"),
        py::arg("slot_row"), py::arg("k"), py::arg("weights"));
  m.def("build_info", &moe_route::build_info);
  m.def("cpu_isa", [] { return std::string(moe_route::cpu_isa_name(moe_route::cpu_isa())); },
        "The instruction-set variant the CPU kernels run: base, avx2 or avx512.");
  m.def("cpu_isas", &moe_route::cpu_isas, "The variants this CPU runs, baseline first.");
  m.def("set_cpu_isa", &moe_route::set_cpu_isa, py::arg("name"),
        "Runs the CPU kernels' `name` variant from now on (ValueError if this CPU cannot).");
  m.def("cpu_isa_env_error", &moe_route::cpu_isa_env_error,
        "Why MOE_ROUTE_CPU_ISA was not followed, or an empty string.");
  m.def("cpu_gate_lanes", &moe_route::cpu_gate_lanes,
        "Whether the CPU gate runs E <= 128 eight tokens at a time.");
  m.def("set_cpu_gate_lanes", &moe_route::set_cpu_gate_lanes, py::arg("on"),
        "Switches the CPU gate's eight-tokens-at-a-time path for E <= 128 (same bits either way).");
}
