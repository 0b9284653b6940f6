#!/usr/bin/env bash
# On the GPU machine: keep a device call busy while a background job (started with setsid nohup) runs, then bring
# its results back. Prints the log's last progress line every 20 s; returns when the log shows the job's
# "== HH:MM:SS done" line (bench/gpu_retention.sh, bench/gpu_decoding.sh) or after SECONDS (default 540, inside a
# call's 600). RESULTS (a directory) and the log are copied into $OUT at the start and after every 20 s, not only
# at the end: a call killed because the session's device time ran out still brings back $OUT, so it brings the
# latest reports (bench.retention rewrites its report after every evaluation). Call it again while it says
# "running"; give the last call SECONDS a little under the device time left (`status`'s budget_left_s).
# usage: bash bench/gpu_wait.sh LOG RESULTS [SECONDS]
log=${1:?usage: bash bench/gpu_wait.sh LOG RESULTS [SECONDS]}
results=${2:?usage: bash bench/gpu_wait.sh LOG RESULTS [SECONDS]}
limit=${3:-540}
started=$(date +%s)
bring() {
  [ -n "${OUT:-}" ] || return 0
  cp "$log" "$OUT/" 2>/dev/null
  [ -d "$results" ] && cp -r "$results"/. "$OUT/" 2>/dev/null
  return 0
}
state=running
while :; do
  bring
  if tr '\r' '\n' < "$log" 2>/dev/null | grep -q '^== [0-9:]* done'; then state=done; break; fi
  [ $(( $(date +%s) - started )) -ge "$limit" ] && break
  sleep 20
  echo "== $(date +%T) $(tr '\r' '\n' < "$log" 2>/dev/null | grep -v '^$' | tail -1 | cut -c1-160)"
done
bring
echo "== $state"
