#!/bin/sh
# Bad command-line input to the spectrumkv command ends with the usage exit
# code (64) and a message, never an abort. The daemon address points nowhere:
# none of these may get as far as connecting.
set -u
cli="$1"
nowhere="unix:/nonexistent/spectrumkv-cli-check.sock"
fails=0

expect_usage() {
  "$cli" "$@" --daemon "$nowhere" --timeout-s 1 >/dev/null 2>&1
  rc=$?
  if [ "$rc" -ne 64 ]; then
    echo "FAIL (exit $rc, want 64): spectrumkv $*"
    fails=$((fails + 1))
  fi
}

send="send --request-id r --pool p --peer tcp://127.0.0.1:1"
expect_usage $send --tokens abc --blocks 0
expect_usage $send --tokens -1 --blocks 0
expect_usage $send --tokens 99999999999 --blocks 0
expect_usage $send --tokens 4 --blocks x
expect_usage $send --tokens 4 --blocks 5-3
expect_usage $send --tokens 4 --blocks 0-4294967295
expect_usage $send --tokens 4 --blocks 4294967296
expect_usage $send --tokens 4 --blocks ,
expect_usage $send --tokens 4 --blocks 0 --shard z
expect_usage $send --tokens 4 --blocks 0 --policy nonsense
expect_usage receive --request-id r --pool p --tokens 4 --blocks 1-
expect_usage cancel --request-id r --shard -2

# fake-frontend takes --sender, not --daemon.
for bad in "--pool-memory gpu" "--queries-via grpc"; do
  # shellcheck disable=SC2086
  "$cli" fake-frontend $bad --sender "$nowhere" >/dev/null 2>&1
  rc=$?
  if [ "$rc" -ne 64 ]; then
    echo "FAIL (exit $rc, want 64): spectrumkv fake-frontend $bad"
    fails=$((fails + 1))
  fi
done

# A well-formed call gets past parsing and fails on the connection instead
# (exit 69, service unavailable).
"$cli" cancel --request-id r --shard 2 --daemon "$nowhere" --timeout-s 1 >/dev/null 2>&1
rc=$?
if [ "$rc" -ne 69 ]; then
  echo "FAIL (exit $rc, want 69): a well-formed cancel against no daemon"
  fails=$((fails + 1))
fi

[ "$fails" -eq 0 ] && echo "all usage errors reported" || exit 1
