#!/usr/bin/env bash
# The GPU pass, in steps that each fit one device call (10 minutes; the machine starts bare, so
# every step installs first). Extra arguments go to the step's command.
#
#   bash benchmarks/gpu_pass.sh all                    # tests, kernels, inference throughput in one
#                                                      #   call, each part under its own cap (below)
#   bash benchmarks/gpu_pass.sh tests                  # build + the GPU tests (pytest tests -m cuda)
#   bash benchmarks/gpu_pass.sh tests tests/test_ops.py -k cuda   # or other pytest arguments
#   bash benchmarks/gpu_pass.sh bench --bench infer    # throughput.py, ConvNeXt-T unless --model says
#   bash benchmarks/gpu_pass.sh bench --bench train    #   otherwise: one bench per call (the compile
#   bash benchmarks/gpu_pass.sh bench --model small --bench infer   #   providers take minutes each)
#   bash benchmarks/gpu_pass.sh kernels                # kernels.py: each op vs eager / compile, stages
#   bash benchmarks/gpu_pass.sh sanitize memcheck      # compute-sanitizer on the CUDA tests (one tool
#   bash benchmarks/gpu_pass.sh sanitize racecheck     #   per call)
#   bash benchmarks/gpu_pass.sh train                  # examples/train.py parity, triton and cuda
#   bash benchmarks/gpu_pass.sh host                   # host_overhead.py: host time per call (a minute)
#
# Logs and result files are packed into $OUT/gpu_pass_<step>.tar.gz (the device tool brings back
# at most 8 files) when the step ends, however it ends: each command runs under a time limit that
# leaves the packing its time (GPU_PASS_BUDGET_S, default 560 s from the start of this script).
# logs/timeline.txt says how long each part ran (for sizing the next pass). Unpack its results/
# into benchmarks/results/ and run `python benchmarks/readme_performance.py`.
#
# A task lent a GPU gets 15 minutes of device time in all, the machine's start (a minute or two)
# included, at most 10 minutes a call. So: `all` first (timeout_s 600); then, while the machine
# is still warm (30 s) and time is left, one more step with GPU_PASS_BUDGET_S set to fit, e.g.
# `bench --bench train`. A second call on the warm machine rebuilds little: pip builds in the
# source tree's build/ (ignored, so it stays between calls) and ninja recompiles nothing.
set -uo pipefail
step=${1:?usage: gpu_pass.sh all|tests|bench|kernels|sanitize|train|host [arguments]}
shift
out=${OUT:-/tmp/gpu_pass_out}
work=$(mktemp -d)
mkdir -p "$out" "$work/logs" "$work/results"
results="$work/results"
cd "$(dirname "$0")/.."
budget=${GPU_PASS_BUDGET_S:-560}

pack() {
  tar -czf "$out/gpu_pass_$step.tar.gz" -C "$work" logs results
  echo "step $step: packed $out/gpu_pass_$step.tar.gz"
}
trap pack EXIT

# run NAME CMD...: CMD under the time left (or under $cap seconds where that is less), output to
# logs/NAME.log, its tail printed, its exit status and seconds appended to logs/timeline.txt.
rc=0
run() {
  local name=$1
  shift
  local left=$((budget - SECONDS))
  if [ -n "${cap:-}" ] && [ "$cap" -lt "$left" ]; then left=$cap; fi
  if [ "$left" -le 10 ]; then
    echo "$name: skipped, no time left" | tee "$work/logs/$name.log"
    rc=124
    return
  fi
  # SIGINT, not SIGTERM: pytest then prints its failure summary, and the benchmark scripts write
  # the results measured so far (KeyboardInterrupt); whatever still runs 15 s later is killed.
  local start=$SECONDS
  timeout -s INT -k 15 "$left" "$@" > "$work/logs/$name.log" 2>&1
  local status=$?
  echo "$name exit=$status seconds=$((SECONDS - start)) limit=$left" >> "$work/logs/timeline.txt"
  # 124: stopped by SIGINT at the limit; 137: killed 15 s later, still running.
  { [ $status -eq 124 ] || [ $status -eq 137 ]; } && echo "$name: stopped at the time limit (${left}s)" >> "$work/logs/$name.log"
  [ $status -ne 0 ] && rc=$status
  echo "== $name (exit $status)"
  tail -30 "$work/logs/$name.log" | tr '\r' '\n' | tail -30
}

