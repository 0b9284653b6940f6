"""The PruneRec stages and their pipeline (arXiv 2507.07064): width first (attention heads + residual width,
then MLP width), then depth, each stage recovered by distillation from the dense fine-tuned teacher.

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
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from llmrec.artifact import is_artifact, parameter_counts, read_manifest, write_artifact
from llmrec.model import load_model, select_device
from llmrec.prompting import PromptEncoder
from pruning import distill, importance
from pruning.calibration import (
    Batch,
    CalibrationConfig,
    TeacherTargets,
    calibration_batches,
    distillation_examples,
    teacher_targets,
)
from pruning.distill import DistillConfig
from pruning.evaluate import EvalConfig
from pruning.evaluate import run as evaluate_artifact
from pruning.examples import split_examples
from pruning.plan import DEFAULT_RATIOS, KeepRatios, Plan, has_attention_bias, plan_for_target, plan_from_ratios
from pruning.surgery import drop_layers, shape_of, slice_heads, slice_mlp, slice_residual
from pruning.trsp import TRSPConfig, trsp_depth
from pruning.vocab import ORIGINAL_TOKENIZER, prune_vocabulary
from recdata.prep import PreparedData
from recdata.prompts import PromptTemplate

logger = logging.getLogger(__name__)

STAGES = ("attn", "mlp", "depth", "vocab")
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
    """Share of non-embedding parameters to remove; derives a uniform plan (overrides ratios)."""
    ratios: KeepRatios = field(default_factory=lambda: DEFAULT_RATIOS)
    """Per-stage keep ratios (used when target is None)."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: bool = True
    """Evaluate every stage's artifact (and the teacher) after it is written."""
    eval_users: int | None = 100
    """Seeded sample of test users for the per-stage evaluation (None = all)."""
    num_beams: int = 20
    eval_batch_size: int = 16
    depth_method: Literal["greedy", "trsp", "elder"] = "greedy"
    """Depth stage: greedy removal by calibration loss (PruneRec), TRSP gates, or ELDeR (TRSP with λ1 = 0)."""
    trsp: TRSPConfig = field(default_factory=TRSPConfig)
    """Settings of the trsp/elder depth methods."""
    device: str | None = None
    """Where the teacher, the students, importance scoring and distillation run: cpu or cuda (default: cuda
    when available). Weights stay fp32 (on CUDA, matmuls use TF32)."""


PROFILES: dict[str, dict] = {
    # Minutes on 2 CPU cores: small calibration set, a few minutes of distillation per stage.
    "cpu": {"calibration": {"samples": 32, "batch_size": 8},
            "distill": {"examples": 512, "max_minutes": 4.0, "eval_every": 20, "valid_examples": 32, "batch_size": 8},
            "trsp": {"steps_per_round": 8, "stage_two_steps": 100, "stage_two_minutes": 4.0, "check_every": 20}},
    # One GPU: hundreds of calibration samples, an epoch over 20k examples per stage, every test user.
    "gpu": {"calibration": {"samples": 256, "batch_size": 32},
            "distill": {"examples": 20000, "epochs": 1.0, "eval_every": 200, "valid_examples": 256, "batch_size": 32},
            "trsp": {"steps_per_round": 40, "stage_two_steps": 1000, "check_every": 100, "batch_size": 32},
            "eval_users": None},
}


def apply_profile(config: PruneConfig, profile: str) -> PruneConfig:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    preset = PROFILES[profile]
    config.calibration = CalibrationConfig(**{**asdict(config.calibration), **preset.get("calibration", {})})
    config.distill = DistillConfig(**{**asdict(config.distill), **preset.get("distill", {})})
    config.trsp = TRSPConfig(**{**asdict(config.trsp), **preset.get("trsp", {})})
    if "eval_users" in preset:
        config.eval_users = preset["eval_users"]
    return config


def make_plan(model: PreTrainedModel, config: PruneConfig) -> Plan:
    shape, bias = shape_of(model), has_attention_bias(model.config)
    if config.target is not None:
        return plan_for_target(shape, config.target, bias)
    return plan_from_ratios(shape, config.ratios, bias)


# ------------------------------------------------------------------------------------------------
# the stages: importance -> physical slicing (distillation is applied by the pipeline)
# ------------------------------------------------------------------------------------------------


