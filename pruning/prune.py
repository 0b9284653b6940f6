"""The PruneRec pipeline (arXiv 2507.07064): width first (attention heads + residual width, then MLP width),
then depth, each stage recovered by distillation from the dense fine-tuned teacher. The stages themselves are
in :mod:`pruning.stages`; this module holds the run's configuration, its profiles, the plan, the data shared
by the stages, the dispatch over :data:`pruning.stages.STAGES`, and the summary table.

Departures from the released code, on purpose: calibration uses many samples (not one), with padding
masked; distillation compares shifted response positions; shapes come from the model config (any
Llama/Qwen2/Mistral-family model, not hard-coded Qwen2-0.5B sizes); every stage writes an artifact that
stock ``AutoModelForCausalLM`` loads (uniform counts, explicit ``head_dim``), not a custom class.

Each stage writes ``<output>/<n>-<stage>`` and the run is resumable: a stage whose artifact exists with
the same configuration is loaded instead of recomputed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PretrainedConfig, PreTrainedModel

from llmrec import configs
from llmrec.artifact import is_artifact, read_manifest
from llmrec.model import load_model, select_device
from llmrec.prompting import PromptEncoder
from pruning import distill
from pruning.calibration import (
    CalibrationConfig,
    calibration_batches,
    catalog_vocabulary,
    distillation_examples,
    teacher_targets,
)
from pruning.distill import DistillConfig
from pruning.evaluate import run as evaluate_artifact
from pruning.examples import Example, split_examples, training_example_count
from pruning.packing import pack
from pruning.plan import (
    DEFAULT_RATIOS,
    KeepRatios,
    Plan,
    gradual_plans,
    has_attention_bias,
    plan_for_target,
    plan_from_ratios,
)
from pruning.stages import STAGES, SharedData, StageInputs, eval_config
from pruning.surgery import shape_of_config
from pruning.teacher_paths import teacher_paths
from pruning.trsp import TRSPConfig
from recdata.prep import PreparedData
from recdata.prompts import PromptTemplate

logger = logging.getLogger(__name__)

DEFAULT_STAGES = ("attn", "mlp", "depth")
"""The paper's stages; vocab (exact, past the paper) is opt-in: it changes what the `full` head normalises over."""


