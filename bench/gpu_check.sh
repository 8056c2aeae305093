#!/usr/bin/env bash
# One command for a GPU machine (no network; python3 with CUDA torch, nvcc, compute-sanitizer):
# builds the CUDA extension, checks that C++ errors reach Python, runs the kernel self-tests, the
# CUDA tests (tests/test_cuda.py and every per-op test's "cuda" variant), compute-sanitizer
# (memcheck, racecheck) over the self-tests and the CUDA op tests, the gate and dispatch
# benchmarks, and then the rest of the test suite. Everything lands in OUT_DIR: gpu_check.log,
# build.log, selftest_build.log, pytest_cuda.xml, pytest_cpu.xml, bench_gate_cuda.json and
# bench_dispatch_cuda.json. Each step has a time limit and the run a deadline (GPU_CHECK_SECONDS,
# default 570), so it ends within 10 minutes; a step that times out or finds no time left fails.
#
#   bash bench/gpu_check.sh OUT_DIR [ARCH]        # ARCH: TORCH_CUDA_ARCH_LIST, default 9.0a
#
# Wheels in .whl/ (e.g. a newer transformers, carried to a machine without network) are put on
# PYTHONPATH first. PYTHON picks the interpreter (default python3).
#
# For a session with less device time than a check and a tuning run in two calls take:
#   GPU_TUNE="NAME ..."     also A/B-times these bench/gpu_tune.py variants against this build:
#                           they build (niced, on this build's objects) while the tests run
#                           and are timed after the benchmarks, on an idle machine
#                           (OUT_DIR/gpu_tune.txt, .json)
#   GPU_CHECK_CPU_TESTS=0   leaves out the last step, the CPU tests (CI runs them), and their
#                           pytest_cpu.xml: with GPU_TUNE, OUT_DIR then holds 8 files, as many
#                           as the device tool brings back
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [ARCH]}
arch=${2:-9.0a}
mkdir -p "$out"
out=$(cd "$out" && pwd)
exec > >(tee "$out/gpu_check.log") 2>&1
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
jobs=$(nproc)
status=0
t0=$SECONDS
deadline=$((t0 + ${GPU_CHECK_SECONDS:-570}))  # the whole run, build included
step() { echo; echo "=== $* (at $((SECONDS - t0)) s)"; }
# run LIMIT_SECONDS CMD...: at most LIMIT seconds and never past the deadline; a failure, a
# timeout or a step skipped for want of time marks the run failed, and the run goes on.
run() {
  local limit=$1; shift
  local left=$((deadline - SECONDS - 10))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 5 ]; then echo "SKIPPED (no time left): $*"; status=1; return; fi
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "TIMED OUT after ${limit} s: $*"; status=1
  elif [ $rc -ne 0 ]; then echo "FAILED (exit $rc): $*"; status=1; fi
}
# test_deadline LIMIT: MOE_ROUTE_TEST_DEADLINE for a pytest step that run gives LIMIT seconds:
# tests due to start later are skipped (tests/conftest.py), so pytest still writes its summary
# and XML instead of being killed. 25 s are left for the tests running then and the summary.
test_deadline() {
  local limit=$1 left=$((deadline - SECONDS - 10))
  [ "$limit" -gt "$left" ] && limit=$left
  echo "MOE_ROUTE_TEST_DEADLINE=$(($(date +%s) + limit - 25))"
}

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
git rev-parse --short HEAD 2>/dev/null || true