export MAX_JOBS=${MAX_JOBS:-16}
# CUDA on, not auto: a build that did not find nvcc fails here, instead of every CUDA test skipping.
export CONVNEXT_KERNELS_CUDA=${CONVNEXT_KERNELS_CUDA:-1}
# Only the arch of this GPU: a third of the compile time of the default "80;90a".
export CONVNEXT_KERNELS_CUDA_ARCHS=${CONVNEXT_KERNELS_CUDA_ARCHS:-90a}
run install pip install --no-build-isolation --no-deps .
[ $rc -ne 0 ] && exit $rc
nvidia-smi > "$work/logs/nvidia-smi.txt" 2>&1
# From outside the checkout: the installed package (the source tree has no built extension).
(cd /tmp && python -c "import convnext_kernels as c; print(c.build_info(), c.available_backends('cuda'))") \
  > "$work/logs/build_info.txt" 2>&1

# Plain pytest: the installed package, not the source tree. Slowest tests listed for tuning.
# The GPU tests are mostly Triton compiles (CPU-bound): spread over worker processes
# (pytest-xdist, on the image) they share the one GPU. GPU_PASS_WORKERS=0: one process.
workers=${GPU_PASS_WORKERS:-8}
xdist=()
if [ "$workers" != 0 ] && python -c "import xdist" 2>/dev/null; then xdist=(-n "$workers"); fi
pytest_cmd=(pytest -q -p no:cacheprovider --durations=25 "${xdist[@]}")

case "$step" in
  all)
    # Correctness first, then the kernel timings (issues 3 and 6), then inference images/s with
    # the baseline and the fused backends ahead of the compile providers (minutes each), so
    # that a cut leaves the figures that matter most. Every part keeps what it finished when its
    # cap stops it (pytest's summary; the scripts' records). Caps in seconds; the last part
    # gets what is left of GPU_PASS_BUDGET_S.
    cap=${GPU_PASS_TESTS_S:-220} run tests "${pytest_cmd[@]}" tests -m cuda
    # Kernels: the fused backends against eager only. Every other provider (compile, the tuning
    # variants) compiles and autotunes per case, and all of them over 16 cases would not fit the
    # cap: the `kernels` step times them.
    cap=${GPU_PASS_KERNELS_S:-150} run kernels python benchmarks/kernels.py --out "$results" \
      --providers eager,fused_triton,fused_cuda
    run throughput python benchmarks/throughput.py --out "$results" --model tiny --bench infer \
      --providers eager_channels_last,fused_triton,fused_cuda,compile,fused_compile,eager,resnet50 ;;
  tests)
    [ $# -gt 0 ] || set -- tests -m cuda
    run tests "${pytest_cmd[@]}" "$@" ;;
  bench)
    [ $# -gt 0 ] || set -- --model tiny --bench infer  # infer + train would not fit one call
    run throughput python benchmarks/throughput.py --out "$results" "$@" ;;
  kernels)
    run kernels python benchmarks/kernels.py --out "$results" "$@" ;;
  sanitize)
    tool=${1:-memcheck}
    # GPU target only (not the emulated "other_gpus" tests); not the test that launches an invalid
    # configuration on purpose. The GEMM
    # path test (the only one on mma.sync for 16-bit on an H100) runs without its profiler check:
    # CUPTI and the sanitizer exclude each other. Without torch's caching allocator every tensor
    # is its own cudaMalloc, so an access past one is out of bounds for memcheck (inside a cached
    # segment it would look valid). API errors are not reported: torch and the CUDA libraries
    # make some on purpose (probes); the package's own launches are checked after each call and
    # raise in the tests.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 CONVNEXT_KERNELS_TEST_PROFILER=0 run "sanitize_$tool" \
      compute-sanitizer --tool "$tool" --error-exitcode 9 --report-api-errors no \
      pytest -q -p no:cacheprovider tests/test_cuda_kernels.py -k "gpu and not 32x and not cuda_error and not other_gpus" -x ;;
  train)
    for backend in triton cuda; do
      run "train_$backend" python examples/train.py --backend "$backend" --compare-reference \
        --out "$results/train_$backend" --no-progress
    done ;;
  host)
    run host_overhead python benchmarks/host_overhead.py --out "$results" "$@" ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
echo "step $step finished with rc=$rc"
exit $rc
