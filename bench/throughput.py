"""Training throughput on this device: non-padding tokens per second of fine-tuning and of distillation.

Every variant runs through the one training engine (:class:`pruning.engine.Engine`) with the loss the
stages use (fine-tuning: the model's shifted CE; distillation: α·CE + (1 − α)·T²·KL against the teacher, the
teacher's outputs computed on first use as in :mod:`pruning.distill`), side by side in one process on the
same model, data and device:

- ``finetune d3``: the D3 instruction template, one example per row (padded to the longest in the batch);
- ``finetune d3 packed``: the same examples packed into rows of ``--pack-tokens`` (positions restart per
  example; :mod:`pruning.packing`);
- ``finetune compact``: the compact template's windows (one user's items, many targets per window), one
  window per row (about 135 tokens);
- ``finetune compact packed``: those windows packed into rows of ``--pack-tokens``: what the ``gpu`` profiles
  of fine-tuning and distillation train on (rows of 2048 tokens, ~15 windows each);
- ``finetune compact catalog`` and ``finetune compact catalog packed``: the same with the loss over the
  catalog's tokens (``prunerec train --loss-vocab catalog``: the LM head on a few thousand rows, at the
  labelled positions only);
- ``distill d3 packed``, ``distill compact`` and ``distill compact packed``: a student (the same model, or
  ``--student ARTIFACT``, e.g. a pruned stage) distilled from the teacher; ``distill compact catalog`` and
  ``distill compact catalog packed``: the same with the loss over the catalog's tokens (``prunerec prune
  --distill-vocab catalog``: the LM head on a few thousand rows).

Each variant takes ``--warmup`` steps untimed, then ``--steps`` timed steps; tokens are the non-padding
tokens of the timed batches. The first run is made twice and its first time discarded (``discarded_first_run``):
it pays the device's one-time costs. On CUDA the loss runs in bf16 autocast over fp32 weights with the fused AdamW
(the engine's mixed precision); on the CPU in fp32.

Two sweeps answer whether a step waits for the device or for the host (on a GPU, a small model's training
step can be all kernel launches): ``--batch-size 2,8,32`` runs every variant at each batch size (tokens/s
that grow with the batch at a near-constant step time: the host sets the pace), and ``--compile`` runs each
again with its decoder layers compiled (:func:`pruning.engine.compiled_layers`, what ``prunerec train
--compile`` does; every variant's warm-up is then at least 3 steps, so that a second row length's recompile
falls in it and both time the same batches; the warm-up's time is reported as ``warmup_seconds``).

A batch size that does not fit the GPU's memory is recorded as ``"oom": true`` and the sweep goes on; on CUDA
each run records its peak memory. ``--lease-settings REPORT`` turns a sweep into the batch and rate of a
short GPU run (:func:`lease_settings`; ``bench/gpu_retention.sh`` with ``PROBE=1`` does both).

    python -m bench.throughput --device cuda --batch-size 2,8,16 --pack-tokens 2048 \
        --variants "finetune compact packed,distill compact packed" --compile
    python -m bench.throughput --device cuda --batch-size 32 --pack-tokens 2048
    python -m bench.throughput --device cpu --steps 6     # writes bench/results/cpu/throughput.json
    python -m bench.throughput --model runs/bench-cpu/0-dense --student runs/bench-cpu/3-depth \
        --variants "distill compact,distill compact catalog"
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import math
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness import emit_json
from llmrec.model import DEFAULT_MODEL, load_model, select_device
from llmrec.prompting import PromptEncoder
from pruning import distill
from pruning.calibration import LossVocabulary, catalog_vocabulary, collate_batch, response_logits, response_targets
from pruning.engine import Engine, Schedule, adamw, compiled_layers
from pruning.examples import Example, collate, model_inputs, training_examples
from pruning.packing import pack
from pruning.train import catalog_loss
from recdata.prep import prepare
from recdata.prompts import get_template
from recdata.sources import read_ml100k

logger = logging.getLogger(__name__)


def device_slug(device: torch.device) -> str:
    """'cpu', or the GPU's name in lower case with dashes (e.g. 'nvidia-h100-80gb-hbm3')."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_list(items: list[Example]) -> list[Example]:
    return items


MIN_BATCH_GAIN = 1.25
"""A larger batch is only worth taking for a run of fixed minutes when it processes at least this many times
the tokens a second: at an equal rate it gives fewer, larger steps (fewer updates for the same tokens)."""

COMPILED_WARMUP = 3
"""Fewest untimed steps of a compiled variant: the first row length compiles, a second recompiles with
symbolic shapes; neither belongs in the timed steps."""


