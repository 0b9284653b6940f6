"""The compression stages of PruneRec (arXiv 2507.07064, §3.2–3.5) and the exact vocabulary stage.

Each stage is an object with the one shape ``stage.run(config, inputs) -> StageArtifact``: score and cut the
parent (``cut``, what differs between stages), check the result against the plan, recover it by
distillation from the dense teacher, write ``<output>/<n>-<stage>`` and evaluate it. The common part lives in
:meth:`Stage.run` once, and what a stage does differently is a method or a class attribute of it, so the
pipeline (:mod:`pruning.prune`) dispatches from :data:`STAGES` without knowing any stage by name.

- ``attn`` (§3.3): KV groups / query heads by ablation KL against the teacher, then residual width by
  activation energy; the readers of each cut refit by least squares (:mod:`pruning.reconstruct`, past the
  paper; ``reconstruct = False`` for the paper's plain cut);
- ``mlp`` (§3.3): the top channels of every layer by |down_proj input| × column norm, ``down_proj`` refit;
- ``depth`` (§3.4): greedy removal of whole layers by the calibration loss (each kept layer's ``down_proj``
  then refit to write what the removed layers after it wrote), or TRSP / ELDeR (:mod:`pruning.trsp`, arXiv
  2505.18232) as ``depth_method``;
- ``vocab`` (past the paper): embedding, LM head and tokenizer cut to the template and the catalog titles;
  exact (the kept tokens' logits are unchanged), so it needs no calibration data and no distillation.

A stage's cut student is kept as ``.<n>-<stage>.pruned`` until the stage's artifact is written, so a run
killed during distillation resumes without scoring again.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llmrec.artifact import is_artifact, parameter_counts, read_manifest, write_artifact
from llmrec.model import load_model
from pruning import distill, importance, reconstruct
from pruning.calibration import Batch, TeacherTargets
from pruning.evaluate import EvalConfig
from pruning.evaluate import run as evaluate_artifact
from pruning.examples import Example
from pruning.plan import Plan, stage_scope
from pruning.surgery import drop_layers, shape_of, slice_heads, slice_mlp, slice_residual
from pruning.trsp import TRSPConfig, trsp_depth
from pruning.vocab import ORIGINAL_TOKENIZER, prune_vocabulary
from recdata.prep import PreparedData
from recdata.prompts import PromptTemplate

if TYPE_CHECKING:
    from pruning.prune import PruneConfig

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# what the pipeline hands a stage, and what a stage hands back
# ------------------------------------------------------------------------------------------------


@dataclass
class SharedData:
    """Computed once per run from the teacher and the data, used by every stage that needs it."""

    calibration: list[Batch]
    """Calibration prompts for importance scoring."""
    targets: list[TeacherTargets]
    """The teacher's coarsened distribution on each calibration batch."""
    examples: list[Example]
    """Training examples distillation (and TRSP) trains on."""
    valid: list[Example]
    """Validation examples for early stopping."""
    pad_id: int
    cache: distill.TeacherCache
    """Teacher outputs per distillation example, computed on first use and shared by the stages."""
    examples_available: int = 0
    """Training examples (packed windows or samples) the split holds; ``examples`` may be a seeded subset."""
    examples_used: int = 0
    """Training examples distillation uses (before packing them into rows)."""
    reconstruction: list[Batch] = field(default_factory=list)
    """Batches the reconstruction's moments are gathered on: ``reconstruct_samples`` of them, else the
    calibration batches themselves."""
    path_indices: list[int] = field(default_factory=list)
    """The cache's teacher-path examples (after ``examples`` in it; ``DistillConfig.teacher_paths``)."""


@dataclass
class StageInputs:
    """What the pipeline gives a stage."""

    number: int
    """Position of the stage in the run (the n of ``<n>-<stage>``)."""
    parent: str
    """The parent artifact: the teacher for the first stage, else the previous stage's artifact."""
    student: PreTrainedModel | None
    """The parent's model when it is in memory (otherwise it is loaded from ``parent``)."""
    tokenizer: PreTrainedTokenizerBase
    """The parent's tokenizer."""
    teacher: str
    """The dense artifact every stage distils from."""
    teacher_manifest: dict
    template: PromptTemplate
    data: PreparedData
    plan: Plan
    device: torch.device
    shared: SharedData
    output: Path
    """The run directory."""


@dataclass
class StageArtifact:
    """A written stage: its directory, and its model and tokenizer in memory for the next stage."""

    path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


