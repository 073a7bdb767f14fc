#!/usr/bin/env bash
# Runs the CUDA backend's tests, compute-sanitizer and the benchmark on a GPU machine from a
# folder of prebuilt binaries (see docs/BENCHMARKS.md, "CUDA codec"). Usage:
#   scripts/cuda_device_run.sh CARRY_DIR OUT_DIR [tests|sanitizer|bench|all]...
# CARRY_DIR holds bin/ (test and bench binaries) and lib/ (their non-system shared libraries).
set -uo pipefail
carry="$1"; out="$2"; shift 2
steps="${*:-all}"
export LD_LIBRARY_PATH="$carry/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin="$carry/bin"
has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
  | tee "$out/gpu.txt"
if has tests; then
  timeout 120 "$bin/cuda_crc_test" > "$out/crc_test.log" 2>&1; echo "cuda_crc_test rc=$?"
  timeout 300 "$bin/kernels_cuda_test" > "$out/cuda_test.log" 2>&1; echo "kernels_cuda_test rc=$?"
  timeout 300 "$bin/codec_conformance_test" > "$out/conformance.log" 2>&1
  echo "codec_conformance_test rc=$?"
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error|differ|Expected|Which is" \
    "$out/cuda_test.log" "$out/conformance.log" | head -60
fi
if has sanitizer; then
  timeout 400 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 \
    "$bin/kernels_cuda_test" --gtest_filter=-*Concurrent* > "$out/memcheck_cuda_test.log" 2>&1
  echo "memcheck kernels_cuda_test rc=$?"
  timeout 400 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$bin/codec_conformance_test" --gtest_filter=*cuda > "$out/memcheck_conformance.log" 2>&1
  echo "memcheck conformance rc=$?"
  tail -4 "$out/memcheck_cuda_test.log" "$out/memcheck_conformance.log"
fi
if has bench; then
  timeout 500 "$bin/codec_cuda_bench" --out "$out/bench.md" ${BENCH_ARGS:-} > "$out/bench.log" 2>&1
  echo "bench rc=$?"
  cat "$out/bench.log" | tail -40
fi
