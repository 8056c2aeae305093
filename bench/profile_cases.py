"""One case of the CUDA kernels at an issue 6 target shape, run a few times for Nsight Compute.

    python bench/profile_cases.py CASE        # CASE from `python bench/profile_cases.py --list`

``bench/gpu_profile.sh`` runs every case under ``ncu``, which profiles the kernels of one call
after two earlier ones (the setup's launches, permute in the unpermute case, do not match).
Inputs are those of ``moe_route.benchmark``, so the counters describe the calls whose times
``moe-route bench --device cuda`` reports.
"""
from __future__ import annotations

import sys

import torch

from moe_route import _loader
from moe_route import benchmark as B

BF16 = torch.bfloat16


def _gate(semantics: str, T: int, E: int, k: int, kind: str = "gate"):
    return B.gate_and_baseline(B.Case(semantics, T, E, k, BF16), "cuda")[kind]


def _dispatch(op: str, T: int, k: int, H: int, E: int):
    return B.dispatch_callables(B.DispatchCase(T, k, H, E, BF16), "cuda")[op][2]  # ours


# name: (ncu kernel-name regex, kernel launches per call, the callable's builder)
CASES = {
    "gate_T1_E256_k8": ("^topk_gate_kernel", 1, lambda: _gate("softmax_topk", 1, 256, 8)),
    # one token: statistics cost 2.2x the plain gate's time here on 2026-11-29 (8.3 against 3.8 us)
    "gate_T1_E512_k8": ("^topk_gate_kernel", 1, lambda: _gate("softmax_topk", 1, 512, 8)),
    "gate_stats_T1_E512_k8": ("^topk_gate_kernel", 1,
                              lambda: _gate("softmax_topk", 1, 512, 8, "gate_stats")),
    # steered (bench_steer): 13.8 against 2.9 us for the plain gate on 2026-11-29, bf16
    "gate_steer_T1_E256_k8": ("^topk_gate_kernel", 1,
                              lambda: _gate("softmax_topk", 1, 256, 8, "gate_steer")),
    "gate_T16384_E128_k8": ("^topk_gate_kernel", 1,
                            lambda: _gate("softmax_topk", 16384, 128, 8)),
    "gate_T16384_E256_k8": ("^topk_gate_kernel", 1,
                            lambda: _gate("softmax_topk", 16384, 256, 8)),
    "gate_stats_T16384_E256_k8": ("^topk_gate_kernel", 1,
                                  lambda: _gate("softmax_topk", 16384, 256, 8, "gate_stats")),
    # the worst statistics ratio of the H200 run (2.59x the plain gate), and its plain twin
    "gate_topk_softmax_T1024_E128_k4": ("^topk_gate_kernel", 1,
                                        lambda: _gate("topk_softmax", 1024, 128, 4)),
    "gate_stats_topk_softmax_T1024_E128_k4": (
        "^topk_gate_kernel", 1, lambda: _gate("topk_softmax", 1024, 128, 4, "gate_stats")),
    "gate_deepseek_v3_T16384": ("^topk_gate_kernel", 1,
                                lambda: _gate("deepseek_v3", 16384, 256, 8)),
    # decode-sized DeepSeek-V3 calls: a CTA per token, a warp per group (gate_grouped.cuh)
    "gate_deepseek_v3_T1": ("^topk_gate_grouped_kernel", 1,
                            lambda: _gate("deepseek_v3", 1, 256, 8)),
    "gate_deepseek_v3_T1024": ("^topk_gate_grouped_kernel", 1,
                               lambda: _gate("deepseek_v3", 1024, 256, 8)),
    # the CTA-per-token kernel (E > 1024): 46 us for one token and 0.44x PyTorch at T=4096 on the
    # H200 run of 2026-11-26, with no counters taken
    "gate_wide_T1_E16384_k64": ("^topk_gate_wide_kernel", 1,
                                lambda: _gate("topk_softmax", 1, 16384, 64)),
    "gate_wide_T1024_E16384_k64": ("^topk_gate_wide_kernel", 1,
                                   lambda: _gate("topk_softmax", 1024, 16384, 64)),
    "plan_T64_k8_E256": ("^plan_", 1, lambda: _dispatch("plan", 64, 8, 7168, 256)),  # one CTA
    "plan_T4096_k8_E256": ("^plan_", 3, lambda: _dispatch("plan", 4096, 8, 7168, 256)),
    "permute_T4096_k8_H7168": ("^permute_kernel", 1,
                               lambda: _dispatch("permute", 4096, 8, 7168, 256)),
    "unpermute_T4096_k8_H7168": ("^unpermute_kernel", 1,
                                 lambda: _dispatch("unpermute", 4096, 8, 7168, 256)),
}


def main(argv: list) -> int:
    if argv == ["--list"]:
        for name, (kernel, launches, _) in CASES.items():
            print(name, kernel, launches)
        return 0
    if len(argv) != 1 or argv[0] not in CASES:
        print(f"usage: python bench/profile_cases.py CASE | --list; CASE one of {list(CASES)}",
              file=sys.stderr)
        return 2
    if not _loader.has_kernel("topk_gate", "cuda"):
        print("profile_cases: moe_route has no CUDA kernels (build with MOE_ROUTE_FORCE_CUDA=1)",
              file=sys.stderr)
        return 1
    fn = CASES[argv[0]][2]()
    for _ in range(4):
        fn()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
