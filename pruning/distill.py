"""Knowledge distillation after each pruning stage (PruneRec, arXiv 2507.07064, §3.5).

loss = α·CE(student, labels) + (1 − α)·T²·KL(teacher_T ‖ student_T), averaged over the response positions,
*shifted* (the logits at t are compared on the token at t + 1; the released code compares unshifted
positions). Logits are computed at response positions only, so no (B, T, V) tensor is built. The teacher is
the dense fine-tuned model; its distribution at temperature T is coarsened to top-k + tail (see
:mod:`pruning.calibration`) and cached per example the first time the example is seen, so later epochs and
later stages reuse it instead of running the teacher again.

``vocab = "catalog"`` (past the paper) runs the softmax of both models over the tokens a recommender's
responses are made of (the catalog's title tokens and the end token: what the served ``catalog`` head
normalises over, plus any label token outside them), teacher and student alike, and validates on the CE over
them. The LM head then computes a few thousand rows instead of the whole vocabulary: after the width cuts it
is most of a step (SmolLM2's 49,152 × 288 head against 4.8M non-embedding weights), and the objective is the
served head's own distribution.

The loop is :class:`pruning.engine.Engine`'s: early stopping on the validation recommendation loss (CE of
the valid split's targets), the best weights kept, a checkpoint (student weights, optimiser, progress) at
every evaluation, and a run with the same checkpoint directory resumes from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning import reuse
from pruning.calibration import (
    LossVocabulary,
    TeacherTargets,
    coarse_kl,
    coarsen,
    collate_batch,
    mean_ce,
    response_logits,
    response_targets,
    validation_batches,
)
from pruning.engine import Engine, Schedule, adamw, compiled_layers, eager_layers
from pruning.examples import Example

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Recovery by distillation; every field is recorded in the stage's manifest."""

    alpha: float = 0.2
    """Weight of the hard-label CE; 1 − α weighs the KL to the teacher. 0.2 with T = 1 (PruneRec's released loss)
    since 2026-11-26: on the CPU benchmark's model, at 64 steps per stage, every stage's validation CE came out
    lower than with the earlier 0.5 at T = 2 (last stage 1.98 against 2.27; README, `prunerec prune`)."""
    temperature: float = 1.0
    """Softmax temperature of the KL term (the KL is scaled by T²)."""
    examples: int | None = 512
    """Seeded subset of training examples to distil on (None = all)."""
    epochs: float = 1.0
    """Passes over the distillation examples per stage."""
    max_steps: int | None = None
    """Most optimiser steps per stage."""
    max_minutes: float | None = None
    """Most minutes of distillation per stage."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 3e-4
    """AdamW learning rate (a pruned model recovers faster with a higher rate than fine-tuning uses)."""
    warmup_steps: int = 5
    """Linear warm-up of the learning rate."""
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    """After the warm-up: the peak rate throughout, or decayed towards 0 at the stage's last planned step
    (epochs and max_steps; a max_minutes stop or early stopping ends it sooner)."""
    eval_every: int = 25
    """Steps between validation evaluations (and checkpoints)."""
    checkpoint_minutes: float | None = None
    """Least minutes of distillation between two checkpoints (None: one at every evaluation); the best
    student then stays in memory until the next one (``pruning.engine.Schedule.checkpoint_minutes``). Changes
    no result, so it is no part of a stage's key."""
    compile: bool = False
    """Run the student's decoder layers compiled while distilling (:func:`pruning.engine.compiled_layers`;
    validation stays eager). For a GPU, where a small student's step waits for the host; each stage compiles
    anew (another shape), seconds to a minute, so it pays on stages of minutes, not on the short ones of a
    smoke run. Not with ``hidden_weight`` (its per-step hooks would recompile the layers every step). Changes no
    result beyond float tolerance, so it is no part of a stage's key."""
    valid_examples: int = 64
    """Validation users (seeded) for early stopping."""
    patience: int = 3
    """Evaluations without improvement before stopping (0 = never)."""
    top_k: int = 64
    """Teacher tokens kept per position in the cache."""
    hidden_weight: float = 0.0
    """Weight β of a hidden-state term added to the loss: over the student's layers, the mean squared error
    between the student's residual stream after layer l and the teacher's after the layer it came from, in the
    residual channels the student kept (the surgery's own maps: no projection is learned), at the response
    positions, divided by the teacher states' mean square. 0 = logits only. Costs a teacher forward per step."""
    select_metric: Literal["loss", "ndcg@10"] = "loss"
    """Model selection and early stopping: the validation recommendation loss, or NDCG@10 of the student on a
    seeded sample of validation users (the evaluation protocol: constrained beam search, past items excluded;
    costs a decoding pass per evaluation)."""
    select_users: int = 64
    """Validation users of the NDCG@10 check (select_metric ndcg@10)."""
    vocab: Literal["full", "catalog"] = "full"
    """The tokens the loss's softmax runs over: the whole vocabulary, or the catalog's (every title token and
    the end token, the served catalog head's; the validation CE then over them too). 'catalog' computes the LM
    head on a few thousand rows instead of the whole vocabulary."""
    pack_tokens: int | None = None
    """Concatenate the distillation examples into rows of at most this many tokens (see pruning.packing);
    batch_size then counts rows. None: one example per row."""
    prefill_batch_size: int | None = None
    """Compute the teacher's distribution of every distillation example before the first stage's first step,
    this many examples (rows) a forward pass, longest first; None: on first use, in each step's batch. Changes
    no result beyond float tolerance; a minute-capped stage then spends its minutes on the student alone (on
    the first GPU lease a teacher pass cost ~95 ms of a 331 ms attention-stage step; README, "Teacher outputs
    computed once")."""
    teacher_outputs: str | None = None
    """Directory of computed teacher outputs shared between runs and processes: the prefilled distributions
    are written there as ``<key>.safetensors`` (the key: a digest of the teacher's weights, the examples and
    the settings that shape them), and a run whose key matches a file there loads it instead of computing.
    Processes that start together (``bench/gpu_arms.sh``'s arms) compute it once: the others wait on a lock.
    Implies a prefill (``prefill_batch_size``, or 8 examples a pass when unset)."""
    teacher_paths: int = 0
    """Teacher-path distillation (past the paper; :mod:`pruning.teacher_paths`): the teacher's top this-many
    items of a beam search (20 beams, the catalog head, history excluded) for ``teacher_path_prompts`` seeded
    training prompts become extra examples (the prompt, then that item's title), so that the loss also covers
    the title prefixes the served beam search explores, not only the ground truth's. 0 = off. Costs one teacher
    decoding of the prompts per run and ``teacher_path_batch`` more examples a step."""
    teacher_path_prompts: int = 256
    """Training prompts the teacher decodes for its paths (with ``teacher_paths``)."""
    teacher_path_batch: int = 8
    """Path examples added to every step's batch (with ``teacher_paths``; the loss stays one mean over every
    response position of the batch), drawn by a seeded cycle through them."""
    seed: int = 0
    """Seed of the example sample and the batch order."""


DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    # PruneRec's released recipe (arXiv 2507.07064's code): loss 0.2·CE + 0.8·forward KL at T = 1, AdamW at
    # 3e-4, up to 3 epochs over every training example with early stopping at patience 1. Their effective batch
    # of 192 is not copied (our batch counts packed rows; --distill-batch-size sets it), nor is their
    # unshifted KL (ours compares the shifted positions). A profile's safety stop in minutes (cpu: 20 per stage)
    # still applies, a profile's step cap does not (their budget is in epochs); the loss is theirs, over the
    # whole vocabulary, whatever the profile's vocab.
    "prunerec": {"alpha": 0.2, "temperature": 1.0, "lr": 3e-4, "epochs": 3.0, "patience": 1, "examples": None,
                 "max_steps": None, "vocab": "full"},
}
"""Named distillation settings (``prunerec prune --distill-preset NAME``): over the profile, under options given."""


def with_preset(profile: dict[str, Any] | None, preset: str | None) -> dict[str, Any] | None:
    """A prune profile (nested dict) with a distillation preset's values over its ``distill`` part."""
    if preset is None:
        return profile
    if preset not in DISTILL_PRESETS:
        raise ValueError(f"unknown distillation preset {preset!r}; choose one of {sorted(DISTILL_PRESETS)}")
    merged = dict(profile or {})
    merged["distill"] = {**merged.get("distill", {}), **DISTILL_PRESETS[preset]}
    return merged