def prune_attention(
    model: PreTrainedModel, plan: Plan, calibration: list[Batch], targets: list[TeacherTargets]
) -> tuple[PreTrainedModel, dict]:
    """Stage 1: KV groups / query heads by ablation KL, then residual width by activation energy."""
    shape, goal = shape_of(model), plan.target
    record: dict = {}
    per_group = goal.heads // goal.kv_heads
    if goal.kv_heads < shape.kv_heads or per_group < shape.groups:
        level = "both"
        if per_group == shape.groups:
            level = "groups"
        elif goal.kv_heads == shape.kv_heads:
            level = "heads"
        scores = importance.head_importance(model, calibration, targets, level)
        keep_kv, keep_q = [], []
        for layer in range(shape.layers):
            groups = (
                scores["groups"][layer].topk(goal.kv_heads).indices.sort().values.tolist()
                if "groups" in scores else list(range(shape.kv_heads))
            )
            heads: list[int] = []
            for g in groups:
                members = list(range(g * shape.groups, (g + 1) * shape.groups))
                if "heads" in scores:
                    ranked = scores["heads"][layer, members].topk(per_group).indices.tolist()
                    heads += sorted(members[i] for i in ranked)
                else:
                    heads += members
            keep_kv.append(groups)
            keep_q.append(heads)
        model = slice_heads(model, keep_kv, keep_q)
        record["kept_kv_groups"], record["kept_heads"] = keep_kv, keep_q
        record["head_importance"] = {k: v.tolist() for k, v in scores.items()}
    if goal.hidden < shape.hidden:
        energy = importance.residual_importance(model, calibration)
        keep = energy.topk(goal.hidden).indices.sort().values
        model = slice_residual(model, keep)
        record["kept_residual_channels"] = keep.tolist()
    return model, record


def prune_mlp(model: PreTrainedModel, plan: Plan, calibration: list[Batch]) -> tuple[PreTrainedModel, dict]:
    """Stage 2: the top-K channels of every layer by |down_proj input| × column norm."""
    shape, goal = shape_of(model), plan.target
    if goal.intermediate >= shape.intermediate:
        return model, {}
    scores = importance.mlp_importance(model, calibration)
    keep = [row.topk(goal.intermediate).indices.sort().values.tolist() for row in scores]
    return slice_mlp(model, keep), {"kept_channels_per_layer": goal.intermediate}


def prune_depth(model: PreTrainedModel, plan: Plan, calibration: list[Batch]) -> tuple[PreTrainedModel, dict]:
    """Stage 3: greedy removal of whole layers minimising the calibration recommendation loss."""
    shape, goal = shape_of(model), plan.target
    if goal.layers >= shape.layers:
        return model, {}
    removed, losses = importance.greedy_layer_removal(model, calibration, shape.layers - goal.layers)
    return drop_layers(model, removed), {"removed_layers": removed, "calibration_loss_after_each": losses}


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------


def _stage_key(config: PruneConfig, stage: str, plan: Plan) -> dict:
    key = {
        "stage": stage, "teacher": str(Path(config.teacher).resolve()), "plan": plan.to_dict(),
        "calibration": asdict(config.calibration), "distill": asdict(config.distill), "stages": config.stages,
    }
    if stage == "depth" and config.depth_method != "greedy":
        key["depth_method"] = config.depth_method
        key["trsp"] = asdict(_trsp_settings(config))
    return key


def _same_key(saved: dict | None, key: dict) -> bool:
    """Stage keys match, ignoring the list of stages requested (adding a later stage resumes the earlier)."""
    if saved is None:
        return False
    return {k: v for k, v in saved.items() if k != "stages"} == {k: v for k, v in key.items() if k != "stages"}


def _trsp_settings(config: PruneConfig) -> TRSPConfig:
    settings = TRSPConfig(**asdict(config.trsp))
    if config.depth_method == "elder":
        settings.lambda1 = 0.0
    return settings


def stage_directory(output: Path, number: int, stage: str, config: PruneConfig) -> Path:
    """``<output>/<n>-<stage>``; a non-default depth method gets its own directory (``3-depth-trsp``), so
    that it can be compared with the greedy stage on the same width-pruned parent."""
    suffix = f"-{config.depth_method}" if stage == "depth" and config.depth_method != "greedy" else ""
    return output / f"{number}-{stage}{suffix}"