@dataclass
class PruneConfig:
    """A compression run from a dense fine-tuned artifact."""

    output: str
    """Run directory; stage artifacts go to <output>/<n>-<stage>."""
    teacher: str
    """The dense fine-tuned artifact: the first stage's input and every stage's distillation teacher."""
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    """Stages to run, in order (a subset of attn, mlp, depth, vocab)."""
    target: float | None = None
    """Share of non-embedding parameters to remove; derives a uniform plan (overrides ratios). Measured on one
    H100 from SmolLM2 with a minute of distillation a stage: 0.75 kept the dense NDCG@10 (1.04), 0.9 kept 0.86,
    0.955 kept 0.75 (README, "How much to remove")."""
    ratios: KeepRatios = field(default_factory=lambda: DEFAULT_RATIOS)
    """Per-stage keep ratios (used when target is None)."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    reconstruct: bool = True
    """Refit the layers that read a cut dimension (o_proj after heads, q/k/v/gate/up after residual width,
    down_proj after MLP channels) by least squares on the calibration tokens before distilling
    (:mod:`pruning.reconstruct`; past the paper, which leaves all of the repair to distillation)."""
    reconstruct_ridge: float = 1e-3
    """Ridge of the reconstruction's solve, relative to the mean variance of the kept inputs."""
    reconstruct_samples: int | None = None
    """Training samples the reconstruction's moments are gathered on (a seeded set drawn like the calibration
    set, with its seed); None: the calibration set itself. Importance scoring runs one ablation pass per KV
    group and one forward per layer-removal trial over the calibration set, the moments one pass: more tokens
    for the refits alone are cheap, and the wide readers (the attn stage's down_proj has 1,536 inputs) need
    more tokens than a small calibration set holds."""
    reconstruct_sequential: bool = False
    """After a stage's cut (and its per-cut refits), refit every linear layer of the cut model layer by layer
    on the stream the cut model itself produces, toward the parent's projections and stream
    (:func:`pruning.reconstruct.refit_sequential`); only with ``reconstruct``. Replaces the depth stage's
    down_proj refit. Off: on the cpu profile its attn-stage cut starts lower (CE 3.70 against 3.99) but
    distils worse at lr 1e-3 (3.29 against 2.00 after 40 steps) and no better at 3e-4 (1.63 against 1.60 after
    64; README, `prunerec prune`)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: bool = True
    """Evaluate every stage's artifact (and the teacher) after it is written."""
    eval_users: int | None = 100
    """Seeded sample of test users for the per-stage evaluation (None or 0 = all)."""
    num_beams: int = 20
    """Beams (= ranked list length) of the per-stage evaluation."""
    eval_batch_size: int = 16
    """Users decoded together in the per-stage evaluation."""
    depth_method: Literal["greedy", "trsp", "elder"] = "greedy"
    """Depth stage: greedy removal by calibration loss (PruneRec), TRSP gates, or ELDeR (TRSP with λ1 = 0)."""
    trsp: TRSPConfig = field(default_factory=TRSPConfig)
    """Settings of the trsp/elder depth methods."""
    gradual: int = 1
    """Cuts per width/depth stage (gradual pruning): 2 reaches each stage's part of the plan in two smaller
    cuts, each distilled (widths and depth shrink geometrically), artifacts numbered in order (1-attn, 2-attn,
    3-mlp, ...). The stage's distillation budget (steps, minutes, epochs) is split evenly over its cuts, so
    the total equals the one-cut path's."""
    stage_budget: list[float] | None = None
    """Multiplier of the distillation budget (steps, minutes, epochs) of each stage, in the order of
    ``stages`` (None: 1 each). A step on the last stage's small student costs a fraction of one on the attn
    stage's (on the cpu profile 1.1 s against 5.2 s), so a budget can lean toward the end."""
    device: str | None = None
    """Where the teacher, the students, importance scoring and distillation run: cpu or cuda (default: cuda
    when available). Weights stay fp32 (on CUDA, matmuls use TF32)."""


PROFILES: dict[str, dict] = {
    # Minutes on 2 CPU cores: small calibration set, 128 steps of 8 windows per stage drawn from every training
    # window, with the loss over the catalog's tokens. The budget is in steps, not minutes, so a busy machine
    # changes how long a stage takes, not what it produces (a 4-minute cap, until 2026-11-26, cut the attention
    # stage at 35-38 of its 64 steps); the minutes are a safety stop above what a stage here takes (the
    # attention stage's 128 steps: about 12 minutes). Every window, not a subset, since 2026-11-28: the teacher
    # runs only on the windows a step draws (1,024 distinct windows at 128 steps instead of 512 twice, +1.4
    # minutes of teacher passes), and from the hour-long CPU fine-tune (README, "A CPU teacher above MostPop")
    # each stage's CE over the catalog's tokens on all 943 valid users fell 0.946 / 0.913 / 0.993 -> 0.826 /
    # 0.837 / 0.893 (dense 0.631), NDCG@10 on all test users tied (80 against 86 hits at 95.5%). lr 1e-3 from a
    # sweep at one epoch over the whole vocabulary (README, `prunerec prune`): validation CE of the last stage on
    # all 943 valid users 1.84 against 2.51 at 3e-4 and 2.59 at 1e-4; NDCG@10 on all test users tied (31-36
    # hits each). The reconstruction's moments on 128 samples (importance stays on the calibration set's 32):
    # from the benchmark's dense model at 16 calibration samples, two seeds, the last stage's CE on all 943
    # valid users 1.220 / 1.238 against 1.297 / 1.763 with the moments on the 16. The catalog's tokens (since
    # 2026-11-26): the last stage's CE over them on all 943 valid users 1.137 against 1.300 at about the same
    # distillation time, NDCG@10 on all test users tied (36 against 34 hits; README, `--distill-vocab`).
    "cpu": {"calibration": {"samples": 32, "batch_size": 8}, "reconstruct_samples": 128,
            "distill": {"examples": None, "max_steps": 128, "max_minutes": 20.0, "lr": 1e-3, "eval_every": 20,
                        "valid_examples": 32, "batch_size": 8, "vocab": "catalog"},
            "trsp": {"steps_per_round": 8, "stage_two_steps": 100, "stage_two_minutes": 12.0, "check_every": 20}},
    # One GPU: hundreds of calibration samples, an epoch over the training windows per stage (packed into
    # rows of 2048 tokens, 2 rows ≈ the 32 windows a step had before), every test user. A checkpoint at most
    # every 5 minutes (a stage's validations come seconds apart on a GPU; see the train profile of that name).
    # The teacher's distributions of every row computed before the first stage, 8 rows a pass: a GPU step
    # waits on its host, and a teacher pass was ~95 ms of the first lease's 331 ms attention-stage step (the
    # hidden-state arm, which adds one a step, against base). On the CPU it buys nothing (512 windows: 87 s on
    # first use in the steps' batches of 8, 87 s prefilled 32 a pass), and the cpu profile's steps draw ~1,000
    # of its ~10,000 windows: a prefill would run the teacher on all of them, so cpu stays lazy.
    "gpu": {"calibration": {"samples": 256, "batch_size": 32},
            "distill": {"examples": 20000, "epochs": 1.0, "eval_every": 200, "valid_examples": 256, "batch_size": 2,
                        "pack_tokens": 2048, "checkpoint_minutes": 5.0, "prefill_batch_size": 8},
            "trsp": {"steps_per_round": 40, "stage_two_steps": 1000, "check_every": 100, "batch_size": 2},
            "eval_users": None},
}


