#!/usr/bin/env bash
# The retention curve (issue 17) sized to a short GPU lease (~10 minutes on one H100/H200 after setup): a dense
# model fine-tuned with the gpu profile under a time cap, pruned to each target with the gpu profile's
# calibration and a per-stage distillation cap, every test user evaluated (pure LLM), with MostPop and RecBole
# SASRec lines. Shorter budgets than `python -m bench.retention --profile gpu` (25 minutes): the report records
# every setting, so the figures say what they were measured with.
# usage (on the GPU machine, after ../shared/gpu/README.md's setup):  bash bench/gpu_retention.sh OUT_DIR
# Knobs (environment): WORK (/tmp/prunerec-gpu-retention), TRAIN_MINUTES (3), TARGETS (0.5,0.9,0.955), PLAN
# (uniform; default = one point, the plan `prunerec prune` uses without --target, and no TARGETS),
# DISTILL_MINUTES (0.3 per stage), DISTILL_EXAMPLES (5000), PRESET (none; prunerec for PruneRec's loss),
# GRADUAL (cuts per stage; none = 1), RECONSTRUCT (1; 0 = the paper's plain cut), VOCAB (full; catalog = the
# distillation loss over the catalog's tokens), SASREC_EPOCHS (50), DISTILL_STEPS (none; a step budget per stage,
# with DISTILL_MINUTES then only a safety stop), LR_DECAY (constant; linear or cosine decay the distillation rate
# to each stage's planned steps: pair it with DISTILL_STEPS), COMPILE (0; 1 = the decoder layers compiled while
# fine-tuning and distilling: `train --compile`, `--distill-compile`), TRAIN_BATCH / TRAIN_LR and DISTILL_BATCH /
# DISTILL_LR (packed rows a step and rates; none = the gpu profiles': 2 rows, 5e-5 and 3e-4), DISTILL_EPOCHS (the
# profile's 1; most passes over the distillation examples per stage), PROBE (0; 1 = first
# a ~1.5-minute sweep of 2, 8 and 16 packed rows of fine-tuning and distillation (both losses), `python -m bench.throughput`,
# written to OUT/probe.json (an OUT/probe.json already there is reused), and the distillation batch and
# sqrt-scaled rate it recommends (at most 1e-3) used where DISTILL_* are not given, except a PRESET's own rate: on
# a GPU that waits for its host, more rows a step cost little, so a stage of fixed minutes sees more data;
# fine-tuning keeps the profile's batch and rate, bench.throughput.lease_settings says why), EVERY_STAGE (0; 1 = every
# stage of every point evaluated, not only the last), HIDDEN (0; the hidden-state term's weight,
# --distill-hidden-weight), ARM (none; names the retention's work and report directories, retention-ARM, so that
# several configurations share one dense model: bench/gpu_arms.sh), ARMS (1; distillations sharing the card at
# once, for the probe's batch choice), RETENTION (1; 0 = stop after the probe, the dense model and its evaluation on
# all users, which every retention run of the same WORK then reuses), TEACHER_OUTPUTS (1: the teacher's
# distributions of the distillation rows computed before the first stage, once for every arm of the same WORK,
# in WORK/teacher-outputs; 0: on first use, in each arm's steps, as the leases before 2026-11-28 ran), PRUNE_SEED
# (0; the seed of the calibration sample, the distillation windows' packing and the batch order: `bench.retention
# --prune-seed`; two arms differing only in it measure the training's own noise).
# Over 10 minutes in all: start it with setsid nohup and keep
# the machine busy with `bash bench/gpu_wait.sh` (or ../shared/gpu/README.md's poll); a second configuration
# needs its own WORK.
# A 15-minute lease runs several configurations at once from one dense model through bench/gpu_arms.sh (one
# alone: the same knobs and bash bench/gpu_retention.sh OUT); the leases so far and the next one's command:
# README, "One GPU lease" (the first ran base catalog:VOCAB=catalog hidden:HIDDEN=1 gradual:GRADUAL=2 with
# PROBE=1 EVERY_STAGE=1 TARGETS=0.955 TRAIN_MINUTES=2 DISTILL_MINUTES=1 DISTILL_EXAMPLES=20000 DISTILL_EPOCHS=3
# SASREC_EPOCHS=0 in 12 minutes; the second, the curve, five targets in 11.8).
# Seen on an H200 (2026-11-26, a smoke run cut at 200 s): ~40 s of data preparation before training, training at
# ~4.2 steps/s (the gpu profile's 999 steps = ~4 min), every test user evaluated in ~12 s (plus loading), the
# attn stage's importance scoring ~18 s; with DISTILL_MINUTES 0.3 a target takes about 2 minutes, so the
# defaults come to ~10 minutes after setup.
set -uo pipefail
out=${1:?usage: bash bench/gpu_retention.sh OUT_DIR}
work=${WORK:-/tmp/prunerec-gpu-retention}
mkdir -p "$out" "$work"
log() { echo "== $(date +%T) $*"; }
if [ "${PROBE:-0}" = 1 ]; then
  log probe
  distill_variant="distill compact packed"
  [ "${VOCAB:-full}" = catalog ] && distill_variant="distill compact catalog packed"
  # both distillation losses measured, whichever this run uses: arms sharing the probe (gpu_arms.sh) may differ
  [ -f "$out/probe.json" ] || python3 -m bench.throughput --device cuda --batch-size 2,8,16 --pack-tokens 2048 \
    --variants "finetune compact packed,distill compact packed,distill compact catalog packed" --steps 4 --warmup 2 \
    --examples 3000 --output "$out/probe.json"
  if read -r probe_train_batch probe_train_lr probe_distill_batch probe_distill_lr < <(
      python3 -m bench.throughput --lease-settings "$out/probe.json" --distill-variant "$distill_variant" \
        --arms "${ARMS:-1}"); then
    TRAIN_BATCH=${TRAIN_BATCH:-$probe_train_batch} TRAIN_LR=${TRAIN_LR:-$probe_train_lr}
    DISTILL_BATCH=${DISTILL_BATCH:-$probe_distill_batch}
    [ -z "${PRESET:-}" ] && DISTILL_LR=${DISTILL_LR:-$probe_distill_lr}  # a preset keeps its own rate
    log "probe: train ${TRAIN_BATCH} rows at ${TRAIN_LR}, distill ${DISTILL_BATCH} rows at ${DISTILL_LR:-the preset rate}"
  else
    log "probe FAILED: the profiles' batches and rates"
  fi
