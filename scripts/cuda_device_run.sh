#!/usr/bin/env bash
# Runs the CUDA backend's tests, compute-sanitizer and the benchmark on a GPU machine from a
# folder of prebuilt binaries (see docs/BENCHMARKS.md, "CUDA codec"). Usage:
#   scripts/cuda_device_run.sh CARRY_DIR OUT_DIR [tests|sanitizer|bench|gpu-pools|all]...
# CARRY_DIR holds bin/ (test and bench binaries) and lib/ (their non-system shared libraries).
# gpu-pools (CUDA IPC import and two daemons with GPU pools; not part of all) needs bin/spectrumkvd,
# bin/cuda_ipc_exporter, bin/cuda_memory_test, bin/cuda_ipc_integration_test, and ucx/ with the
# UCX modules (/usr/lib/x86_64-linux-gnu/ucx/*.so.0).
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
  timeout 150 "$bin/kernels_cuda_test" > "$out/cuda_test.log" 2>&1; echo "kernels_cuda_test rc=$?"
  timeout 150 "$bin/codec_conformance_test" > "$out/conformance.log" 2>&1
  echo "codec_conformance_test rc=$?"
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error|differ|Expected|Which is" \
    "$out/cuda_test.log" "$out/conformance.log" | head -60
fi
if has bench; then
  timeout 240 "$bin/codec_cuda_bench" --out "$out/bench.md" ${BENCH_ARGS:-} > "$out/bench.log" 2>&1
  echo "bench rc=$?"
  cat "$out/bench.log" | tail -40
fi
if has ncu; then
  # One launch of each main kernel at 16K llama3-8b tokens: bandwidth, issue and stall picture.
  timeout 150 ncu --kernel-name regex:"PackKernel|UnpackKernel|CrcRanges|TensorAttention|KeyNorm" \
    --launch-count 6 --section SpeedOfLight --section Occupancy --section WarpStateStats \
    "$bin/codec_cuda_bench" --models llama3-8b --tokens 16384 --budgets 0.5 \
    --scorings key_norm attention --small-tokens 0 --warmup 0 --reps 1 --no-self-test \
    > "$out/ncu.log" 2>&1
  echo "ncu rc=$?"
  grep -E "^  [A-Za-z].*\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Stall|L1/TEX Hit|Bank" "$out/ncu.log" | head -90
fi
if has sanitizer; then
  timeout 200 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 \
    "$bin/kernels_cuda_test" --gtest_filter=-*Concurrent* > "$out/memcheck_cuda_test.log" 2>&1
  echo "memcheck kernels_cuda_test rc=$?"
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$bin/codec_conformance_test" --gtest_filter=*cuda > "$out/memcheck_conformance.log" 2>&1
  echo "memcheck conformance rc=$?"
  tail -n 4 "$out/memcheck_cuda_test.log" "$out/memcheck_conformance.log"
fi
if [[ " $steps " == *" gpu-pools "* ]]; then  # not part of "all": it needs more binaries
  export UCX_MODULE_DIR="$carry/ucx" SPECTRUMKV_DAEMON_BIN="$bin/spectrumkvd" \
    SPECTRUMKV_IPC_EXPORTER_BIN="$bin/cuda_ipc_exporter"
  timeout 60 "$bin/cuda_memory_test" > "$out/cuda_memory_test.log" 2>&1
  echo "cuda_memory_test rc=$?"
  timeout 150 "$bin/cuda_ipc_integration_test" > "$out/cuda_ipc_integration_test.log" 2>&1
  echo "cuda_ipc_integration_test rc=$?"
  grep -h -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|^b=" \
    "$out/cuda_memory_test.log" "$out/cuda_ipc_integration_test.log" | head -60
fi