def run(config: PruneConfig, data: PreparedData) -> list[Path]:
    """Run the stages in order; returns the stage artifact directories."""
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
    encoder = PromptEncoder(tokenizer, template, int(manifest["max_history"]))
    pad_id = int(tokenizer.pad_token_id)
    plan = make_plan(teacher, config)
    logger.info("pruning plan:\n%s", plan.describe())

    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    if config.evaluate and "test" not in manifest.get("metrics", {}):
        evaluate_artifact(_eval_config(config, config.teacher), data)

    needs_calibration = any(stage != "vocab" for stage in config.stages)  # the vocab stage is exact: no data
    calibration = calibration_batches(data, encoder, config.calibration, pad_id) if needs_calibration else []
    targets = teacher_targets(teacher, calibration, config.calibration.top_k) if needs_calibration else []
    examples = distillation_examples(data, encoder, config.distill.examples, config.distill.seed)
    valid = split_examples(data, encoder, "valid", limit=config.distill.valid_examples, seed=config.distill.seed)
    cache = distill.TeacherCache(teacher, examples, pad_id, config.distill.top_k, config.distill.temperature)

    student: PreTrainedModel | None = None
    parent = config.teacher
    written: list[Path] = []
    for number, stage in enumerate(config.stages, start=1):
        directory = stage_directory(output, number, stage, config)
        key = _stage_key(config, stage, plan)
        if is_artifact(directory) and _same_key(read_manifest(directory).get("stage_key"), key):
            logger.info("stage %s already done: %s", stage, directory)
            resumed = load_model(directory, device=str(device), dtype=torch.float32)
            student = resumed.model
            if stage == "vocab":
                tokenizer = resumed.tokenizer
            parent = str(directory)
            written.append(directory)
            continue
        snapshot = output / f".{directory.name}.pruned"  # the cut student before distillation, for a rerun
        extras: dict[str, Any] = {}
        if stage != "vocab" and is_artifact(snapshot) and _same_key(read_manifest(snapshot).get("stage_key"), key):
            logger.info("stage %s: reusing the cut (not yet distilled) student in %s", stage, snapshot)
            student = load_model(snapshot, device=str(device), dtype=torch.float32).model
            snapshot_manifest = read_manifest(snapshot)
            before, record = snapshot_manifest["params_before"], snapshot_manifest["pruning"]
        else:
            if student is None:
                student = load_model(parent, device=str(device), dtype=torch.float32).model
            before = parameter_counts(student)
            logger.info("stage %s: pruning", stage)
            student, record, extras = _cut(stage, student, plan, config, calibration, targets, examples, valid, pad_id,
                                           tokenizer, template, data, manifest)
            if stage == "vocab":
                tokenizer = extras.pop(PRUNED_TOKENIZER)
            else:  # importance scoring can take minutes: keep the cut student until the stage artifact is written
                write_artifact(snapshot, student, tokenizer, data.catalog,
                               {"stage": f"{stage} (cut, not distilled)", "template": manifest["template"],
                                "max_history": manifest["max_history"], "stage_key": key, "params_before": before,
                                "pruning": record})
        if stage != "vocab":
            expected = replace(plan.after(stage), vocab=shape_of(student).vocab)
            if shape_of(student) != expected:
                raise RuntimeError(f"stage {stage} produced {shape_of(student)}, the plan says {expected}")
        logger.info("stage %s: %s -> %s params", stage, before["total"], parameter_counts(student)["total"])
        if stage == "vocab":
            distilled = {"skipped": "exact transformation: the kept tokens' logits are unchanged"}
        elif stage == "depth" and config.depth_method != "greedy" and not _trsp_settings(config).recovery:
            distilled = {"skipped": "recovery disabled (trsp.recovery = false)"}
        else:
            student, distilled = distill.run(config.distill, student, cache, valid, output / f".{directory.name}.ckpt")
        stage_manifest = {
            "stage": stage,
            "parent": parent,
            "teacher": config.teacher,
            "template": manifest["template"],
            "max_history": manifest["max_history"],
            "dataset": data.summary(),
            "stage_key": key,
            "stage_config": {"plan": plan.to_dict(), "calibration": asdict(config.calibration), "distill": asdict(config.distill),
                             **({"depth_method": config.depth_method, "trsp": key.get("trsp")} if stage == "depth" else {})},
            "calibration_fingerprint": f"{data.fingerprint}:train:{config.calibration.samples}:{config.calibration.seed}",
            "pruning": {k: v for k, v in record.items() if k != "kept_ids"},
            "distillation": distilled,
        }
        if stage == "vocab":
            stage_manifest["vocab"] = record
        write_artifact(directory, student, tokenizer, data.catalog, stage_manifest, extras or None)
        shutil.rmtree(snapshot, ignore_errors=True)
        if config.evaluate:
            evaluate_artifact(_eval_config(config, str(directory)), data)
        parent = str(directory)
        written.append(directory)
    summary = summarize(config.teacher, written)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return written