def apply_profile(config: PruneConfig, profile: str) -> PruneConfig:
    """``config`` with the profile's values (nested: calibration, distill, trsp)."""
    return configs.apply_profile(config, PROFILES, profile)


def make_plan(model_config: PretrainedConfig, config: PruneConfig) -> Plan:
    """The run's plan for a model of this (Hugging Face) config: the uniform plan of ``config.target``, else
    ``config.ratios``."""
    shape, bias = shape_of_config(model_config), has_attention_bias(model_config)
    if config.target is not None:
        return plan_for_target(shape, config.target, bias)
    return plan_from_ratios(shape, config.ratios, bias)


def run(config: PruneConfig, data: PreparedData, on_stage: Callable[[Path], None] | None = None) -> list[Path]:
    """Run the stages in order (each from :data:`pruning.stages.STAGES`); returns their artifact directories.

    ``on_stage`` is called with each stage's artifact directory as soon as it is written (a caller that
    evaluates stages keeps what a cut-short run finished)."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown or not config.stages:
        raise ValueError(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    order = [s for s in STAGES if s in config.stages]
    if order != config.stages:
        raise ValueError(f"stages must run in the order {', '.join(STAGES)}")
    if not is_artifact(config.teacher):
        raise FileNotFoundError(f"{config.teacher} is not a prunerec artifact; run `prunerec train` first")
    manifest = read_manifest(config.teacher)
    template = PromptTemplate.from_dict(manifest["template"])
    device = select_device(config.device)
    if device.type == "cuda":  # fp32 weights for the recovery updates; TF32 tensor cores for the matmuls
        torch.backends.cuda.matmul.allow_tf32 = True
    logger.info("compressing on %s", device)
    loaded = load_model(config.teacher, device=str(device), dtype=torch.float32)
    teacher, tokenizer = loaded.model, loaded.tokenizer
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    plan = make_plan(teacher.config, config)
    logger.info("pruning plan:\n%s", plan.describe())

    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    if config.evaluate and "test" not in manifest.get("metrics", {}):
        evaluate_artifact(eval_config(config, config.teacher), data)
    shared = shared_data(config, data, teacher, tokenizer, template, int(manifest["max_history"]),
                         manifest.get("max_prompt_tokens"),
                         needs_calibration=any(not STAGES[s].exact for s in config.stages))

    inputs = StageInputs(number=0, parent=config.teacher, student=None, tokenizer=tokenizer, teacher=config.teacher,
                         teacher_manifest=manifest, template=template, data=data, plan=plan, device=device, shared=shared,
                         output=output)
    written: list[Path] = []
    scales = stage_scales(config)
    cuts = [(name, step_plan, len(plans)) for name in config.stages
            for plans in [gradual_plans(plan, name, config.gradual)] for step_plan in plans]
    for number, (name, step_plan, steps) in enumerate(cuts, start=1):
        inputs.number, inputs.plan = number, step_plan
        artifact = STAGES[name].run(split_budget(scale_budget(config, scales[name]), steps), inputs)
        inputs.parent, inputs.student, inputs.tokenizer = str(artifact.path), artifact.model, artifact.tokenizer
        written.append(artifact.path)
        if on_stage is not None:
            on_stage(artifact.path)
    summary = summarize(config.teacher, written)
    (output / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))  # strict JSON: jq, browsers
    return written


def stage_scales(config: PruneConfig) -> dict[str, float]:
    """Each stage's budget multiplier (``stage_budget``), checked against ``stages``."""
    if config.stage_budget is None:
        return {name: 1.0 for name in config.stages}
    if len(config.stage_budget) != len(config.stages) or any(f <= 0 for f in config.stage_budget):
        raise ValueError(f"stage_budget needs one positive multiplier per stage ({', '.join(config.stages)}), "
                         f"got {config.stage_budget}")
    return dict(zip(config.stages, config.stage_budget, strict=True))


