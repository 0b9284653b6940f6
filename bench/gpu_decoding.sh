#!/usr/bin/env bash
# Decoding speed on a lent GPU (issue 18), in one short run: a dense model fine-tuned for a minute, pruned to
# the benchmark's plan (95.5% of non-embedding parameters removed) with a short distillation (the speed of a
# step depends on the shapes, not on how well the weights are trained: these artifacts are for timing, not
# for quality figures), then
#   - the CUDA-only tests of the decoding steps (compiled, graph-recorded) against the stock step,
#   - one request at a time (the service at concurrency 1): ms per top-10 request, lean / graphs / stock, each
#     under the catalog and the trie head,
#   - batches: users/s of ours (stock, lean, graphs) against HF generate, with their top-10 agreement
#     (in the CUDA default bf16, then in fp32),
#   - the served arms over HTTP at concurrency 1 and 16 (speedup_p50, throughput_gain),
#   - the compiled step against the recorded one on the pruned model (under a time limit: compiling is slow).
# usage (on the GPU machine, after ../shared/gpu/README.md's setup):  bash bench/gpu_decoding.sh OUT_DIR
# Knobs (environment): WORK (artifacts, default /tmp/prunerec-gpu-decoding), DEVICE (cuda), TRAIN_PROFILE and
# PRUNE_PROFILE (gpu; a CPU dry run: tiny and cpu), TRAIN_MINUTES (1), CALIBRATION (64 samples),
# DISTILL_STEPS (30), REQUESTS (32),
# USERS (64), BATCH (64).
set -uo pipefail
out=${1:?usage: bash bench/gpu_decoding.sh OUT_DIR}
work=${WORK:-/tmp/prunerec-gpu-decoding}; device=${DEVICE:-cuda}
mkdir -p "$out" "$work"
cli="python3 -m cli.main"
log() { echo "== $(date +%T) $*"; }
if [ ! -f "$work/dense/prunerec.json" ]; then
  log train
  $cli train --profile "${TRAIN_PROFILE:-gpu}" --max-minutes "${TRAIN_MINUTES:-1}" --output "$work/dense" || exit 1
fi
if [ ! -f "$work/pruned/3-depth/prunerec.json" ]; then
  log prune
  $cli prune "$work/dense" --output "$work/pruned" --profile "${PRUNE_PROFILE:-gpu}" --device "$device" --no-evaluate \
    --calibration-samples "${CALIBRATION:-64}" --distill-examples 512 --distill-max-steps "${DISTILL_STEPS:-30}" || exit 1
fi
dense=$work/dense; pruned=$work/pruned/3-depth
if [ "$device" = cuda ]; then
  log tests
  python3 -m pytest -q -p no:cacheprovider tests/llmrec/test_fast_step.py -k cuda 2>&1 | tail -5
fi
log decode_steps
python3 -m bench.decode_steps "$dense" "$pruned" --device "$device" --requests "${REQUESTS:-32}" \
  --steps lean,graphs,stock --heads catalog,trie --output "$out/decode_steps.json" || log decode_steps FAILED
log decoders
python3 -m bench.decoders "$dense" "$pruned" --device "$device" --users "${USERS:-64}" --batch-size "${BATCH:-64}" \
  --extra-steps graphs --output "$out/decoders.json" || log decoders FAILED
log decoders-fp32
# the same in fp32: bf16 rounding turns near-ties of the search into different lists; fp32 shows the decoders agree
python3 -m bench.decoders "$dense" "$pruned" --device "$device" --users "${USERS:-64}" --batch-size "${BATCH:-64}" \
  --extra-steps graphs --dtype float32 --output "$out/decoders_fp32.json" || log decoders-fp32 FAILED
log serving
# through the real service (its default step: graphs on CUDA), the two arms side by side
python3 -m bench.serve_latency --arm "dense=$dense" --arm "pruned=$pruned" --requests "${REQUESTS:-32}" \
  --concurrency 1 --concurrency 16 --output "$out/serve_latency.json" || log serving FAILED
if [ "$device" = cuda ]; then
  # last, under a time limit: compiling the step (torch.compile) against recording it, on the pruned model
  log compiled
  timeout "${COMPILE_SECONDS:-150}" python3 -m bench.decode_steps "$pruned" --device "$device" --requests "${REQUESTS:-32}" \
    --steps graphs,compiled,lean --output "$out/decode_steps_compiled.json" || log compiled FAILED or timed out
fi
log done
