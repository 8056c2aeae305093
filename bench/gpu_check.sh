#!/usr/bin/env bash
# One command for a GPU machine (no network; torch with CUDA, nvcc, compute-sanitizer present):
# builds the CUDA extension, runs the kernel self-test, the test suite on cuda, compute-sanitizer
# (memcheck, racecheck) and the benchmarks. Everything lands in OUT_DIR (log, JSON, JUnit XML).
#
#   bash bench/gpu_check.sh OUT_DIR [ARCH]        # ARCH: TORCH_CUDA_ARCH_LIST, default 9.0a
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [ARCH]}
arch=${2:-9.0a}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
cd "$(dirname "$0")/.."
status=0
step() { echo; echo "=== $* ($(date +%T))"; }
run() { "$@" || { echo "FAILED: $*"; status=1; }; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
git rev-parse --short HEAD 2>/dev/null || true

step "build (MOE_ROUTE_FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$arch)"
MOE_ROUTE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} \
  python -m pip install --no-build-isolation --no-deps -e . || { echo "build failed"; exit 1; }
moe-route info

step "kernel self-test (torch-free, against a host re-implementation)"
cuda_arch=${arch//./}
cmake -S . -B build/gpu -DMOE_ROUTE_CUDA_CHECK_ONLY=ON -DMOE_ROUTE_CUDA_ARCHS="$cuda_arch" >/dev/null \
  && cmake --build build/gpu -j 16 >/dev/null
run ./build/gpu/moe_route_gate_selftest
run ./build/gpu/moe_route_dispatch_selftest

step "test suite (cuda tests included)"
run python -m pytest -q -p no:cacheprovider tests --junitxml "$out/pytest.xml"

step "compute-sanitizer"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    for t in gate dispatch; do
      run compute-sanitizer --tool "$tool" --error-exitcode 1 "./build/gpu/moe_route_${t}_selftest"
    done
  done
  # Without the caching allocator, out-of-bounds accesses are not hidden inside cached blocks.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run compute-sanitizer --tool memcheck --error-exitcode 1 \
    python -m pytest -q -p no:cacheprovider tests/test_gate_cuda.py
else
  echo "compute-sanitizer not found"; status=1
fi

step "benchmarks (CUDA-graph replay timings)"
run moe-route bench --device cuda --full --json "$out/bench_gate_cuda.json"
run moe-route bench --op dispatch --device cuda --full --json "$out/bench_dispatch_cuda.json"

echo; echo "gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED)"
exit $status