def scale_budget(config: PruneConfig, factor: float) -> PruneConfig:
    """``config`` with its distillation budget (steps, minutes, epochs) multiplied by ``factor`` (steps rounded
    down, at least one)."""
    if factor == 1.0:
        return config
    budget = config.distill
    scaled = replace(
        budget,
        max_steps=max(1, int(budget.max_steps * factor + 1e-9)) if budget.max_steps is not None else None,
        max_minutes=budget.max_minutes * factor if budget.max_minutes is not None else None,
        epochs=budget.epochs * factor,
    )
    return replace(config, distill=scaled)


def split_budget(config: PruneConfig, cuts: int) -> PruneConfig:
    """``config`` with its per-stage distillation budget divided over a stage's ``cuts`` (gradual pruning)."""
    return scale_budget(config, 1 / cuts)


def shared_data(config: PruneConfig, data: PreparedData, teacher: PreTrainedModel, tokenizer: Any,
                template: PromptTemplate, max_history: int, max_prompt_tokens: int | None,
                needs_calibration: bool) -> SharedData:
    """Calibration batches with the teacher's outputs on them (skipped when no stage scores anything), and
    the distillation and validation examples with the teacher cache."""
    from llmrec.item_tokens import token_map

    # the students keep the teacher's item tokens (the surgery carries them), so one encoder serves both
    encoder = PromptEncoder(tokenizer, template, max_history, max_prompt_tokens, token_map(teacher, data.catalog.titles))
    pad_id = int(tokenizer.pad_token_id)
    calibration = calibration_batches(data, encoder, config.calibration, pad_id) if needs_calibration else []
    targets = teacher_targets(teacher, calibration, config.calibration.top_k) if needs_calibration else []
    if config.reconstruct_samples is not None and config.reconstruct_samples < 1:
        raise ValueError(f"reconstruct_samples must be positive, got {config.reconstruct_samples}")
    reconstruction = calibration
    if needs_calibration and config.reconstruct and config.reconstruct_samples is not None:
        reconstruction = calibration_batches(data, encoder, replace(config.calibration, samples=config.reconstruct_samples),
                                             pad_id)
        logger.info("reconstruction moments on %d training samples (importance on %d)",
                    sum(len(b.input_ids) for b in reconstruction), sum(len(b.input_ids) for b in calibration))
    examples = distillation_examples(data, encoder, config.distill.examples, config.distill.seed)
    used, available = len(examples), training_example_count(data, encoder, encoder.template.packable)
    if config.distill.pack_tokens:
        examples = pack(examples, config.distill.pack_tokens, config.distill.seed)
    valid = split_examples(data, encoder, "valid", limit=config.distill.valid_examples, seed=config.distill.seed)
    paths: list[Example] = []
    if config.distill.teacher_paths > 0:
        paths = teacher_paths(teacher, tokenizer, data, template, encoder, config.distill.teacher_path_prompts,
                              config.distill.teacher_paths, config.distill.seed, num_beams=config.num_beams,
                              batch_size=config.eval_batch_size, saved=Path(config.output) / "teacher-paths.json").examples
    distilled = [*examples, *paths]
    vocabulary = catalog_vocabulary(teacher, encoder, data, [*distilled, *valid]) if config.distill.vocab == "catalog" else None
    # shared: another run of this process from the same teacher on the same examples reuses its outputs
    cache = distill.TeacherCache(teacher, distilled, pad_id, config.distill.top_k, config.distill.temperature, vocabulary,
                                 shared=True)
    return SharedData(calibration, targets, examples, valid, pad_id, cache, examples_available=available,
                      examples_used=used, reconstruction=reconstruction,
                      path_indices=list(range(len(examples), len(distilled))))