fi
if [ ! -f "$work/dense/prunerec.json" ]; then
  log train
  options=()
  [ "${COMPILE:-0}" = 1 ] && options=(--compile)
  [ -n "${TRAIN_BATCH:-}" ] && options+=(--batch-size "$TRAIN_BATCH")
  [ -n "${TRAIN_LR:-}" ] && options+=(--lr "$TRAIN_LR")
  python3 -m cli.main train --profile gpu --max-minutes "${TRAIN_MINUTES:-3}" "${options[@]}" --output "$work/dense" || exit 1
fi
shared_eval="$work/retention-dense/eval"  # the dense model evaluated once for every arm (RETENTION=0)
if [ "${RETENTION:-1}" = 0 ]; then
  if [ ! -f "$shared_eval/dense.json" ]; then
    log "dense evaluation"
    python3 -m bench.retention "$work/dense" --profile gpu --users 0 --dense-only --work "$work/retention-dense" \
      --output "$work/retention-dense" || log "dense evaluation FAILED: each arm evaluates it"
  fi
  log done
  exit 0
fi
retention=retention${ARM:+-$ARM}
log "$retention"
if [ -f "$shared_eval/dense.json" ] && [ ! -f "$work/$retention/eval/dense.json" ]; then
  # reused by bench.retention when its users, seed and head match and the dense artifact is the same build
  mkdir -p "$work/$retention/eval" && cp "$shared_eval"/dense.* "$work/$retention/eval/"
fi
preset=()
[ -n "${PRESET:-}" ] && preset=(--distill-preset "$PRESET")
[ -n "${GRADUAL:-}" ] && preset+=(--gradual "$GRADUAL")
[ "${RECONSTRUCT:-1}" = 0 ] && preset+=(--no-reconstruct)
[ -n "${VOCAB:-}" ] && preset+=(--distill-vocab "$VOCAB")
[ -n "${DISTILL_STEPS:-}" ] && preset+=(--distill-steps "$DISTILL_STEPS")
[ -n "${LR_DECAY:-}" ] && preset+=(--distill-lr-decay "$LR_DECAY")
[ "${COMPILE:-0}" = 1 ] && preset+=(--distill-compile)
[ -n "${DISTILL_BATCH:-}" ] && preset+=(--distill-batch-size "$DISTILL_BATCH")
[ -n "${DISTILL_LR:-}" ] && preset+=(--distill-lr "$DISTILL_LR")
[ -n "${DISTILL_EPOCHS:-}" ] && preset+=(--distill-epochs "$DISTILL_EPOCHS")
[ "${EVERY_STAGE:-0}" = 1 ] && preset+=(--every-stage)
[ -n "${HIDDEN:-}" ] && preset+=(--distill-hidden-weight "$HIDDEN")
[ -n "${PRUNE_SEED:-}" ] && preset+=(--prune-seed "$PRUNE_SEED")
# the teacher's distributions of the distillation rows computed once, before the first stage, and shared by
# every arm of the same WORK (a lock: the first computes, the others load); TEACHER_OUTPUTS=0: on first use
[ "${TEACHER_OUTPUTS:-1}" = 1 ] && preset+=(--distill-teacher-outputs "$work/teacher-outputs")
points=(--targets "${TARGETS:-0.5,0.9,0.955}")
if [ "${PLAN:-uniform}" = default ]; then
  [ -n "${TARGETS:-}" ] && { log "PLAN=default is one point of its own size: no TARGETS"; log "$retention FAILED"; exit 2; }
  points=(--plan default)
fi
python3 -m bench.retention "$work/dense" --profile gpu --users 0 "${points[@]}" \
  --distill-minutes "${DISTILL_MINUTES:-0.3}" --distill-examples "${DISTILL_EXAMPLES:-5000}" "${preset[@]}" --sasrec-epochs "${SASREC_EPOCHS:-50}" \
  --work "$work/$retention" --output "$out/$retention" || log "$retention" FAILED
log done
