#!/usr/bin/env bash
# The README's main job: installs what is missing, builds, and runs a codec round trip of a
# llama3-8b-shaped KV cache (4096 tokens) at budgets 1.0, 0.5 and 0.3, printing bytes saved,
# reconstruction error and throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh build
for budget in 1.0 0.5 0.3; do
  echo
  build/bin/spectrumkv codec --model llama3-8b --tokens 4096 --budget "$budget" --policy 3tier
done
