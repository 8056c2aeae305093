"""bench/kernel_resources.py: the ptxas report it parses and the occupancy it derives."""
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
_spec = importlib.util.spec_from_file_location("kernel_resources", _PATH)
kr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kr)

# What ptxas -v printed for four of the kernels (nvcc 13.0, sm_90a).
PTXAS = """\
ptxas info    : Compiling entry function '_ZN9moe_route4cuda6detail16topk_gate_kernelILi4ELNS_9LogitTypeE2ELb0ELb0ELb0EEEvNS_10GateParamsENS1_8GatePlanE' for 'sm_90a'
ptxas info    : Function properties for _ZN9moe_route4cuda6detail16topk_gate_kernelILi4ELNS_9LogitTypeE2ELb0ELb0ELb0EEEvNS_10GateParamsENS1_8GatePlanE
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 48 registers, used 0 barriers, 8 bytes cumulative stack size
ptxas info    : Compiling entry function '_ZN9moe_route4cuda6detail16topk_gate_kernelILi8ELNS_9LogitTypeE2ELb0ELb0ELb1EEEvNS_10GateParamsENS1_8GatePlanE' for 'sm_90a'
ptxas info    : Function properties for _ZN9moe_route4cuda6detail16topk_gate_kernelILi8ELNS_9LogitTypeE2ELb0ELb0ELb1EEEvNS_10GateParamsENS1_8GatePlanE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 0 barriers
ptxas info    : Compiling entry function '_ZN9moe_route4cuda6detail16topk_gate_kernelILi8ELNS_9LogitTypeE2ELb1ELb1ELb0EEEvNS_10GateParamsENS1_8GatePlanE' for 'sm_90a'
ptxas info    : Function properties for _ZN9moe_route4cuda6detail16topk_gate_kernelILi8ELNS_9LogitTypeE2ELb1ELb1ELb0EEEvNS_10GateParamsENS1_8GatePlanE
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 8 bytes cumulative stack size
ptxas info    : Compiling entry function '_ZN9moe_route4cuda6detail16unpermute_kernelI13__nv_bfloat16Li8EEEvNS_15UnpermuteParamsEil' for 'sm_90a'
ptxas info    : Function properties for _ZN9moe_route4cuda6detail16unpermute_kernelI13__nv_bfloat16Li8EEEvNS_15UnpermuteParamsEil
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 0 barriers
"""


def test_parse_ptxas_reads_registers_and_spills_per_kernel():
    rows = kr.parse_ptxas(PTXAS)
    assert [(kr.kernel_label(name), regs, spill) for name, regs, spill in rows] == [
        ("topk_gate VPT=4 bf16 plain", 48, 8), ("topk_gate VPT=8 bf16 half keys", 64, 0),
        ("topk_gate VPT=8 bf16 replay", 128, 8), ("unpermute bf16 x8", 128, 0)]


@pytest.mark.parametrize("mangled, label", [
    ("_ZN9moe_route4cuda6detail16topk_gate_kernelILi32ELNS_9LogitTypeE0ELb1ELb0ELb0"
     "EEEvNS_10GateParams",
     "topk_gate VPT=32 fp32 full"),
    ("_ZN9moe_route4cuda6detail16topk_gate_kernelILi1ELNS_9LogitTypeE1ELb1ELb1ELb0"
     "EEEvNS_10GateParams",
     "topk_gate VPT=1 fp16 replay"),
    ("_ZN9moe_route4cuda6detail16topk_gate_kernelILi16ELNS_9LogitTypeE1ELb0ELb0ELb1"
     "EEEvNS_10GateParams",
     "topk_gate VPT=16 fp16 half keys"),
    ("_ZN9moe_route4cuda6detail22topk_gate_kernel_statsILi8ELNS_9LogitTypeE2"
     "EEEvNS_10GateParamsENS1_8GatePlanE",
     "topk_gate VPT=8 bf16 half keys + stats"),
    ("_ZN9moe_route4cuda6detail21topk_gate_wide_kernelILi32ELNS_9LogitTypeE2ELb0"
     "EEEvNS_10GateParamsENS1_8WidePlanE",
     "topk_gate wide VPT=32 bf16 plain"),
    ("_ZN9moe_route4cuda6detail21topk_gate_wide_kernelILi16ELNS_9LogitTypeE0ELb1"
     "EEEvNS_10GateParamsENS1_8WidePlanE",
     "topk_gate wide VPT=16 fp32 full"),
    ("_ZN9moe_route4cuda6detail24topk_gate_grouped_kernelILNS_9LogitTypeE2EEEvNS_10GateParams"
     "ENS1_11GroupedPlanE",
     "topk_gate grouped bf16"),
    ("_ZN9moe_route4cuda6detail14permute_kernelILi16ELb0EEEvNS_13PermuteParamsEil",
     "permute 16-byte copies"),
    ("_ZN9moe_route4cuda6detail14permute_kernelILi2ELb1EEEvNS_13PermuteParamsEil",
     "permute 2-byte copies, per slot"),
    ("_ZN9moe_route4cuda6detail16unpermute_kernelI6__halfLi1EEEvNS_15UnpermuteParamsEil",
     "unpermute fp16 x1"),
    ("_ZN9moe_route4cuda6detail16plan_scan_kernelENS_10PlanParamsElPl", "plan_scan_kernel"),
])
def test_kernel_labels(mangled, label):
    assert kr.kernel_label(mangled) == label


@pytest.mark.parametrize("regs, cta_threads, warps", [
    (40, 256, 48),    # 51 warps' worth of registers, whole CTAs of 8 warps
    (48, 256, 40),
    (80, 256, 24),
    (128, 256, 16),
    (113, 256, 16),   # allocated as 120 per thread: 17 warps
    (255, 256, 8),
    (16, 256, 64),    # the 64-warp limit, not the register file
    (44, 1024, 32),   # one 32-warp CTA fits, two do not
])
def test_resident_warps(regs, cta_threads, warps):
    assert kr.resident_warps(regs, cta_threads) == warps