def measure(name: str, model: torch.nn.Module, rows: list[Example], loss_of: Any, batch_size: int, warmup: int,
            steps: int, device: torch.device, lr: float, profile_steps: int = 0, compile: bool = False) -> dict[str, Any]:
    """Train ``model`` on ``rows`` through the engine: ``warmup`` untimed steps, then ``steps`` timed, then
    ``profile_steps`` more under ``torch.profiler`` (apart from the timed ones, which it would slow down);
    with ``compile``, its decoder layers compiled throughout (give it at least :data:`COMPILED_WARMUP` warm-up
    steps, or the timed ones include compiling). A batch that does not fit the device's memory gives
    :func:`out_of_memory`'s record instead, so a sweep goes on."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = None
    try:
        with compiled_layers(model, compile):
            result = _measure(name, model, rows, loss_of, batch_size, warmup, steps, device, lr, profile_steps, compile)
    except torch.OutOfMemoryError:
        pass  # leaving the handler drops the exception and with it the failed run's frames and tensors
    if result is None:
        return out_of_memory(name, batch_size, compile, device)
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return result


def out_of_memory(name: str, batch_size: int, compile: bool, device: torch.device) -> dict[str, Any]:
    """The record of a run that did not fit the device's memory (its memory given back, so the sweep goes on)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    logger.warning("%s, %d rows a step: out of device memory", name, batch_size)
    return {"name": name, "compiled": compile, "batch_rows": batch_size, "oom": True}


def recommend(runs: list[dict[str, Any]], min_gain: float = MIN_BATCH_GAIN,
              memory_mb: float | None = None) -> dict[str, dict[str, Any]]:
    """Per variant, the batch (rows a step) to train with for a fixed number of minutes: from the smallest
    measured eager run up, each larger batch is taken if its tokens/s is at least ``min_gain`` times that of
    the batch taken so far (see :data:`MIN_BATCH_GAIN`); a batch that ran out of memory, or whose peak device
    memory exceeds ``memory_mb`` (a share of the card, when several runs share it), ends the walk. (The
    distillation variants time the dense model as its own student; a pruned student is smaller still, so its
    step waits on the host at least as much, and its memory is less.)
    Returns {variant: {batch_rows, tokens_per_s, gain (over the smallest batch), measured (the batch sizes)}}."""

    def fits(run: dict[str, Any]) -> bool:
        return not run.get("oom") and (memory_mb is None or run.get("peak_gpu_mb", 0) <= memory_mb)

    chosen: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["name"] for r in runs if not r.get("compiled")):
        measured = sorted((r for r in runs if r["name"] == name and not r.get("compiled")), key=lambda r: r["batch_rows"])
        fitting = list(itertools.takewhile(fits, measured))
        if not fitting:
            continue
        best = fitting[0]
        for run in fitting[1:]:
            if run["tokens_per_s"] >= min_gain * best["tokens_per_s"]:
                best = run
        chosen[name] = {"batch_rows": best["batch_rows"], "tokens_per_s": best["tokens_per_s"],
                        "gain": round(best["tokens_per_s"] / fitting[0]["tokens_per_s"], 2),
                        "measured": [r["batch_rows"] for r in measured]}
    return chosen


def sqrt_scaled_lr(lr: float, batch_rows: int, base_rows: int) -> float:
    """``lr`` for ``batch_rows`` rows a step when it was set for ``base_rows``: the square-root rule for Adam
    (Malladi et al., 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"), the rate grown
    with the square root of the batch, so a larger batch's fewer steps still move the weights about as far."""
    return lr * math.sqrt(batch_rows / base_rows)


CARD_SHARE = 0.85
"""Share of the card's memory that runs sharing it may plan on together (the rest: CUDA contexts, the
allocator's fragmentation, the evaluations' decoding)."""

MAX_DISTILL_LR = 1e-3
"""The highest distillation rate a scaled one may reach: on the benchmark's attention stage (CPU, 2026-11-27,
``bench/results/cpu/distill_batch_lr.json``) 1e-3 recovered the student at 8 and at 32 windows a step, while
2e-3 at 32 (the square-root rule from 1e-3 at 8) diverged (validation loss 3.55 → 4.55 after 20 steps)."""


