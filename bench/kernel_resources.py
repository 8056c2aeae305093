"""Registers, spills and resident warps of every CUDA kernel, from ptxas; no GPU needed.

    python bench/kernel_resources.py [--arch sm_90a] [--filter gate]

Compiles every kernel unit (``csrc/cuda/*.cu`` but the self-tests) with ``nvcc -Xptxas -v``, as
many at once as there are cores (about four minutes on two), and prints one row per kernel.
"warps/SM" is what the register file holds (65,536 registers per SM, 64 warps at most,
allocation in units of 256 registers per warp), in whole CTAs of the kernel's launch size; shared
memory, which depends on the call, is not counted. These are the figures behind bench/RESULTS.md's
register tables; on a GPU, ``bench/gpu_profile.sh`` measures the achieved occupancy instead.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = tuple(sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu")
                      if not p.name.endswith("_selftest.cu")))
REGS_PER_SM, MAX_WARPS_PER_SM, REG_UNIT = 65536, 64, 256
CTA_THREADS = {"topk_gate_kernel": 256, "topk_gate_wide_kernel": 512, "permute_kernel": 256,
               "unpermute_kernel": 256, "plan_scan_kernel": 1024,
               "plan_one_cta_kernel": 1024,  # hist/scatter: vary with E
               "topk_gate_grouped_kernel": 256}  # a warp per group: DeepSeek-V3's 8

LOGIT_TYPES = {"0": "fp32", "1": "fp16", "2": "bf16"}
ELEM_TYPES = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}


def kernel_label(mangled: str) -> str:
    """A readable name for the kernels this project defines (else the mangled one)."""
    m = re.search(r"topk_gate_kernelILi(\d+)ELNS_9LogitTypeE(\d)ELb([01])ELb([01])ELb([01])",
                  mangled)
    if m:
        variant = ("replay" if m.group(4) == "1" else "full" if m.group(3) == "1"
                   else "half keys" if m.group(5) == "1" else "plain")
        return f"topk_gate VPT={m.group(1)} {LOGIT_TYPES[m.group(2)]} {variant}"
    m = re.search(r"topk_gate_kernel_statsILi(\d+)ELNS_9LogitTypeE(\d)E", mangled)
    if m:
        return f"topk_gate VPT={m.group(1)} {LOGIT_TYPES[m.group(2)]} half keys + stats"
    m = re.search(r"topk_gate_wide_kernelILi(\d+)ELNS_9LogitTypeE(\d)ELb([01])", mangled)
    if m:
        variant = "full" if m.group(3) == "1" else "plain"
        return f"topk_gate wide VPT={m.group(1)} {LOGIT_TYPES[m.group(2)]} {variant}"
    m = re.search(r"topk_gate_grouped_kernelILNS_9LogitTypeE(\d)E", mangled)
    if m:
        return f"topk_gate grouped {LOGIT_TYPES[m.group(1)]}"
    m = re.search(r"unpermute_kernelI(13__nv_bfloat16|6__half|f)Li(\d+)E", mangled)
    if m:
        return f"unpermute {ELEM_TYPES[m.group(1)]} x{m.group(2)}"
    m = re.search(r"permute_kernelILi(\d+)ELb([01])E", mangled)
    if m:
        return f"permute {m.group(1)}-byte copies{', per slot' if m.group(2) == '1' else ''}"
    m = re.search(r"(plan_\w+_kernel)", mangled)
    return m.group(1) if m else mangled


def resident_warps(regs: int, cta_threads: int) -> int:
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    warps = min(REGS_PER_SM // per_warp, MAX_WARPS_PER_SM)
    cta_warps = cta_threads // 32
    return warps // cta_warps * cta_warps


def parse_ptxas(text: str) -> list[tuple[str, int, int]]:
    """(mangled kernel, registers, spill-store bytes) per entry function in ptxas -v output."""
    rows, name, spill = [], None, 0
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name, spill = m.group(1), 0
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            spill = int(m.group(1))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            rows.append((name, int(m.group(1)), spill))
            name = None
    return rows


def _natural_order(row) -> str:
    """Sort key of a parse_ptxas row: its label with numbers compared as numbers (VPT=2 before
    VPT=16)."""
    return re.sub(r"\d+", lambda m: m.group().zfill(5), kernel_label(row[0]))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90a", help="nvcc -arch (default sm_90a)")
    ap.add_argument("--filter", default="", help="only kernels whose label contains this text")
    args = ap.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("kernel_resources: nvcc not found on PATH", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def compile_unit(src: str) -> subprocess.CompletedProcess:
            obj = Path(tmp) / (Path(src).stem + ".o")
            cmd = [nvcc, "-std=c++17", "-O3", f"-arch={args.arch}", "-I", str(ROOT / "csrc"),
                   "-Xptxas", "-v", "-c", str(ROOT / src), "-o", str(obj)]
            return subprocess.run(cmd, capture_output=True, text=True)

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for done in pool.map(compile_unit, SOURCES):
                if done.returncode != 0:
                    print(done.stderr, file=sys.stderr)
                    return done.returncode
                rows += parse_ptxas(done.stderr)
    print(f"{'kernel':<40} {'registers':>9} {'spilled B':>9} {'warps/SM':>8}   ({args.arch})")
    for mangled, regs, spill in sorted(rows, key=_natural_order):
        label = kernel_label(mangled)
        if args.filter not in label:
            continue
        cta = next((n for k, n in CTA_THREADS.items() if k in mangled), None)
        warps = str(resident_warps(regs, cta)) if cta else "-"
        print(f"{label:<40} {regs:>9} {spill:>9} {warps:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