def summarize(teacher: str, stages: list[Path]) -> list[dict]:
    """Per artifact: parameter counts and test metrics, with the ratio to the dense teacher."""
    rows = []
    dense = read_manifest(teacher)
    dense_metrics = dense.get("metrics", {}).get("test", {})
    for name, path in [("dense", Path(teacher)), *[(p.name, p) for p in stages]]:
        manifest = read_manifest(path)
        metrics = manifest.get("metrics", {}).get("test", {})
        row = {"name": name, "artifact": str(path), "params": manifest["params"]}
        for key in ("ndcg@10", "hr@10"):
            if key in metrics:
                row[key] = metrics[key]
                if dense_metrics.get(key):
                    row[f"{key}_vs_dense"] = metrics[key] / dense_metrics[key]
        row["non_embedding_removed"] = 1 - manifest["params"]["non_embedding"] / dense["params"]["non_embedding"]
        rows.append(row)
    evaluation = Path(teacher) / "eval" / "test.json"
    if evaluation.is_file():  # MostPop on the same users, for reference
        evaluated = json.loads(evaluation.read_text())
        mostpop = evaluated["mostpop"]
        rows[0]["users"] = evaluated.get("protocol", {}).get("users")
        row = {"name": "MostPop", "artifact": None, "params": {"total": 0, "embedding": 0, "non_embedding": 0},
               "ndcg@10": mostpop["ndcg@10"], "hr@10": mostpop["hr@10"], "non_embedding_removed": None}
        if dense_metrics.get("ndcg@10"):
            row["ndcg@10_vs_dense"] = mostpop["ndcg@10"] / dense_metrics["ndcg@10"]
        rows.append(row)
    return rows


def _cell(value: float | None, width: int, digits: int) -> str:
    """A metric right-aligned in ``width``, or a dash where there is none (a stage not evaluated)."""
    return f"{'-':>{width}}" if value is None or math.isnan(value) else f"{value:>{width}.{digits}f}"


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'stage':<10}{'total':>13}{'non-emb':>13}{'removed':>9}{'NDCG@10':>9}{'HR@10':>8}{'NDCG/dense':>11}"]
    for r in rows:
        metrics = _cell(r.get("ndcg@10"), 9, 4) + _cell(r.get("hr@10"), 8, 4) + _cell(r.get("ndcg@10_vs_dense"), 11, 3)
        if r["artifact"] is None:
            lines.append(f"{r['name']:<10}{'':>13}{'':>13}{'':>9}{metrics}")
            continue
        lines.append(f"{r['name']:<10}{r['params']['total']:>13,}{r['params']['non_embedding']:>13,}"
                     f"{100 * r['non_embedding_removed']:>8.1f}%{metrics}")
    unevaluated = [r["name"] for r in rows if r["artifact"] is not None and "ndcg@10" not in r]
    if unevaluated:
        lines.append(f"not evaluated: {', '.join(unevaluated)} (prunerec evaluate ARTIFACT, or run without --no-evaluate)")
    users = rows[0].get("users") if rows else None
    if users:
        lines.append(f"NDCG@10 / HR@10 on {users} seeded test users (one hit in the top 10 moves HR@10 by {1 / users:.3f}).")
    zero = [r["name"] for r in rows if r.get("hr@10") == 0]
    if zero:
        lines.append(f"{', '.join(zero)}: 0.0000 means no user's next item was in that model's top 10; on a sample this "
                     "small and with minutes of CPU training that happens (more users: --eval-users; the real figures "
                     "need the gpu profile).")
    return "\n".join(lines)