PRUNED_TOKENIZER = "pruned tokenizer"


def _cut(stage: str, student: PreTrainedModel, plan: Plan, config: PruneConfig, calibration: list[Batch],
         targets: list[TeacherTargets], examples: Any, valid: Any, pad_id: int, tokenizer: Any, template: PromptTemplate,
         data: PreparedData, manifest: dict) -> tuple[PreTrainedModel, dict, dict[str, Any]]:
    """Score and cut one stage (no distillation): (student, record, extras). The vocab stage's extras hold
    the original tokenizer (saved beside the artifact) and, under PRUNED_TOKENIZER, the pruned one."""
    if stage == "attn":
        student, record = prune_attention(student, plan, calibration, targets)
    elif stage == "mlp":
        student, record = prune_mlp(student, plan, calibration)
    elif stage == "depth" and config.depth_method == "greedy":
        student, record = prune_depth(student, plan, calibration)
    elif stage == "depth":
        remove = shape_of(student).layers - plan.target.layers
        student, record = trsp_depth(student, examples, valid, pad_id, remove, _trsp_settings(config))
    else:
        student, pruned_tokenizer, record = prune_vocabulary(student, tokenizer, template, data.catalog, int(manifest["max_history"]))
        return student, record, {ORIGINAL_TOKENIZER: tokenizer, PRUNED_TOKENIZER: pruned_tokenizer}
    return student, record, {}


def _eval_config(config: PruneConfig, artifact: str) -> EvalConfig:
    return EvalConfig(artifact=artifact, users=config.eval_users, num_beams=config.num_beams, batch_size=config.eval_batch_size,
                      device=config.device)


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
               "ndcg@10": mostpop["ndcg@10"], "hr@10": mostpop["hr@10"], "non_embedding_removed": float("nan")}
        if dense_metrics.get("ndcg@10"):
            row["ndcg@10_vs_dense"] = mostpop["ndcg@10"] / dense_metrics["ndcg@10"]
        rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'stage':<10}{'total':>13}{'non-emb':>13}{'removed':>9}{'NDCG@10':>9}{'HR@10':>8}{'NDCG/dense':>11}"]
    for r in rows:
        if r["artifact"] is None:
            lines.append(f"{r['name']:<10}{'':>13}{'':>13}{'':>9}{r['ndcg@10']:>9.4f}{r['hr@10']:>8.4f}"
                         f"{r.get('ndcg@10_vs_dense', float('nan')):>11.3f}")
            continue
        lines.append(
            f"{r['name']:<10}{r['params']['total']:>13,}{r['params']['non_embedding']:>13,}"
            f"{100 * r['non_embedding_removed']:>8.1f}%{r.get('ndcg@10', float('nan')):>9.4f}"
            f"{r.get('hr@10', float('nan')):>8.4f}{r.get('ndcg@10_vs_dense', float('nan')):>11.3f}"
        )
    users = rows[0].get("users") if rows else None
    if users:
        lines.append(f"NDCG@10 / HR@10 on {users} seeded test users (one hit in the top 10 moves HR@10 by {1 / users:.3f}).")
    zero = [r["name"] for r in rows if r.get("hr@10") == 0]
    if zero:
        lines.append(f"{', '.join(zero)}: 0.0000 means no user's next item was in that model's top 10; on a sample this "
                     "small and with minutes of CPU training that happens (more users: --eval-users; the real figures "
                     "need the gpu profile).")
    return "\n".join(lines)