def distillation_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherTargets, alpha: float, temperature: float
) -> torch.Tensor:
    """α·CE + (1 − α)·T²·KL over n response positions; student_logits (n, V), labels (n,)."""
    ce = torch.nn.functional.cross_entropy(student_logits.float(), labels)
    if alpha >= 1.0:
        return ce
    kl = coarse_kl(teacher, student_logits, temperature).mean()
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl


@dataclass
class TeacherMap:
    """Where a student's layers and residual channels came from in the teacher (recorded by every stage)."""

    layers: list[int]
    """Teacher layer index of each student layer."""
    channels: list[int]
    """Teacher residual channel of each student channel."""

    @classmethod
    def identity(cls, model: PreTrainedModel) -> TeacherMap:
        config = model.config
        return cls(list(range(config.num_hidden_layers)), list(range(config.hidden_size)))

    def after(self, record: dict) -> TeacherMap:
        """This map after a stage whose cut record is ``record`` (kept residual channels, removed layers)."""
        channels = self.channels
        if "kept_residual_channels" in record:
            channels = [self.channels[i] for i in record["kept_residual_channels"]]
        removed = set(record.get("removed_layers", []))
        return TeacherMap([layer for i, layer in enumerate(self.layers) if i not in removed], channels)


@contextlib.contextmanager
def layer_outputs(model: PreTrainedModel, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the residual stream (B, T, d) after each of ``layers`` of ``model``'s decoder while inside."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index in sorted(set(layers)):
        def hook(_module: Any, _inputs: Any, output: Any, index: int = index) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output
        handles.append(model.get_decoder().layers[index].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def hidden_state_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                      channels: torch.Tensor) -> torch.Tensor:
    """Mean over layers of MSE(student (n, d_s), teacher (n, d_t)[:, channels]) / mean square of that teacher slice."""
    terms = []
    for student, teacher in zip(student_states, teacher_states, strict=True):
        target = teacher.index_select(-1, channels).float()
        terms.append(torch.nn.functional.mse_loss(student.float(), target) / target.pow(2).mean().clamp_min(1e-6))
    return torch.stack(terms).mean()


DEFAULT_PREFILL_BATCH = 8
"""Examples (rows) a forward pass of a prefill when only ``teacher_outputs`` asks for one."""


class TeacherCache:
    """Coarsened teacher distributions per example index, computed on first use and kept on the teacher's
    device (on a GPU about 0.8 KB per response position at top_k = 64: 2M positions of ml-100k take ~1.6 GB).

    :meth:`prefill` computes every example's before the first step (in batches of its own), and with a directory
    shares them between processes and runs through a file (``DistillConfig.teacher_outputs``).

    With ``shared=True`` the distributions are kept for the process (:mod:`pruning.reuse`), keyed by a digest
    of the teacher (weights, config, device), the examples, the padding id, top_k, the temperature and the
    vocabulary: a second compression run from the same teacher on the same examples (the benchmark's TRSP path
    after its greedy one, every target of the retention curve) reuses what the first one computed instead of
    running the teacher again. One teacher's distributions are kept at a time."""

    def __init__(self, teacher: PreTrainedModel, examples: list[Example], pad_id: int, top_k: int, temperature: float,
                 vocabulary: LossVocabulary | None = None, shared: bool = False):
        """``vocabulary``: the teacher's distribution over those tokens only (the students' loss then runs over
        the same tokens; top indices are columns among them)."""
        self.teacher = teacher.eval()
        self.vocabulary = vocabulary
        self.examples = examples
        self.pad_id = pad_id
        self.top_k = top_k
        self.temperature = temperature
        self._key: str | None = None
        self._store: dict[int, TeacherTargets] = _TEACHER_OUTPUTS.get(self.key) if shared else {}
        self.reused = len(self._store)
        """Examples whose distributions an earlier cache of this process had computed."""
        self.computed = 0
        """Examples whose distributions this cache computed."""
        self.loaded = 0
        """Examples whose distributions this cache read from a teacher-outputs file (:meth:`prefill`)."""
        self.prefill_seconds = 0.0
        """Seconds this cache spent computing distributions before any step needed them (:meth:`prefill`)."""
        if self.reused:
            logger.info("teacher outputs: reusing %d examples' distributions computed earlier in this process", self.reused)

    @property
    def key(self) -> str:
        """Digest of the teacher (weights, config, device), the examples, the padding id, top_k, the temperature
        and the vocabulary: what the distributions depend on (computed once; about a second for SmolLM2)."""
        if self._key is None:
            into = hashlib.blake2b(digest_size=16)
            reuse.digest_model(self.teacher, into)
            into.update(f"{self.pad_id}:{self.top_k}:{self.temperature}".encode())
            if self.vocabulary is not None:
                reuse.digest_tensors([self.vocabulary.ids], into)
            for example in self.examples:
                into.update(repr((example.input_ids, example.labels, example.position_ids)).encode())
            self._key = into.hexdigest()
        return self._key

    @torch.no_grad()
    def _compute(self, missing: list[int]) -> None:
        """The teacher's coarsened distributions of ``missing`` examples, in one forward pass, into the store."""
        device = next(self.teacher.parameters()).device
        host = collate_batch([self.examples[i] for i in missing], self.pad_id)
        counts = host.response.sum(1).tolist()  # per example, on the host: no device synchronisation
        batch = host.to(device)
        # the teacher in bf16 on a GPU (no gradients; coarsen() returns to fp32 for the softmax); its
        # outputs stay on the teacher's device, so later steps move nothing
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = response_logits(self.teacher, batch, self.vocabulary)
        coarse = coarsen(logits, self.top_k, self.temperature)
        start = 0
        for index, n in zip(missing, counts, strict=True):
            self._store[index] = TeacherTargets(
                coarse.top_index[start : start + n], coarse.top_logprob[start : start + n],
                coarse.tail_logprob[start : start + n],
            )
            start += n
        self.computed += len(missing)

    def targets(self, indices: list[int]) -> TeacherTargets:
        missing = [i for i in indices if i not in self._store]
        if missing:
            self._compute(missing)
        parts = [self._store[i] for i in indices]
        return TeacherTargets(
            torch.cat([p.top_index for p in parts]), torch.cat([p.top_logprob for p in parts]),
            torch.cat([p.tail_logprob for p in parts]),
        )

    def prefill(self, batch_size: int = DEFAULT_PREFILL_BATCH, directory: str | Path | None = None) -> None:
        """Every example's distribution now, ``batch_size`` examples a forward pass, the longest first (so that
        a batch too large for the device fails at once, and similar lengths share a batch: less padding).

        With ``directory``: loaded from ``<directory>/<key>.safetensors`` when it exists, else computed and
        written there; a lock file makes processes that share the directory compute each key once."""
        if batch_size < 1:
            raise ValueError(f"the prefill's batch size must be positive, got {batch_size}")
        complete = all(i in self._store for i in range(len(self.examples)))
        if directory is None:
            if not complete:
                self._compute_missing(batch_size)
            return
        path = Path(directory) / f"{self.key}.safetensors"
        if complete and path.exists():  # a later stage of the run that wrote or read it
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(path.with_name(path.name + ".lock")):
            rejected = False
            if not complete and path.exists():
                if self._load(path):
                    return
                rejected = True  # replaced below by what this run computes
            self._compute_missing(batch_size)
            if rejected or not path.exists():
                self._save(path)

    def _compute_missing(self, batch_size: int) -> None:
        missing = sorted((i for i in range(len(self.examples)) if i not in self._store),
                         key=lambda i: -len(self.examples[i].input_ids))
        if not missing:
            return
        started = time.perf_counter()
        progress = tqdm(total=len(missing), desc="teacher outputs", unit="example", disable=None)
        done = 0
        while done < len(missing):
            chunk = missing[done : done + batch_size]
            try:
                self._compute(chunk)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                # other processes may share the card (bench/gpu_arms.sh): a smaller pass, not a failed run
                batch_size //= 2
                torch.cuda.empty_cache()
                logger.warning("teacher outputs: out of GPU memory; %d examples a forward pass from here", batch_size)
                continue
            done += len(chunk)
            progress.update(len(chunk))
        progress.close()
        seconds = time.perf_counter() - started
        self.prefill_seconds += seconds
        logger.info("teacher outputs: %d examples computed in %.1f s (%d a forward pass)", len(missing), seconds,
                    batch_size)

    def _save(self, path: Path) -> None:
        """Every example's distribution as one file (written beside, then renamed: a reader never sees half)."""
        parts = [self._store[i] for i in range(len(self.examples))]
        counts = torch.tensor([0] + [len(p.tail_logprob) for p in parts], dtype=torch.int64)
        tensors = {
            # int32 ids (vocabularies are far below 2^31): half the file, exact
            "top_index": torch.cat([p.top_index for p in parts]).to(torch.int32).cpu().contiguous(),
            "top_logprob": torch.cat([p.top_logprob for p in parts]).cpu().contiguous(),
            "tail_logprob": torch.cat([p.tail_logprob for p in parts]).cpu().contiguous(),
            "offsets": torch.cumsum(counts, 0),
        }
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial), metadata={"key": self.key, "format": TEACHER_OUTPUTS_FORMAT,
                                                   "examples": str(len(parts))})
        os.replace(partial, path)
        logger.info("teacher outputs: written to %s (%.0f MB)", path, path.stat().st_size / 2**20)

    def _load(self, path: Path) -> bool:
        """The distributions of ``path`` into the store; False (and a warning) when it is not this cache's."""
        device = next(self.teacher.parameters()).device
        try:
            with safe_open(str(path), framework="pt", device="cpu") as file:  # then moved: any safetensors version
                metadata = file.metadata() or {}
                if metadata.get("key") != self.key or metadata.get("format") != TEACHER_OUTPUTS_FORMAT:
                    logger.warning("teacher outputs: %s is not this run's (another teacher, examples or settings); "
                                   "computing them again", path)
                    return False
                offsets = file.get_tensor("offsets").tolist()
                top_index = file.get_tensor("top_index").to(device=device, dtype=torch.int64)
                top_logprob = file.get_tensor("top_logprob").to(device)
                tail_logprob = file.get_tensor("tail_logprob").to(device)
        except (OSError, SafetensorError) as error:
            logger.warning("teacher outputs: %s cannot be read (%s); computing them again", path, error)
            return False
        if len(offsets) != len(self.examples) + 1:
            logger.warning("teacher outputs: %s holds %d examples, not %d; computing them again", path,
                           len(offsets) - 1, len(self.examples))
            return False
        for index, (start, end) in enumerate(itertools.pairwise(offsets)):
            self._store[index] = TeacherTargets(top_index[start:end], top_logprob[start:end], tail_logprob[start:end])
        self.loaded += len(self.examples)
        logger.info("teacher outputs: %d examples' distributions loaded from %s", len(self.examples), path)
        return True