if compgen -G ".whl/*.whl" >/dev/null; then
  step "carried wheels"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/moe_route_site .whl/*.whl \
    && export PYTHONPATH=/tmp/moe_route_site${PYTHONPATH:+:$PYTHONPATH}
  # installed without their requirements: if one the image lacks breaks the import, the image's
  # own packages run the check rather than nothing running
  if ! "$py" -c "import transformers; print('carried transformers', transformers.__version__)"; then
    echo "the carried wheels do not import (a requirement missing from this image?): using the image's packages"
    export PYTHONPATH=${PYTHONPATH#/tmp/moe_route_site}
    PYTHONPATH=${PYTHONPATH#:}
  fi
fi

# torch takes CUDA_HOME from the nvcc on PATH when it is unset: /usr/local for a
# /usr/local/bin/nvcc link, where no cuda_runtime.h lies. The toolkit's own folder is surer.
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
  export CUDA_HOME=/usr/local/cuda
fi
step "build (MOE_ROUTE_FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$arch, in place; self-tests alongside)"
cuda_arch=${arch//./}
# The torch-free GPU self-tests build in the background meanwhile (only those two targets: the
# host-emulator builds of the same self-tests are CI's).
( cmake -S . -B build/gpu -DMOE_ROUTE_CUDA_CHECK_ONLY=ON -DMOE_ROUTE_CUDA_ARCHS="$cuda_arch" \
    >/dev/null && cmake --build build/gpu -j $((jobs / 2 + 1)) --target moe_route_gate_selftest \
    moe_route_dispatch_selftest >/dev/null ) > "$out/selftest_build.log" 2>&1 &
selftest_build=$!
# ninja's compile lines go to build.log (the tail is shown if the build fails)
if ! MOE_ROUTE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$((jobs / 2 + 1)) \
    timeout 240 "$py" setup.py -q build_ext --inplace > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "build failed"; exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$py" -m moe_route.cli info

tune_work=/tmp/moe_route_tune
if [ -n "${GPU_TUNE:-}" ]; then
  step "gpu_tune variants building in the background (niced): $GPU_TUNE"
  # Copies of the tree, built while the tests run, and done by the time the benchmarks start,
  # which with the tuning's timing need about 260 s. A copy compiles only the sources its
  # changes reach and links this build's other objects, so it starts after this build.
  tune_budget=$((deadline - SECONDS - 260))
  if [ $tune_budget -lt 60 ]; then
    echo "SKIPPED: ${tune_budget} s left for the builds (raise GPU_CHECK_SECONDS)"; status=1
    GPU_TUNE=
  else
    rm -rf "$tune_work" "$tune_work.log"
    nice -n 19 "$py" bench/gpu_tune.py "$out" --build-only --work "$tune_work" --arch "$arch" \
      --budget $tune_budget --variants $GPU_TUNE > "$tune_work.log" 2>&1 &
    tune_build=$!
  fi
fi

step "C++ errors reach Python (each in a child process)"
# On the H200 runs of 2026-11-26 and 2026-11-29 each refusal raised in moe_route's C++ that the
# run reached ("dispatch_plan: ids must have k >= 1 columns") killed the process with SIGSEGV: the
# image's g++ (/opt/gcc, 13.3) linked libstdc++ statically, and the crash was in that copy's
# ostream. setup.py now links torch's shared libstdc++ there.
# raises CODE [ENV...]: exit 0 if CODE raises a Python exception, as it should.
raises() {
  local code=$1; shift
  env "$@" timeout 30 "$py" -c "import sys, torch
try:
    $code
except Exception as e:
    print('  raised', type(e).__name__); sys.exit(0)
print('  did not raise'); sys.exit(2)"
}
ours="import moe_route; torch.ops.moe_route.dispatch_plan(torch.zeros(2, 0, dtype=torch.int64),"
ours="$ours 3, 1)"
ours_failed=0
for code in "torch.zeros(2, 3) @ torch.zeros(4, 5)" \
    "import moe_route; torch.zeros(2, 3) @ torch.zeros(4, 5)" "$ours"; do
  echo "$code"
  for gpu in visible hidden; do
    [ $gpu = visible ] || echo "  the same without a visible GPU:"
    if ! raises "$code" $([ $gpu = visible ] || echo CUDA_VISIBLE_DEVICES=); then
      echo "  FAILED"; status=1
      [ "$code" != "$ours" ] || ours_failed=1
    fi
  done
done
if [ "$ours_failed" -eq 1 ]; then
  so=$(ls moe_route/_C*.so)
  echo "the C++ runtime our library links (a static copy shows no libstdc++ here):"
  readelf -dW "$so" | grep NEEDED
  if command -v cuda-gdb >/dev/null; then
    echo "the native stack of the crash (cuda-gdb):"
    run 90 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt --args "$py" -c "import torch
$ours"
  fi
fi

step "kernel self-tests (torch-free, against a host re-implementation)"
wait $selftest_build || { echo "FAILED: self-test build"; cat "$out/selftest_build.log"; status=1; }
run 30 ./build/gpu/moe_route_gate_selftest
run 30 ./build/gpu/moe_route_dispatch_selftest

# pytest's workers: 2 threads each and inductor's compiles in-process. With torch's defaults the
# 8 workers of the 2026-11-26 run each ran 16 threads and a pool of compile workers on 16 cores,
# and got through 26% of the suite in 180 s.
xdist=$("$py" -c "import xdist" 2>/dev/null && echo "-n 8")
workers=(env OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=1 HYPOTHESIS_PROFILE=ci)
step "CUDA tests (every test marked cuda: tests/test_cuda.py and each kernel test's cuda variant)"
run 150 "${workers[@]}" "$(test_deadline 150)" "$py" -m pytest -q -p no:cacheprovider $xdist \
  -m cuda tests --junitxml "$out/pytest_cuda.xml"

step "compute-sanitizer"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    for t in gate dispatch; do
      run 45 compute-sanitizer --tool "$tool" --error-exitcode 1 "./build/gpu/moe_route_${t}_selftest"
    done
  done
  # The op tests through torch. Without the caching allocator an out-of-bounds access is not
  # hidden inside a cached block (graph capture needs that allocator: no replay tests here).
  ops="agree or refused or rejected or skipped"
  run 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$(test_deadline 60)" compute-sanitizer \
    --tool memcheck --error-exitcode 1 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    -k "$ops"
  run 45 env "$(test_deadline 45)" compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "agree and not 4096"
else
  echo "compute-sanitizer not found"; status=1
fi

if [ -n "${GPU_TUNE:-}" ]; then
  step "gpu_tune variants: waiting for their builds"
  if ! wait $tune_build; then
    echo "FAILED: a variant's build (each log's tail is in gpu_tune.json)"; status=1
  fi
  cat "$tune_work.log"
fi

step "benchmarks (graph replay below 20 us, events with an L2 flush above)"
run 150 "$py" -m moe_route.cli bench --device cuda --full --compile --budget 75 \
  --json "$out/bench_gate_cuda.json"
run 150 "$py" -m moe_route.cli bench --op dispatch --device cuda --full --compile --budget 75 \
  --json "$out/bench_dispatch_cuda.json"

if [ -n "${GPU_TUNE:-}" ]; then
  step "gpu_tune: each variant against this build, on the cases of the kernels it changes"
  left=$((deadline - SECONDS - 15))
  run $left "$py" bench/gpu_tune.py "$out" --time-only --work "$tune_work" --budget $left
fi

step "the other tests (CPU; CI runs them too: here for this image's torch, Python and compiler)"
if [ "${GPU_CHECK_CPU_TESTS:-1}" = 0 ]; then
  echo "left out (GPU_CHECK_CPU_TESTS=0)"
else
  run 240 "${workers[@]}" "$(test_deadline 240)" "$py" -m pytest -q -p no:cacheprovider $xdist \
    -m "not cuda" tests --junitxml "$out/pytest_cpu.xml"
fi

echo; echo "gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED)" \
  "in $((SECONDS - t0)) s"
exit $status
