#!/usr/bin/env bash
# The README's main job: installs what is missing, builds, starts two spectrumkvd daemons as
# separate processes on this machine (a prefill and a decode daemon, talking over UCX on TCP
# loopback), registers a prefill and a decode shared-memory KV pool through `spectrumkv
# fake-frontend` (vLLM NHD blocks of 16 -> vLLM HND blocks of 32), pushes a llama3-8b-shaped KV
# cache of 4096 tokens at budgets 1.0 (no compression), 0.5 and 0.3, verifies every row that
# arrived, checks both daemons' byte counters, and prints bytes on the wire, bytes saved and
# per-stage latency. Exits 0 on success and leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh build

work=$(mktemp -d /tmp/spectrumkv-main.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$work"
}
trap cleanup EXIT

start_daemon() {  # name
  cat > "$work/$1.yaml" <<YAML
node_name: $1
listen: {unix_socket: $work/$1.sock}
metrics: {address: "127.0.0.1:0"}
transport: {kind: ucx, address: "127.0.0.1:0", ucx_tls: tcp}
limits: {staging_bytes: 2GiB, max_inflight_bytes: 2GiB}
codec: {chunk_bytes: 4MiB, worker_threads: 2}
YAML
  build/bin/spectrumkvd --config "$work/$1.yaml" 2> "$work/$1.log" &
  pids+=($!)
  for _ in $(seq 1 100); do
    if build/bin/spectrumkv health --daemon "unix:$work/$1.sock" --timeout-s 1 >/dev/null 2>&1; then
      build/bin/spectrumkv info --daemon "unix:$work/$1.sock"
      return 0
    fi
    sleep 0.1
  done
  echo "spectrumkvd $1 did not start:" >&2
  cat "$work/$1.log" >&2
  return 1
}

start_daemon prefill
start_daemon decode
echo
build/bin/spectrumkv fake-frontend --sender "unix:$work/prefill.sock" \
  --receiver "unix:$work/decode.sock" --model llama3-8b --tokens 4096 --budgets 1.0 0.5 0.3 \
  --policy 3tier --check-metrics

for pid in "${pids[@]}"; do
  kill -TERM "$pid"
  wait "$pid"
done
pids=()
echo
echo "main job: OK (both daemons drained and exited 0)"