TEACHER_OUTPUTS_FORMAT = "prunerec-teacher-outputs/1"
"""The ``format`` metadata of a teacher-outputs file (:meth:`TeacherCache.prefill`)."""


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if needed) while inside: one process at a time."""
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


TEACHER_OUTPUTS_KEPT = 1
"""Teachers (with their examples and settings) whose distributions the process keeps for shared caches."""
_TEACHER_OUTPUTS: reuse.ProcessStore[dict[int, TeacherTargets]] = reuse.ProcessStore(TEACHER_OUTPUTS_KEPT, dict)


def schedule_of(config: DistillConfig) -> Schedule:
    return Schedule(batch_size=config.batch_size, epochs=config.epochs, max_steps=config.max_steps,
                    max_minutes=config.max_minutes, warmup_steps=config.warmup_steps, max_grad_norm=1.0,
                    eval_every=config.eval_every, patience=config.patience, seed=config.seed,
                    checkpoint_minutes=config.checkpoint_minutes, lr_decay=config.lr_decay)


OPERATIONAL_FIELDS = ("checkpoint_minutes", "compile", "prefill_batch_size", "teacher_outputs")
"""DistillConfig fields that change how a run is carried out, not what it produces."""


PATH_FIELDS = ("teacher_paths", "teacher_path_prompts", "teacher_path_batch")
"""DistillConfig fields of teacher-path distillation: no part of a result's key while it is off, so that runs
from before it existed resume."""


def result_key(config: DistillConfig) -> dict[str, Any]:
    """The settings a distilled student depends on (the config without :data:`OPERATIONAL_FIELDS`, and without
    :data:`PATH_FIELDS` while teacher paths are off): what a stage's key and a checkpoint's configuration
    compare."""
    dropped = OPERATIONAL_FIELDS + (PATH_FIELDS if config.teacher_paths <= 0 else ())
    return {k: v for k, v in asdict(config).items() if k not in dropped}


def path_batches(path_indices: list[int], per_step: int, seed: int) -> Callable[[list[int]], list[int]]:
    """The path examples a step adds, a function of the step's window batch: each batch gets ``per_step``
    consecutive entries of a seeded shuffle of ``path_indices`` (cyclic), chosen by a digest of the batch, so
    that a resumed run draws what an uninterrupted one would have for the same batch."""
    order = list(path_indices)
    random.Random(seed).shuffle(order)
    count = min(per_step, len(order))

    def paths_for(chosen: list[int]) -> list[int]:
        start = int.from_bytes(hashlib.blake2b(repr(chosen).encode(), digest_size=8).digest(), "big") % len(order)
        return [order[(start + i) % len(order)] for i in range(count)]

    return paths_for


def run(
    config: DistillConfig,
    student: PreTrainedModel,
    teacher_cache: TeacherCache,
    valid: list[Example],
    checkpoint_dir: Path,
    example_indices: list[int] | None = None,
    ranking: Callable[[], float] | None = None,
    teacher_map: TeacherMap | None = None,
    path_indices: list[int] | None = None,
) -> tuple[PreTrainedModel, dict]:
    """Distil ``student`` on the teacher cache's examples; returns the best student and a training record.

    A checkpoint of the same configuration in ``checkpoint_dir`` is resumed (another one is ignored); the
    directory is removed once the best student is restored. With ``config.select_metric == 'ndcg@10'``,
    ``ranking`` (a :class:`pruning.evaluate.RankingCheck` over ``student``) is the validation metric,
    maximised. ``path_indices``: the cache's teacher-path examples (``config.teacher_paths``), added to every
    step's batch and never drawn as windows."""
    selecting_ndcg = config.select_metric == "ndcg@10"
    if selecting_ndcg and ranking is None:
        raise ValueError("select_metric ndcg@10 needs a ranking check of the student")
    if config.hidden_weight > 0 and teacher_map is None:
        raise ValueError("hidden_weight > 0 needs the student's map to the teacher's layers and channels")
    device = next(student.parameters()).device
    pad_id = teacher_cache.pad_id
    paths = sorted(set(path_indices or []))
    if config.teacher_paths > 0 and not paths:
        raise ValueError("teacher_paths > 0 needs the teacher cache's path examples (pruning.prune.shared_data "
                         "builds them)")
    if paths and config.teacher_path_batch < 1:
        raise ValueError(f"teacher_path_batch must be at least 1 with teacher paths, got {config.teacher_path_batch}")
    indices = example_indices if example_indices is not None else list(range(len(teacher_cache.examples)))
    if paths:
        excluded = set(paths)
        indices = [i for i in indices if i not in excluded]
    paths_for = path_batches(paths, config.teacher_path_batch, config.seed) if paths else None
    valid_batches = validation_batches(valid, pad_id, config.batch_size, config.pack_tokens)
    optimizer = adamw([p for p in student.parameters() if p.requires_grad], lr=config.lr)
    engine = Engine(student, optimizer, schedule_of(config), checkpoint_dir=checkpoint_dir, config_key=result_key(config),
                    on_mismatch="restart", desc="distill", autocast=True,
                    metric="valid_ndcg@10" if selecting_ndcg else "valid_loss", maximize=selecting_ndcg)

    student_layers = list(range(student.config.num_hidden_layers))
    channels = torch.tensor(teacher_map.channels, device=device) if teacher_map is not None else None
    if (config.vocab == "catalog") != (teacher_cache.vocabulary is not None):
        raise ValueError(f"vocab {config.vocab!r} needs a teacher cache {'with' if config.vocab == 'catalog' else 'without'} "
                         "a loss vocabulary (pruning.prune.shared_data builds it)")
    vocabulary = teacher_cache.vocabulary.to(device) if teacher_cache.vocabulary is not None else None

    def loss_of(chosen: list[int]) -> torch.Tensor:
        # the paths join the step's batch: one mean over every response position, so a path's positions weigh
        # what a window's do (a separate mean over the paths' few positions, added to the windows', gave their
        # noisy gradient the windows' weight and the attention stage diverged at lr 1e-3: README)
        if paths_for is not None:
            chosen = [*chosen, *paths_for(chosen)]
        teacher = teacher_cache.targets(chosen).to(device)
        batch = collate_batch([teacher_cache.examples[i] for i in chosen], pad_id).to(device)
        labels = response_targets(batch, vocabulary)
        if config.hidden_weight <= 0 or teacher_map is None or channels is None:
            logits = response_logits(student, batch, vocabulary)
            return distillation_loss(logits, labels, teacher, config.alpha, config.temperature)
        with layer_outputs(student, student_layers) as mine:
            logits = response_logits(student, batch, vocabulary)
        with torch.no_grad(), layer_outputs(teacher_cache.teacher, teacher_map.layers) as theirs:
            teacher_cache.teacher.model(**batch.model_inputs(), use_cache=False)
        hidden = hidden_state_loss([batch.response_states(mine[i]) for i in student_layers],
                                   [batch.response_states(theirs[t]) for t in teacher_map.layers], channels)
        return (distillation_loss(logits, labels, teacher, config.alpha, config.temperature)
                + config.hidden_weight * hidden)

    def validate() -> float:
        with engine.mixed_precision(), eager_layers(student):
            return ranking() if selecting_ndcg and ranking is not None else mean_ce(student, valid_batches, vocabulary)

    prefilled_before = teacher_cache.prefill_seconds
    if config.prefill_batch_size is not None or config.teacher_outputs is not None:
        teacher_cache.prefill(config.prefill_batch_size or DEFAULT_PREFILL_BATCH, config.teacher_outputs)
    compile_layers = config.compile and config.hidden_weight <= 0
    if config.compile and not compile_layers:
        logger.warning("distill: compile ignored with hidden_weight > 0 (its hooks change every step)")
    with compiled_layers(student, compile_layers) as compiled:
        engine.fit(indices, list, loss_of, validate)
    engine.restore_best(student)
    student.eval()
    record = {**engine.record(), "teacher_examples_computed": teacher_cache.computed,
              "teacher_examples_reused": teacher_cache.reused, "teacher_examples_loaded": teacher_cache.loaded,
              "teacher_prefill_seconds": round(teacher_cache.prefill_seconds - prefilled_before, 1), "compiled_layers": compiled,
              "loss_vocabulary": len(vocabulary) if vocabulary is not None else "full"}
    if paths:
        record["teacher_path_examples"] = len(paths)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return student, record
