#!/usr/bin/env bash
# The GPU pass, in steps that each fit one device call (10 minutes; the machine starts bare, so
# every step installs first: about a minute with 16 cores).
#
#   bash benchmarks/gpu_pass.sh tests      # build + the whole suite (GPU tests included)
#   bash benchmarks/gpu_pass.sh tests tests/test_ops.py -k cuda   # or a part of it, if the whole
#                                          # suite outgrows one call (extra arguments go to pytest)
#   bash benchmarks/gpu_pass.sh bench      # ConvNeXt-T infer/train, every provider
#   bash benchmarks/gpu_pass.sh kernels    # kernels.py: each op vs eager / compile, stage shapes
#   bash benchmarks/gpu_pass.sh bench-sb   # ConvNeXt-S and -B, infer and train
#   bash benchmarks/gpu_pass.sh sanitize   # compute-sanitizer memcheck + racecheck on the CUDA tests
#   bash benchmarks/gpu_pass.sh train      # examples/train.py parity with the triton and cuda backends
#
# Logs and result files are packed into $OUT/gpu_pass_<step>.tar.gz (the device tool brings back
# at most 8 files); unpack its benchmarks/results/ into the repo and run
# `python benchmarks/readme_performance.py`.
set -uo pipefail
step=${1:?usage: gpu_pass.sh tests|bench|kernels|bench-sb|sanitize|train}
out=${OUT:-/tmp/gpu_pass_out}
work=$(mktemp -d)
mkdir -p "$out" "$work/logs"
cd "$(dirname "$0")/.."

export MAX_JOBS=${MAX_JOBS:-16}
# Only the arch of this GPU: a third of the compile time of the default "80;90a".
export CONVNEXT_KERNELS_CUDA_ARCHS=${CONVNEXT_KERNELS_CUDA_ARCHS:-90a}
{ time pip install --no-build-isolation --no-deps . ; } > "$work/logs/install.log" 2>&1 || {
  tail -50 "$work/logs/install.log"; exit 1; }
nvidia-smi > "$work/logs/nvidia-smi.txt" 2>&1
python -c "import convnext_kernels as c; print(c.build_info(), c.available_backends('cuda'))" \
  > "$work/logs/build_info.txt" 2>&1

results="$work/results"
mkdir -p "$results"
rc=0
case "$step" in
  tests)
    # Plain pytest: the installed package, not the source tree. Slowest tests listed for tuning.
    targets=("${@:2}")
    [ ${#targets[@]} -gt 0 ] || targets=(tests)
    pytest -q -p no:cacheprovider --durations=25 "${targets[@]}" > "$work/logs/tests.log" 2>&1 || rc=$?
    tail -40 "$work/logs/tests.log" ;;
  bench)
    # Separate from kernels: the compile providers (max-autotune) make each step minutes long.
    python benchmarks/throughput.py --model tiny --out "$results" > "$work/logs/throughput_tiny.log" 2>&1 || rc=$?
    tail -30 "$work/logs/throughput_tiny.log" ;;
  kernels)
    python benchmarks/kernels.py --out "$results" "${@:2}" > "$work/logs/kernels.log" 2>&1 || rc=$?
    tail -40 "$work/logs/kernels.log" ;;
  bench-sb)
    for model in small base; do
      python benchmarks/throughput.py --model "$model" --out "$results" > "$work/logs/throughput_$model.log" 2>&1 || rc=$?
      tail -15 "$work/logs/throughput_$model.log"
    done ;;
  sanitize)
    for tool in memcheck racecheck; do
      compute-sanitizer --tool "$tool" --error-exitcode 9 \
        pytest -q -p no:cacheprovider tests/test_cuda_kernels.py -k "not 32x" -x \
        > "$work/logs/sanitize_$tool.log" 2>&1 || rc=$?
      tail -15 "$work/logs/sanitize_$tool.log"
    done ;;
  train)
    for backend in triton cuda; do
      python examples/train.py --backend "$backend" --compare-reference --out "$results/train_$backend" \
        > "$work/logs/train_$backend.log" 2>&1 || rc=$?
      tail -6 "$work/logs/train_$backend.log"
    done ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
tar -czf "$out/gpu_pass_$step.tar.gz" -C "$work" logs results
echo "step $step finished with rc=$rc; packed $out/gpu_pass_$step.tar.gz"
exit $rc
