#!/usr/bin/env bash
# Several retention configurations ("arms") in one GPU lease, side by side from one dense model (issue 17).
# A small student's distillation step waits on its host far more than on the card (one run kept an H100 ~2%
# busy), and the lent machine has 16 cores, so arms run at once: the probe and the dense model first (one
# bench/gpu_retention.sh with RETENTION=0, which also evaluates the dense model once for all), then one bench/gpu_retention.sh per arm in the background, each with
# its own knobs over the shared ones, its log in OUT/arm-NAME.log and its report in OUT/retention-NAME/.
# Every arm sees the same dense model, the same users and (with PROBE=1) a distillation batch chosen so that all
# arms' measured peaks fit the card together (`bench.throughput --lease-settings --arms N`). They share the
# card's arithmetic too: a stage capped in minutes gets fewer steps when the card is busy; each report's rows say
# how many steps every stage got. Prints each arm's last log line every 30 s and "== HH:MM:SS done" when all
# have ended (bench/gpu_wait.sh waits for it).
# usage: bash bench/gpu_arms.sh OUT_DIR NAME[:KNOB=VALUE[ KNOB=VALUE...]] ...
#   e.g. PROBE=1 EVERY_STAGE=1 TARGETS=0.955 ... bash bench/gpu_arms.sh OUT base catalog:VOCAB=catalog gradual:GRADUAL=2
# Shared knobs (environment) are gpu_retention.sh's; PROBE, TRAIN_*, WORK, ARM, ARMS and RETENTION are the whole
# run's, not an arm's.
set -uo pipefail
usage='usage: bash bench/gpu_arms.sh OUT_DIR NAME[:KNOB=VALUE[ KNOB=VALUE...]] ...'
out=${1:?$usage}
shift
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
log() { echo "== $(date +%T) $*"; }
names=()
settings=()
for spec in "$@"; do
  name=${spec%%:*}
  knobs=""
  [ "$name" != "$spec" ] && knobs=${spec#*:}
  [[ $name =~ ^[A-Za-z0-9_-]+$ ]] || { echo "arm name '$name': letters, digits, - and _ only" >&2; exit 2; }
  for known in "${names[@]}"; do
    [ "$known" = "$name" ] && { echo "arm $name given twice" >&2; exit 2; }
  done
  for knob in $knobs; do
    [[ $knob =~ ^[A-Z_]+=[^[:space:]]*$ ]] || { echo "arm $name: '$knob' is not KNOB=VALUE" >&2; exit 2; }
    case ${knob%%=*} in
      PROBE | TRAIN_* | WORK | ARM | ARMS | RETENTION)
        echo "arm $name: ${knob%%=*} is the whole run's, not an arm's: set it in the environment" >&2; exit 2 ;;
    esac
  done
  names+=("$name")
  settings+=("$knobs")
done
mkdir -p "$out"
export ARMS=${#names[@]}
log "probe and dense model (for ${ARMS} arms): $out/dense.log"
RETENTION=0 bash "$here/gpu_retention.sh" "$out" > "$out/dense.log" 2>&1
if ! [ -f "${WORK:-/tmp/prunerec-gpu-retention}/dense/prunerec.json" ]; then
  log "dense model FAILED:"
  tail -5 "$out/dense.log"
  log done
  exit 1
fi
if [ "${PROBE:-0}" = 1 ] && ! [ -s "$out/probe.json" ]; then  # not one probe per arm, all at once
  log "probe FAILED (dense.log): the arms run at the profiles' batches and rates"
  export PROBE=0
fi
threads=$(( $(nproc) / ARMS ))  # the host's cores divided among the arms, not each arm's torch taking them all
[ "$threads" -ge 1 ] || threads=1
for i in "${!names[@]}"; do
  # the arm's knobs are checked words KNOB=VALUE, split on purpose
  # shellcheck disable=SC2086
  env OMP_NUM_THREADS="$threads" ARM="${names[$i]}" ${settings[$i]} bash "$here/gpu_retention.sh" "$out" > "$out/arm-${names[$i]}.log" 2>&1 &
  log "arm ${names[$i]} ($threads threads): ${settings[$i]:-the shared settings}"
done
ticks=0
while [ -n "$(jobs -rp)" ]; do
  sleep 5
  ticks=$((ticks + 1))
  if [ $((ticks % 6)) = 0 ]; then
    for name in "${names[@]}"; do
      log "arm $name: $(tr '\r' '\n' < "$out/arm-$name.log" 2>/dev/null | grep -v '^$' | tail -1 | cut -c1-120)"
    done
  fi
done
for name in "${names[@]}"; do
  if grep -q 'FAILED' "$out/arm-$name.log"; then log "arm $name FAILED (arm-$name.log)"; else log "arm $name ended"; fi
done
log done
