#!/usr/bin/env bash
# The README's main job: installs what is missing, builds, starts spectrumkvd and moves a
# llama3-8b-shaped KV cache of 4096 tokens between two registered shared-memory pools (vLLM NHD
# blocks of 16 -> vLLM HND blocks of 32) through Send and Receive at budgets 1.0, 0.5 and 0.3,
# verifies every row that arrived, checks the daemon's byte counters, and prints bytes on the
# wire, bytes saved and per-stage latency. Exits 0 on success and leaves nothing running.
#
# The daemon uses the in-process transport (sender and receiver are the same daemon) until the
# UCX transport lands; the codec, staging, chunking, verification and metrics are the real ones.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh build

work=$(mktemp -d /tmp/spectrumkv-main.XXXXXX)
daemon_pid=""
cleanup() {
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
    kill -TERM "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/daemon.yaml" <<YAML
node_name: main-job
listen: {unix_socket: $work/spectrumkvd.sock}
metrics: {address: "127.0.0.1:0"}
transport: {kind: inproc, address: main-job}
limits: {staging_bytes: 2GiB, max_inflight_bytes: 2GiB}
codec: {chunk_bytes: 16MiB, worker_threads: 2}
YAML

build/bin/spectrumkvd --config "$work/daemon.yaml" 2> "$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 1 100); do
  if build/bin/spectrumkv health --daemon "unix:$work/spectrumkvd.sock" --timeout-s 1 \
      >/dev/null 2>&1; then
    break
  fi
  sleep 0.1
done
build/bin/spectrumkv info --daemon "unix:$work/spectrumkvd.sock"
echo
build/bin/spectrumkv fake-frontend --sender "unix:$work/spectrumkvd.sock" \
  --model llama3-8b --tokens 4096 --budgets 1.0 0.5 0.3 --policy 3tier --check-metrics

kill -TERM "$daemon_pid"
wait "$daemon_pid"
daemon_pid=""
echo
echo "main job: OK (daemon drained and exited 0)"
