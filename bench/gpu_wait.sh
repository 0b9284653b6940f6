#!/usr/bin/env bash
# On the GPU machine: keep a device call busy while a background job (started with setsid nohup) runs, then bring
# its results back. Prints the log's last progress line every 20 s; returns when the log shows the job's
# "== HH:MM:SS done" line (bench/gpu_retention.sh, bench/gpu_decoding.sh) or after SECONDS (default 540, inside a
# call's 600). RESULTS (a directory) and the log are copied into $OUT at the start and after every 20 s, not only
# at the end: a call killed because the session's device time ran out still brings back $OUT, so it brings the
# latest reports (bench.retention rewrites its report after every evaluation). Call it again while it says
# "running"; give the last call SECONDS a little under the device time left (`status`'s budget_left_s).
# MAX_FILES (8): how many files a device call brings back.
# usage: bash bench/gpu_wait.sh LOG RESULTS [SECONDS]
log=${1:?usage: bash bench/gpu_wait.sh LOG RESULTS [SECONDS]}
results=${2:?usage: bash bench/gpu_wait.sh LOG RESULTS [SECONDS]}
limit=${3:-540}
started=$(date +%s)
# A device call brings back at most 8 files from $OUT (the rest are left out, whichever they are) of at most
# 16 MiB each, so the copy chooses: RESULTS whole as one archive, results.tar.gz (every report, plot and log: the
# curve's lease brought back two of its five arms' logs), then every JSON report on its own (readable without
# unpacking; a retention run's report.md and plot are drawn again from its report.json: python -m bench.retention
# --merge DIR --output DIR), then the log, then the other logs while room is left; what an earlier copy brought
# that this one does not choose is removed from $OUT. The archive is written beside $OUT and moved in, so a call
# killed while it is written leaves the previous one; one over 15 MiB is written again without the plots and
# the markdown, and left out (an earlier one removed) if it is still too large.
max_files=${MAX_FILES:-8}
archive=results.tar.gz
max_archive_bytes=$((15 * 1024 * 1024))
pack() {
  local staged
  staged=$(mktemp) || return 0
  tar -czf "$staged" -C "$results" . 2>/dev/null
  if [ "$(stat -c %s "$staged")" -gt "$max_archive_bytes" ]; then
    (cd "$results" && find . -type f \( -name '*.json' -o -name '*.log' \) -print0 | tar -czf "$staged" --null -T - 2>/dev/null)
  fi
  if [ "$(stat -c %s "$staged")" -le "$max_archive_bytes" ]; then mv -f "$staged" "$OUT/$archive"
  else rm -f "$staged" "$OUT/$archive"; fi  # not an earlier archive standing in for this one
}
bring() {
  [ -n "${OUT:-}" ] || return 0
  local chosen=() file keep
  if [ -d "$results" ]; then
    pack
    mapfile -t chosen < <(cd "$results" && { find . -type f -name '*.json' | sort; find . -type f -name '*.log' | sort; } \
      | sed 's|^\./||' | grep -vxF "$(basename "$log")" | head -n $((max_files - 2)))
  fi
  for file in "${chosen[@]}"; do
    mkdir -p "$OUT/$(dirname "$file")" && cp "$results/$file" "$OUT/$file" 2>/dev/null
  done
  cp "$log" "$OUT/" 2>/dev/null
  keep=$(printf '%s\n' "${chosen[@]}" "$(basename "$log")" "$archive")
  (cd "$OUT" && find . -type f | sed 's|^\./||' | while IFS= read -r file; do
    grep -qxF "$file" <<< "$keep" || rm -f "$file"; done)
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