def lease_settings(report: dict[str, Any], profile: str = "gpu", distillation: str = "distill compact packed",
                   arms: int = 1) -> dict[str, Any]:
    """Fine-tuning and distillation settings for a run of fixed minutes on the device a sweep measured.

    Fine-tuning keeps the profile's batch and rate (the ``gpu`` profile's 2 packed rows at 5e-5, 3 epochs): a
    throughput sweep cannot say what a larger batch does to the model, and on one H100 the 16 rows it picked
    (rate sqrt-scaled to 1.4e-4, the profile's 3 epochs = 126 steps, 2026-11-27) gave a dense NDCG@10 of 0.052 on
    all test users, against 0.082 for the profile's 951 steps (2026-11-25; README, "One GPU lease").
    Distillation takes the :func:`recommend`-ed batch, its rate :func:`sqrt_scaled_lr` from the profile's (3e-4 at
    2 rows), at most :data:`MAX_DISTILL_LR`; a variant the sweep lacks keeps the profile's. ``arms``:
    distillations that will share the card at once (``bench/gpu_arms.sh``): the distillation batch is then one
    whose measured peak fits :data:`CARD_SHARE` of the card's memory divided among them."""
    from pruning.distill import DistillConfig
    from pruning.prune import PROFILES as PRUNE_PROFILES
    from pruning.train import PROFILES as TRAIN_PROFILES
    from pruning.train import TrainConfig

    if arms < 1:
        raise ValueError(f"arms must be at least 1, got {arms}")
    total_mb = report.get("gpu_total_mb")
    memory_mb = CARD_SHARE * total_mb / arms if arms > 1 and total_mb else None
    chosen = recommend(report["runs"], memory_mb=memory_mb).get(distillation)
    train, distillation_profile = TRAIN_PROFILES[profile], PRUNE_PROFILES[profile].get("distill", {})
    batch, lr = distillation_profile.get("batch_size", DistillConfig.batch_size), distillation_profile.get("lr", DistillConfig.lr)
    rows = chosen["batch_rows"] if chosen else batch  # none measured, or none fits its share: the profile's
    return {"train_batch": train.get("batch_size", TrainConfig.batch_size), "train_lr": train.get("lr", TrainConfig.lr),
            "distill_batch": rows,
            "distill_lr": float(f"{min(sqrt_scaled_lr(lr, rows, batch), max(MAX_DISTILL_LR, lr)):.3g}")}


def _measure(name: str, model: torch.nn.Module, rows: list[Example], loss_of: Any, batch_size: int, warmup: int,
             steps: int, device: torch.device, lr: float, profile_steps: int, compile: bool) -> dict[str, Any]:
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = Schedule(batch_size=batch_size, epochs=math.inf, max_steps=warmup + steps + profile_steps, log_every=10**9)
    engine = Engine(model, optimizer, schedule, desc=name, autocast=True)
    seen = {"tokens": 0, "slots": 0, "rows": 0}

    def counted(items: list[Example]) -> torch.Tensor:
        lengths = [len(e.input_ids) for e in items]  # on the host: no device synchronisation
        seen["tokens"] += sum(lengths)
        seen["slots"] += max(lengths) * len(lengths)
        seen["rows"] += len(lengths)
        return loss_of(items)

    try:
        started = time.perf_counter()
        if warmup:
            engine.fit(rows, _as_list, counted, until_step=warmup)
        _sync(device)
        warmup_seconds = time.perf_counter() - started
        seen.update(tokens=0, slots=0, rows=0)
        started = time.perf_counter()
        engine.fit(rows, _as_list, counted, until_step=warmup + steps)
        _sync(device)
        seconds = time.perf_counter() - started
        tokens = seen["tokens"]
        profiled = None
        if profile_steps:
            profiled = profile_table(lambda: engine.fit(rows, _as_list, counted), device)
    finally:  # the progress bar closed also when the batch does not fit the device
        engine.close()
    seen["tokens"] = tokens
    result = {
        "name": name, "compiled": compile, "steps": steps, "seconds": round(seconds, 3),
        "ms_per_step": round(1000 * seconds / steps, 1), "warmup_steps": warmup, "warmup_seconds": round(warmup_seconds, 1),
        "tokens_per_s": round(seen["tokens"] / seconds, 1),
        "tokens_per_step": round(seen["tokens"] / steps, 1),
        "batch_rows": batch_size, "mean_row_tokens": round(seen["slots"] / max(seen["rows"], 1), 1),
        "padding_share": round(1 - seen["tokens"] / max(seen["slots"], 1), 3),
    }
    if profiled is not None:
        result["profile"] = {"steps": profile_steps, **profiled}
    logger.info("%s, %d rows a step: %.0f non-padding tokens/s (%d steps in %.1f s)", name, batch_size,
                result["tokens_per_s"], steps, seconds)
    return result


