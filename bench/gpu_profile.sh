#!/usr/bin/env bash
# Nsight Compute counters of the CUDA kernels at issue 6's target shapes (bench/profile_cases.py),
# for the evidence behind a target that bench/gpu_check.sh reports missed: speed of light,
# memory workload (DRAM and L2 throughput, atomics), occupancy, warp stalls (with the source lines
# they sample: the builds carry -lineinfo), instructions executed, for the kernels of
# one call per case after two earlier calls, clocks left alone. Run it after gpu_check.sh on the
# same machine (it uses the extension gpu_check.sh built in place; else it builds it first).
#
#   bash bench/gpu_profile.sh OUT_DIR [CASE ...]     # default: every case; writes OUT_DIR/ncu.txt
set -uo pipefail
out=${1:?usage: bash bench/gpu_profile.sh OUT_DIR [CASE ...]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
command -v ncu >/dev/null || { echo "gpu_profile: ncu not found"; exit 1; }
if ! "$py" -c "from moe_route import _loader; assert _loader.has_kernel('topk_gate', 'cuda')" \
    2>/dev/null; then
  MOE_ROUTE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${ARCH:-9.0a} MAX_JOBS=$(nproc) \
    "$py" setup.py -q build_ext --inplace || { echo "gpu_profile: build failed"; exit 1; }
fi
cases=("$@")
[ ${#cases[@]} -gt 0 ] || mapfile -t cases < <("$py" bench/profile_cases.py --list | cut -d' ' -f1)
metrics=lts__t_requests_op_red.sum,lts__t_requests_op_atom.sum,dram__bytes.sum
metrics=$metrics,smsp__inst_executed.sum
status=0
for case in "${cases[@]}"; do
  read -r kernel launches < <("$py" bench/profile_cases.py --list |
                               awk -v c="$case" '$1 == c {print $2, $3}')
  [ -n "${kernel:-}" ] || { echo "gpu_profile: unknown case $case"; status=1; continue; }
  echo "=== $case (kernels ~ $kernel, $launches per call)" | tee -a "$out/ncu.txt"
  timeout 120 ncu --clock-control none --kernel-name "regex:$kernel" \
    --launch-skip $((2 * launches)) --launch-count "$launches" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters \
    --metrics "$metrics" \
    "$py" bench/profile_cases.py "$case" >> "$out/ncu.txt" 2>&1 \
    || { echo "gpu_profile: ncu failed on $case (see ncu.txt)"; status=1; }
done
echo "gpu_profile: $([ $status -eq 0 ] && echo done || echo SOME CASES FAILED); $out/ncu.txt"
exit $status
