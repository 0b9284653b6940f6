#!/usr/bin/env bash
# The retention curve (issue 17) sized to a short GPU lease (~10 minutes on one H100/H200 after setup): a dense
# model fine-tuned with the gpu profile under a time cap, pruned to each target with the gpu profile's
# calibration and a per-stage distillation cap, every test user evaluated (pure LLM), with MostPop and RecBole
# SASRec lines. Shorter budgets than `python -m bench.retention --profile gpu` (25 minutes): the report records
# every setting, so the figures say what they were measured with.
# usage (on the GPU machine, after ../shared/gpu/README.md's setup):  bash bench/gpu_retention.sh OUT_DIR
# Knobs (environment): WORK (/tmp/prunerec-gpu-retention), TRAIN_MINUTES (3), TARGETS (0.5,0.9,0.955),
# DISTILL_MINUTES (0.3 per stage), DISTILL_EXAMPLES (5000), PRESET (none; prunerec for PruneRec's loss),
# GRADUAL (cuts per stage; none = 1), RECONSTRUCT (1; 0 = the paper's plain cut), VOCAB (full; catalog = the
# distillation loss over the catalog's tokens), SASREC_EPOCHS (50), DISTILL_STEPS (none; a step budget per stage,
# with DISTILL_MINUTES then only a safety stop), LR_DECAY (constant; linear or cosine decay the distillation rate
# to each stage's planned steps: pair it with DISTILL_STEPS), COMPILE (0; 1 = the decoder layers compiled while
# fine-tuning and distilling: `train --compile`, `--distill-compile`). Over 10 minutes in all: start it with setsid nohup
# and poll (../shared/gpu/README.md); a second configuration needs its own WORK.
# Seen on an H200 (2026-11-26, a smoke run cut at 200 s): ~40 s of data preparation before training, training at
# ~4.2 steps/s (the gpu profile's 999 steps = ~4 min), every test user evaluated in ~12 s (plus loading), the
# attn stage's importance scoring ~18 s; with DISTILL_MINUTES 0.3 a target takes about 2 minutes, so the
# defaults come to ~10 minutes after setup.
set -uo pipefail
out=${1:?usage: bash bench/gpu_retention.sh OUT_DIR}
work=${WORK:-/tmp/prunerec-gpu-retention}
mkdir -p "$out" "$work"
log() { echo "== $(date +%T) $*"; }
if [ ! -f "$work/dense/prunerec.json" ]; then
  log train
  compile=()
  [ "${COMPILE:-0}" = 1 ] && compile=(--compile)
  python3 -m cli.main train --profile gpu --max-minutes "${TRAIN_MINUTES:-3}" "${compile[@]}" --output "$work/dense" || exit 1
fi
log retention
preset=()
[ -n "${PRESET:-}" ] && preset=(--distill-preset "$PRESET")
[ -n "${GRADUAL:-}" ] && preset+=(--gradual "$GRADUAL")
[ "${RECONSTRUCT:-1}" = 0 ] && preset+=(--no-reconstruct)
[ -n "${VOCAB:-}" ] && preset+=(--distill-vocab "$VOCAB")
[ -n "${DISTILL_STEPS:-}" ] && preset+=(--distill-steps "$DISTILL_STEPS")
[ -n "${LR_DECAY:-}" ] && preset+=(--distill-lr-decay "$LR_DECAY")
[ "${COMPILE:-0}" = 1 ] && preset+=(--distill-compile)
python3 -m bench.retention "$work/dense" --profile gpu --users 0 --targets "${TARGETS:-0.5,0.9,0.955}" \
  --distill-minutes "${DISTILL_MINUTES:-0.3}" --distill-examples "${DISTILL_EXAMPLES:-5000}" "${preset[@]}" --sasrec-epochs "${SASREC_EPOCHS:-50}" \
  --work "$work/retention" --output "$out/retention" || log retention FAILED
log done