def profile_table(run: Any, device: torch.device, rows: int = 20) -> dict[str, Any]:
    """``run()`` under ``torch.profiler``: the operators taking the most time (on the GPU, its own kernel time;
    else the host's), and how the step's wall time splits between the device's work and the host's."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        run()
        _sync(device)
    wall_us = (time.perf_counter() - started) * 1e6
    averages = profiler.key_averages()
    on_device = device.type == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    top = sorted(averages, key=lambda event: getattr(event, key), reverse=True)[:rows]
    return {
        "wall_ms": round(wall_us / 1e3, 1),
        # GPU: the kernels' own time against the wall time; a small share means the host (launches, Python,
        # copies, synchronisations) is what the step waits for
        "device_busy_share": round(sum(getattr(e, key) for e in averages) / wall_us, 3) if on_device else None,
        "top": [{"op": event.key, "calls": event.count, "self_ms": round(getattr(event, key) / 1e3, 2),
                 "host_self_ms": round(event.self_cpu_time_total / 1e3, 2)} for event in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias, HF directory or artifact")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", default="8", help="rows per step; several, comma-separated, run every variant at each")
    parser.add_argument("--compile", action="store_true",
                        help="run every variant a second time with its decoder layers compiled (prunerec train --compile)")
    parser.add_argument("--pack-tokens", type=int, default=1024, help="row length of the packed variants")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--examples", type=int, default=2000, help="training examples (seeded) per variant")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate (small: the weights hardly move)")
    parser.add_argument("--student", default=None, help="artifact distilled in the distillation variants (default: the model)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after the timed steps, this many more under torch.profiler: the top operators and, on a "
                             "GPU, the share of the wall time its kernels were busy (in the JSON, per variant)")
    parser.add_argument("--variants", default=None, help="comma-separated variant names to run (default: all)")
    parser.add_argument("--output", type=Path, default=None, help="JSON path [bench/results/<device>/throughput.json]")
    parser.add_argument("--lease-settings", type=Path, default=None, metavar="REPORT",
                        help="measure nothing: print 'train_batch train_lr distill_batch distill_lr' for a run of fixed "
                             "minutes on the device REPORT (an earlier sweep's JSON) measured, from its packed compact "
                             "variants (for bench/gpu_retention.sh)")
    parser.add_argument("--distill-variant", default="distill compact packed",
                        help="with --lease-settings: the distillation variant to choose from (the catalog loss: "
                             "'distill compact catalog packed')")
    parser.add_argument("--arms", type=int, default=1,
                        help="with --lease-settings: distillations that will share the card at once (bench/gpu_arms.sh); "
                             "the distillation batch is then one whose measured peak memory fits their share")
    args = parser.parse_args()
    if args.lease_settings is not None:
        import json

        settings = lease_settings(json.loads(args.lease_settings.read_text()), distillation=args.distill_variant,
                                  arms=args.arms)
        print(settings["train_batch"], settings["train_lr"], settings["distill_batch"], settings["distill_lr"])
        return
    try:
        batch_sizes = [int(b) for b in str(args.batch_size).split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-size takes integers, got {args.batch_size!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        parser.error(f"--batch-size needs positive integers, got {args.batch_size!r}")
    modes = [False, True] if args.compile else [False]
    # with --compile every variant warms up as long as a compiled one must, so both time the same batches
    warmup = max(args.warmup, COMPILED_WARMUP) if args.compile else args.warmup
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    device = select_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    data = prepare(read_ml100k())
    loaded = load_model(args.model, device=str(device), dtype=torch.float32)
    base, tokenizer = loaded.model, loaded.tokenizer
    pad_id = int(tokenizer.pad_token_id)
    d3 = PromptEncoder(tokenizer, get_template("d3"), 10)
    compact = PromptEncoder(tokenizer, get_template("compact"), 10)
    d3_examples = training_examples(data, d3, packing=False, limit=args.examples, seed=0)
    windows = training_examples(data, compact, packing=True, limit=args.examples, seed=0)
    d3_packed = pack(d3_examples, args.pack_tokens, seed=0)
    windows_packed = pack(windows, args.pack_tokens, seed=0)

    catalog: LossVocabulary = catalog_vocabulary(base, compact, data, windows)

    def finetune_loss(model: Any, vocabulary: LossVocabulary | None) -> Any:
        def move(tensor: torch.Tensor) -> torch.Tensor:  # pinned, so the copy does not wait for the GPU
            return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor

        def batch_of(items: list[Example]) -> dict[str, torch.Tensor]:
            return {k: move(v) for k, v in collate(items, pad_id).items()}

        if vocabulary is not None:  # prunerec train --loss-vocab catalog
            on_device = vocabulary.to(device)
            return lambda items: catalog_loss(model, batch_of(items), on_device)
        return lambda items: model(**model_inputs(batch_of(items))).loss

    weights = distill.DistillConfig()  # the stages' loss weights

    def distill_loss(student: Any, cache: distill.TeacherCache) -> Any:
        index = {id(example): i for i, example in enumerate(cache.examples)}
        vocabulary = cache.vocabulary.to(device) if cache.vocabulary is not None else None

        def loss(items: list[Example]) -> torch.Tensor:
            teacher = cache.targets([index[id(e)] for e in items]).to(device)
            batch = collate_batch(items, pad_id).to(device)
            return distill.distillation_loss(response_logits(student, batch, vocabulary), response_targets(batch, vocabulary),
                                             teacher, weights.alpha, weights.temperature)

        return loss

    names = ["finetune d3", "finetune d3 packed", "finetune compact", "finetune compact packed", "finetune compact catalog",
             "finetune compact catalog packed", "distill d3 packed", "distill compact", "distill compact packed",
             "distill compact catalog", "distill compact catalog packed"]
    chosen = [n.strip() for n in args.variants.split(",")] if args.variants else names
    if unknown := sorted(set(chosen) - set(names)):
        parser.error(f"unknown variants {unknown}; choose from {names}")
    runs: list[dict[str, Any]] = []
    finetune = [(n, r, v) for n, r, v in (("finetune d3", d3_examples, None), ("finetune d3 packed", d3_packed, None),
                                          ("finetune compact", windows, None), ("finetune compact packed", windows_packed, None),
                                          ("finetune compact catalog", windows, catalog),
                                          ("finetune compact catalog packed", windows_packed, catalog)) if n in chosen]
    discarded: dict[str, Any] = {}

    def timed(name: str, model: torch.nn.Module, rows: list[Example], loss_of: Any, batch_size: int, compile: bool) -> None:
        """One run into ``runs``. The process's first is run twice and the first discarded: it also pays the
        device's one-time costs (CUDA context, cuBLAS handles, the allocator's first pools). On an H100
        (2026-11-27, bench/results/gpu/probe.json) the first run, fine-tuning at 2 rows, timed 1,322 ms a step
        after 2 warm-up steps against 380 ms at 8 rows measured next: that made the larger batch look 27x faster."""
        if not runs and not discarded:
            discarded.update(measure(name, model, rows, loss_of, batch_size, warmup, args.steps, device, args.lr, 0, compile))
        runs.append(measure(name, model, rows, loss_of, batch_size, warmup, args.steps, device, args.lr,
                            args.profile_steps, compile))

    for (name, rows, vocabulary), batch_size, compile in itertools.product(finetune, batch_sizes, modes):
        model = copy.deepcopy(base).train()
        timed(name + (" compiled" if compile else ""), model, rows, finetune_loss(model, vocabulary), batch_size, compile)
        del model
    teacher = copy.deepcopy(base).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    student_base = load_model(args.student, device=str(device), dtype=torch.float32).model if args.student else base
    distilled = [(n, r, v) for n, r, v in (("distill d3 packed", d3_packed, None), ("distill compact", windows, None),
                                           ("distill compact packed", windows_packed, None),
                                           ("distill compact catalog", windows, catalog),
                                           ("distill compact catalog packed", windows_packed, catalog)) if n in chosen]
    for (name, rows, vocabulary), batch_size, compile in itertools.product(distilled, batch_sizes, modes):
        student = copy.deepcopy(student_base).train()
        cache = distill.TeacherCache(teacher, rows, pad_id, top_k=64, temperature=weights.temperature, vocabulary=vocabulary)
        timed(name + (" compiled" if compile else ""), student, rows, distill_loss(student, cache), batch_size, compile)
        del student, cache

    slug = device_slug(device)
    report = {
        "device": slug, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "model": args.model,
        "precision": "bf16 autocast, fp32 weights, fused AdamW" if device.type == "cuda" else "fp32",
        "attention": getattr(base.config, "_attn_implementation", None),
        "student": args.student or args.model, "catalog_tokens": len(catalog),
        "gpu_total_mb": round(torch.cuda.get_device_properties(device).total_memory / 2**20) if device.type == "cuda" else None,
        "protocol": {"batch_rows": batch_sizes, "compiled": args.compile, "pack_tokens": args.pack_tokens, "steps": args.steps,
                     "warmup": args.warmup, "examples": args.examples,
                     "tokens": "non-padding tokens of the timed batches (student's, for distillation)"},
        "runs": runs,
        "discarded_first_run": discarded or None,  # the same run as runs[0], paying the device's one-time costs
        "recommended": recommend(runs),
    }
    emit_json(report, args.output or Path("bench/results") / slug / "throughput.json")


if __name__ == "__main__":
    main()