@dataclass
class Cut:
    """A stage's student after cutting, before recovery."""

    student: PreTrainedModel
    record: dict
    """What the stage chose (the manifest's ``pruning``)."""
    tokenizer: PreTrainedTokenizerBase | None = None
    """A new tokenizer (the vocab stage); None keeps the parent's."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Files written beside the artifact (the vocab stage's original tokenizer)."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """Further manifest entries (the vocab stage's ``vocab``, which serving reads)."""


# ------------------------------------------------------------------------------------------------
# the stage protocol: Stage.run is the one shape, the subclasses say what differs
# ------------------------------------------------------------------------------------------------


class Stage:
    """One compression stage. Subclasses implement :meth:`cut`; the rest has defaults."""

    name: ClassVar[str]
    exact: ClassVar[bool] = False
    """An exact transformation: no calibration data, no distillation, no check against the plan's shape."""

    def cut(self, config: PruneConfig, student: PreTrainedModel, inputs: StageInputs) -> Cut:
        raise NotImplementedError

    def directory(self, config: PruneConfig, inputs: StageInputs) -> Path:
        return inputs.output / f"{inputs.number}-{self.name}"

    def key(self, config: PruneConfig, inputs: StageInputs) -> dict:
        """What the stage's artifact must agree on to be reused by a later run."""
        distilled = distill.result_key(config.distill)
        # options at their defaults are absent from the key, as they were before the options existed: those
        # runs resume
        for name, default in (("vocab", "full"), ("lr_decay", "constant")):
            if distilled[name] == default:
                del distilled[name]
        key = {"stage": self.name, "teacher": str(Path(inputs.teacher).resolve()), "plan": inputs.plan.to_dict(),
               "calibration": asdict(config.calibration), "distill": distilled, "stages": config.stages}
        # in every stage's key, since a later stage's parent depends on it; absent when off, so that runs from
        # before reconstruction existed still resume
        if config.reconstruct:
            key["reconstruct"] = reconstruction_key(config)
        return key

    def settings(self, config: PruneConfig, inputs: StageInputs) -> dict:
        """The manifest's ``stage_config``."""
        return {"plan": inputs.plan.to_dict(), "calibration": asdict(config.calibration), "distill": asdict(config.distill),
                "reconstruct": reconstruction_key(config) if config.reconstruct else None}

    @staticmethod
    def _parent_map(inputs: StageInputs) -> distill.TeacherMap | None:
        """Where the parent's layers and channels came from in the teacher (None: an artifact from before
        stages recorded it)."""
        if inputs.parent == inputs.teacher:
            return distill.TeacherMap.identity(inputs.shared.cache.teacher)
        recorded = read_manifest(inputs.parent).get("teacher_map")
        return distill.TeacherMap(**recorded) if recorded else None

    def _ranking_check(self, config: PruneConfig, inputs: StageInputs, student: PreTrainedModel,
                       tokenizer: PreTrainedTokenizerBase) -> Any:
        """NDCG@10 of ``student`` on seeded validation users when distillation selects on it (else None)."""
        if config.distill.select_metric != "ndcg@10":
            return None
        from pruning.evaluate import RankingCheck

        manifest = inputs.teacher_manifest
        return RankingCheck(student, tokenizer, inputs.data, inputs.template, int(manifest["max_history"]),
                            config.distill.select_users, config.distill.seed, config.num_beams,
                            max_prompt_tokens=manifest.get("max_prompt_tokens"))

    def recovery_skipped(self, config: PruneConfig) -> str | None:
        """Why the stage is not distilled (None: it is)."""
        return "exact transformation: the kept tokens' logits are unchanged" if self.exact else None

    def run(self, config: PruneConfig, inputs: StageInputs) -> StageArtifact:
        """Cut (or reuse an earlier run's work), recover, write ``<output>/<n>-<stage>``, evaluate."""
        directory = self.directory(config, inputs)
        key = self.key(config, inputs)
        device = str(inputs.device)
        if is_artifact(directory) and same_key(read_manifest(directory).get("stage_key"), key):
            logger.info("stage %s already done: %s", self.name, directory)
            done = load_model(directory, device=device, dtype=torch.float32)
            return StageArtifact(directory, done.model, done.tokenizer)

        snapshot = inputs.output / f".{directory.name}.pruned"  # the cut student before distillation
        if not self.exact and is_artifact(snapshot) and same_key(read_manifest(snapshot).get("stage_key"), key):
            logger.info("stage %s: reusing the cut (not yet distilled) student in %s", self.name, snapshot)
            snapshot_manifest = read_manifest(snapshot)
            cut = Cut(load_model(snapshot, device=device, dtype=torch.float32).model, snapshot_manifest["pruning"])
            before = snapshot_manifest["params_before"]
        else:
            parent = inputs.student
            if parent is None:
                parent = load_model(inputs.parent, device=device, dtype=torch.float32).model
            before = parameter_counts(parent)
            logger.info("stage %s: pruning", self.name)
            cut = self.cut(config, parent, inputs)
            if not self.exact:  # importance scoring can take minutes: keep the cut until the artifact is written
                write_artifact(snapshot, cut.student, inputs.tokenizer, inputs.data.catalog,
                               {"stage": f"{self.name} (cut, not distilled)", **self._lineage(inputs), "stage_key": key,
                                "params_before": before, "pruning": cut.record})
        student = cut.student
        tokenizer = cut.tokenizer if cut.tokenizer is not None else inputs.tokenizer
        if not self.exact:
            expected = replace(inputs.plan.after(self.name), vocab=shape_of(student).vocab)
            if shape_of(student) != expected:
                raise RuntimeError(f"stage {self.name} produced {shape_of(student)}, the plan says {expected}")
        logger.info("stage %s: %s -> %s params", self.name, before["total"], parameter_counts(student)["total"])

        parent_map = self._parent_map(inputs)
        teacher_map = parent_map.after(cut.record) if parent_map is not None else None
        skipped = self.recovery_skipped(config)
        if skipped is not None:
            distilled: dict = {"skipped": skipped}
        else:
            checkpoint = inputs.output / f".{directory.name}.ckpt"
            student, distilled = distill.run(config.distill, student, inputs.shared.cache, inputs.shared.valid, checkpoint,
                                             ranking=self._ranking_check(config, inputs, student, tokenizer),
                                             teacher_map=teacher_map, path_indices=inputs.shared.path_indices)
            distilled = {**distilled, "examples_used": inputs.shared.examples_used,
                         "examples_available": inputs.shared.examples_available}
        manifest = {
            "stage": self.name, "parent": inputs.parent, "teacher": inputs.teacher, **self._lineage(inputs),
            "dataset": inputs.data.summary(), "stage_key": key, "stage_config": self.settings(config, inputs),
            "calibration_fingerprint": f"{inputs.data.fingerprint}:train:{config.calibration.samples}:{config.calibration.seed}",
            "pruning": cut.record, "distillation": distilled, **cut.manifest,
            "teacher_map": asdict(teacher_map) if teacher_map is not None else None,
        }
        write_artifact(directory, student, tokenizer, inputs.data.catalog, manifest, cut.extras or None)
        if not (self.exact and carry_assistant(Path(inputs.parent), directory)):
            inherit_assistant(Path(inputs.teacher), inputs.teacher_manifest, directory)
        shutil.rmtree(snapshot, ignore_errors=True)
        if config.evaluate:
            evaluate_artifact(eval_config(config, str(directory)), inputs.data)
        return StageArtifact(directory, student, tokenizer)

    @staticmethod
    def _lineage(inputs: StageInputs) -> dict:
        manifest = inputs.teacher_manifest
        return {"template": manifest["template"], "max_history": manifest["max_history"],
                "max_prompt_tokens": manifest.get("max_prompt_tokens")}


def inherit_assistant(teacher: Path, teacher_manifest: dict, directory: Path) -> None:
    """A stage of a teacher that carries D3's SASRec assistant carries it too (the item model does not depend on
    the LLM's shape), with the teacher's weight; ``prunerec assist <stage> --source <teacher>`` chooses the
    weight again for the pruned LLM."""
    entry = teacher_manifest.get("assistant")
    if entry:
        _copy_assistant(teacher, directory, {**entry, "training": {"inherited": str(teacher)}, "valid_ndcg@10_by_weight": {}})


def carry_assistant(parent: Path, directory: Path) -> bool:
    """An exact stage (the vocabulary cut) carries its parent's assistant as it is: the catalog head's scores are
    the parent's, so the weight chosen for the parent's LLM still holds and needs no new sweep. False when the
    parent carries none."""
    entry = read_manifest(parent).get("assistant")
    if entry:
        _copy_assistant(parent, directory, {**entry, "training": {**entry.get("training", {}), "carried_from": str(parent)}})
    return bool(entry)


def _copy_assistant(source: Path, directory: Path, entry: dict) -> None:
    from llmrec.artifact import update_manifest
    from llmrec.assistant import ASSISTANT_DIR

    shutil.copytree(source / ASSISTANT_DIR, directory / ASSISTANT_DIR, dirs_exist_ok=True)
    update_manifest(directory, assistant=entry)


def reconstruction_key(config: PruneConfig) -> dict:
    """What reconstruction did: its ridge and the cuts it refits (a run from before a cut was added is redone);
    ``sequential`` only when on, so that earlier runs keep their keys."""
    key: dict = {"ridge": config.reconstruct_ridge, "refits": ["heads", "residual", "mlp", "depth"]}
    if config.reconstruct_sequential:
        key["sequential"] = True
    if config.reconstruct_samples is not None:
        key["samples"] = config.reconstruct_samples
    return key


def sequential_refit(config: PruneConfig, parent: PreTrainedModel, child: PreTrainedModel,
                     correspondence: reconstruct.Correspondence, inputs: StageInputs) -> list[dict] | None:
    """The sequential refit of a stage's cut child when the config asks for it (its record, else None)."""
    if not (config.reconstruct and config.reconstruct_sequential):
        return None
    record = reconstruct.refit_sequential(parent, child, correspondence, inputs.shared.reconstruction,
                                          config.reconstruct_ridge)
    logger.info("sequential reconstruction: stream error after the last layer %.4g", record[-1]["stream_error_after"])
    return record


def same_key(saved: dict | None, key: dict) -> bool:
    """Stage keys match, ignoring the list of stages requested (adding a later stage resumes the earlier) and
    the parts of the plan the stage does not depend on (:func:`pruning.plan.stage_scope`: a run with another
    MLP width or depth reuses an attention stage)."""
    if saved is None:
        return False
    return _comparable(saved) == _comparable(key)


def _comparable(key: dict) -> dict:
    comparable = {k: v for k, v in key.items() if k != "stages"}
    if isinstance(comparable.get("plan"), dict):
        comparable["plan"] = stage_scope(comparable["plan"], str(comparable.get("stage")))
    return comparable


def eval_config(config: PruneConfig, artifact: str) -> EvalConfig:
    return EvalConfig(artifact=artifact, users=config.eval_users, num_beams=config.num_beams,
                      batch_size=config.eval_batch_size, device=config.device)


# ------------------------------------------------------------------------------------------------
# the stages
# ------------------------------------------------------------------------------------------------


class AttentionStage(Stage):
    """Stage 1: KV groups / query heads by ablation KL, then residual width by activation energy."""

    name = "attn"

    def cut(self, config: PruneConfig, student: PreTrainedModel, inputs: StageInputs) -> Cut:
        shape, goal = shape_of(student), inputs.plan.target
        calibration, targets = inputs.shared.calibration, inputs.shared.targets
        parent = student
        correspondence = reconstruct.Correspondence(layers=list(range(shape.layers)))
        record: dict = {}
        per_group = goal.heads // goal.kv_heads
        if goal.kv_heads < shape.kv_heads or per_group < shape.groups:
            level = "both"
            if per_group == shape.groups:
                level = "groups"
            elif goal.kv_heads == shape.kv_heads:
                level = "heads"
            scores = importance.reused_head_importance(student, calibration, targets, level)
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
            head_fits = reconstruct.head_moments(student, inputs.shared.reconstruction, keep_q) if config.reconstruct else None
            student = slice_heads(student, keep_kv, keep_q)
            if head_fits is not None:
                reconstruct.refit_heads(student, head_fits, config.reconstruct_ridge)
            record["kept_kv_groups"], record["kept_heads"] = keep_kv, keep_q
            correspondence.kv_heads, correspondence.heads = keep_kv, keep_q
            record["head_importance"] = {k: v.tolist() for k, v in scores.items()}
        if goal.hidden < shape.hidden:
            energy = importance.residual_importance(student, calibration)
            keep = energy.topk(goal.hidden).indices.sort().values
            residual_fits = reconstruct.residual_moments(student, inputs.shared.reconstruction, keep) if config.reconstruct else None
            student = slice_residual(student, keep)
            if residual_fits is not None:
                reconstruct.refit_residual(student, residual_fits, config.reconstruct_ridge)
            record["kept_residual_channels"] = correspondence.residual = keep.tolist()
        record["reconstructed"] = config.reconstruct
        if student is not parent:
            record["sequential_reconstruction"] = sequential_refit(config, parent, student, correspondence, inputs)
        return Cut(student, record)


class MlpStage(Stage):
    """Stage 2: the top-K channels of every layer by |down_proj input| × column norm."""

    name = "mlp"

    def cut(self, config: PruneConfig, student: PreTrainedModel, inputs: StageInputs) -> Cut:
        shape, goal = shape_of(student), inputs.plan.target
        if goal.intermediate >= shape.intermediate:
            return Cut(student, {})
        calibration = inputs.shared.calibration
        scores = importance.mlp_importance(student, calibration)
        keep = [row.topk(goal.intermediate).indices.sort().values.tolist() for row in scores]
        fits = reconstruct.mlp_moments(student, inputs.shared.reconstruction, keep) if config.reconstruct else None
        cut = slice_mlp(student, keep)
        if fits is not None:
            reconstruct.refit_mlp(cut, fits, config.reconstruct_ridge)
        correspondence = reconstruct.Correspondence(layers=list(range(shape.layers)), mlp=keep)
        return Cut(cut, {"kept_channels_per_layer": goal.intermediate, "reconstructed": config.reconstruct,
                         "sequential_reconstruction": sequential_refit(config, student, cut, correspondence, inputs)})


class DepthStage(Stage):
    """Stage 3: whole layers removed, greedily by the calibration loss (PruneRec) or by TRSP / ELDeR gates.
    A non-default method gets its own directory (``3-depth-trsp``), so that it can be compared with the
    greedy stage on the same width-pruned parent."""

    name = "depth"

    def directory(self, config: PruneConfig, inputs: StageInputs) -> Path:
        suffix = f"-{config.depth_method}" if config.depth_method != "greedy" else ""
        return inputs.output / f"{inputs.number}-{self.name}{suffix}"

    def key(self, config: PruneConfig, inputs: StageInputs) -> dict:
        key = super().key(config, inputs)
        if config.depth_method != "greedy":
            key["depth_method"] = config.depth_method
            key["trsp"] = asdict(trsp_settings(config))
        return key

    def settings(self, config: PruneConfig, inputs: StageInputs) -> dict:
        trsp = asdict(trsp_settings(config)) if config.depth_method != "greedy" else None
        return {**super().settings(config, inputs), "depth_method": config.depth_method, "trsp": trsp}

    def recovery_skipped(self, config: PruneConfig) -> str | None:
        if config.depth_method != "greedy" and not trsp_settings(config).recovery:
            return "recovery disabled (trsp.recovery = false)"
        return None

    def cut(self, config: PruneConfig, student: PreTrainedModel, inputs: StageInputs) -> Cut:
        shape, goal = shape_of(student), inputs.plan.target
        remove = shape.layers - goal.layers
        if config.depth_method != "greedy":
            shared = inputs.shared
            smaller, trsp_record = trsp_depth(student, shared.examples, shared.valid, shared.pad_id, remove,
                                              trsp_settings(config))
            return Cut(smaller, trsp_record)
        if remove <= 0:
            return Cut(student, {})
        calibration = inputs.shared.calibration
        removed, losses = importance.greedy_layer_removal(student, calibration, remove)
        child = drop_layers(student, removed)
        record: dict = {"removed_layers": removed, "calibration_loss_after_each": losses, "reconstructed": config.reconstruct}
        dropped = set(removed)
        kept = [layer for layer in range(shape.layers) if layer not in dropped]
        if config.reconstruct and config.reconstruct_sequential:  # contains the down_proj refit below
            record["sequential_reconstruction"] = sequential_refit(config, student, child,
                                                                   reconstruct.Correspondence(layers=kept), inputs)
        elif config.reconstruct:
            record["reconstruction"] = reconstruct.refit_depth(student, child, kept, inputs.shared.reconstruction, config.reconstruct_ridge)
        return Cut(child, record)


class VocabStage(Stage):
    """Embedding, LM head and tokenizer cut to the template and the catalog (exact; see :mod:`pruning.vocab`)."""

    name = "vocab"
    exact = True

    def cut(self, config: PruneConfig, student: PreTrainedModel, inputs: StageInputs) -> Cut:
        max_history = int(inputs.teacher_manifest["max_history"])
        pruned, tokenizer, record = prune_vocabulary(student, inputs.tokenizer, inputs.template, inputs.data.catalog,
                                                     max_history)
        summary = {k: v for k, v in record.items() if k != "kept_ids"}  # the id map goes to the manifest's vocab
        return Cut(pruned, summary, tokenizer=tokenizer, extras={ORIGINAL_TOKENIZER: inputs.tokenizer},
                   manifest={"vocab": record})


def trsp_settings(config: PruneConfig) -> TRSPConfig:
    """The TRSP settings of a run; ELDeR is TRSP with λ1 = 0."""
    settings = TRSPConfig(**asdict(config.trsp))
    if config.depth_method == "elder":
        settings.lambda1 = 0.0
    return settings


STAGES: dict[str, Stage] = {stage.name: stage for stage in (AttentionStage(), MlpStage(), DepthStage(), VocabStage())}
"""The dispatch table, in the order stages must run."""
