// Every op schema of the moe_route namespace: the contract. Implementations register per backend
// (cpu/gate.cpp, cuda/gate_glue.cpp); fake kernels live in moe_route/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(moe_route, m) {
  // Fused top-k gate with steering and in-place routing statistics (moe_route/reference.py).
  // The statistics buffers are mutated, never returned. `replay` [T, k] gives tokens their ids
  // (router replay): those rows skip selection; rows of -1 select as usual.
  m.def(
      "topk_gate(Tensor logits, int k, str score=\"softmax\", str select_on=\"scores\", "
      "Tensor? selection_bias=None, int n_group=1, int topk_group=1, str group_score=\"max\", "
      "bool renormalize=False, float renorm_eps=0.0, float scale=1.0, Tensor? steer=None, "
      "bool steer_select_only=False, bool std_unbiased=False, Tensor? groups=None, "
      "Tensor? replay=None, "
      "Tensor(a!)? tokens=None, Tensor(b!)? counts=None, Tensor(c!)? prob_sum=None, "
      "Tensor(d!)? weight_sum=None, Tensor(e!)? entropy_sum=None, Tensor(f!)? coact=None) "
      "-> (Tensor weights, Tensor ids)");

  // Dispatch (moe_route/reference.py, "Dispatch"): a stable counting sort of the T*k (token, slot)
  // pairs by expert, sized for the worst case so nothing reads back to the host.
  m.def(
      "dispatch_plan(Tensor ids, int num_experts, int block_size=1) "
      "-> (Tensor row_slot, Tensor expert_offsets, Tensor counts, Tensor slot_row)");
  // Expert-contiguous rows [R, H] of x [T, H]; zero rows where row_slot is -1. Given the plan's
  // expert_offsets, rows at and past expert_offsets[E] (the unused tail) are not written.
  m.def(
      "permute(Tensor x, Tensor row_slot, Tensor slot_row, int k, "
      "Tensor? expert_offsets=None) -> Tensor");
  // Weighted k-way sum back to [T, H], fp32 accumulation in slot order, no atomics.
  m.def("unpermute(Tensor y, Tensor slot_row, Tensor weights) -> Tensor");
}

