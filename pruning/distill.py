"""Knowledge distillation after each pruning stage (PruneRec, arXiv 2507.07064, §3.5).

loss = α·CE(student, labels) + (1 − α)·T²·KL(teacher_T ‖ student_T), averaged over the response positions,
*shifted* (the logits at t are compared on the token at t + 1; the released code compares unshifted
positions). Logits are computed at response positions only, so no (B, T, V) tensor is built. The teacher is
the dense fine-tuned model; its distribution at temperature T is coarsened to top-k + tail (see
:mod:`pruning.calibration`) and cached per example the first time the example is seen, so later epochs and
later stages reuse it instead of running the teacher again.

Early stopping on the validation recommendation loss (CE of the valid split's targets); the best weights are
kept. A checkpoint (student weights, optimiser, progress) is written at every evaluation, and a run with
the same checkpoint directory resumes from it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning.calibration import Batch, TeacherTargets, batches, coarse_kl, coarsen, mean_ce, response_logits
from pruning.examples import Example, collate

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Recovery by distillation; every field is recorded in the stage's manifest."""

    alpha: float = 0.5
    """Weight of the hard-label CE; 1 − α weighs the KL to the teacher."""
    temperature: float = 2.0
    """Softmax temperature of the KL term (the KL is scaled by T²)."""
    examples: int | None = 512
    """Seeded subset of training examples to distil on (None = all)."""
    epochs: float = 1.0
    max_steps: int | None = None
    max_minutes: float | None = None
    batch_size: int = 8
    lr: float = 3e-4
    """AdamW learning rate (a pruned model recovers faster with a higher rate than fine-tuning uses)."""
    warmup_steps: int = 5
    eval_every: int = 25
    """Steps between validation evaluations (and checkpoints)."""
    valid_examples: int = 64
    patience: int = 3
    """Evaluations without improvement before stopping (0 = never)."""
    top_k: int = 64
    """Teacher tokens kept per position in the cache."""
    seed: int = 0


def distillation_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherTargets, alpha: float, temperature: float
) -> torch.Tensor:
    """α·CE + (1 − α)·T²·KL over n response positions; student_logits (n, V), labels (n,)."""
    ce = torch.nn.functional.cross_entropy(student_logits.float(), labels)
    if alpha >= 1.0:
        return ce
    kl = coarse_kl(teacher, student_logits, temperature).mean()
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl


class TeacherCache:
    """Coarsened teacher distributions per example index, computed on first use."""

    def __init__(self, teacher: PreTrainedModel, examples: list[Example], pad_id: int, top_k: int, temperature: float):
        self.teacher = teacher.eval()
        self.examples = examples
        self.pad_id = pad_id
        self.top_k = top_k
        self.temperature = temperature
        self._store: dict[int, TeacherTargets] = {}
        self.computed = 0

    @torch.no_grad()
    def targets(self, indices: list[int]) -> TeacherTargets:
        missing = [i for i in indices if i not in self._store]
        if missing:
            device = next(self.teacher.parameters()).device
            batch = _batch([self.examples[i] for i in missing], self.pad_id).to(device)
            logits = response_logits(self.teacher, batch)
            # split the flat positions back per example (row-major order of the response mask)
            counts = batch.response.sum(1).tolist()
            coarse = coarsen(logits, self.top_k, self.temperature)
            start = 0
            for index, n in zip(missing, counts, strict=True):
                self._store[index] = TeacherTargets(
                    coarse.top_index[start : start + n].cpu(), coarse.top_logprob[start : start + n].cpu(),
                    coarse.tail_logprob[start : start + n].cpu(),
                )
                start += n
            self.computed += len(missing)
        parts = [self._store[i] for i in indices]
        return TeacherTargets(
            torch.cat([p.top_index for p in parts]), torch.cat([p.top_logprob for p in parts]),
            torch.cat([p.tail_logprob for p in parts]),
        )


def _batch(examples: list[Example], pad_id: int) -> Batch:
    tensors = collate(examples, pad_id)
    return Batch(tensors["input_ids"], tensors["attention_mask"], tensors["labels"])


@dataclass
class DistillState:
    step: int = 0
    epoch: int = 0
    position: int = 0
    best_loss: float = math.inf
    bad_evals: int = 0
    elapsed: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def run(
    config: DistillConfig,
    student: PreTrainedModel,
    teacher_cache: TeacherCache,
    valid: list[Example],
    checkpoint_dir: Path,
    example_indices: list[int] | None = None,
) -> tuple[PreTrainedModel, dict]:
    """Distil ``student`` on the teacher cache's examples; returns the best student and a training record."""
    device = next(student.parameters()).device
    pad_id = teacher_cache.pad_id
    indices = example_indices if example_indices is not None else list(range(len(teacher_cache.examples)))
    valid_batches = batches(valid, pad_id, config.batch_size)
    steps_per_epoch = math.ceil(len(indices) / config.batch_size)
    total_steps = math.ceil(steps_per_epoch * config.epochs)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (config.warmup_steps + 1)))

    state = DistillState()
    state_file = checkpoint_dir / "distill_state.json"
    if state_file.is_file():
        saved = json.loads(state_file.read_text())
        if saved["config"] == asdict(config):
            student.load_state_dict(load_file(str(checkpoint_dir / "student.safetensors")), strict=False)
            optimizer.load_state_dict(torch.load(checkpoint_dir / "optimizer.pt", weights_only=True))
            scheduler.load_state_dict(saved["scheduler"])
            state = DistillState(**saved["state"])
            logger.info("distillation resumed at step %d", state.step)
        else:
            logger.warning("ignoring a distillation checkpoint made with another configuration")

    def checkpoint() -> None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().clone().contiguous() for k, v in student.state_dict().items()}, str(checkpoint_dir / "student.safetensors"))
        torch.save(optimizer.state_dict(), checkpoint_dir / "optimizer.pt")
        payload = {"config": asdict(config), "state": asdict(state), "scheduler": scheduler.state_dict()}
        tmp = checkpoint_dir / "distill_state.json.tmp"
        tmp.write_text(json.dumps(payload))
        tmp.replace(state_file)

    def evaluate() -> bool:
        loss = mean_ce(student, valid_batches)
        state.history.append({"step": state.step, "valid_loss": loss})
        if loss < state.best_loss - 1e-4:
            state.best_loss, state.bad_evals = loss, 0
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().clone().contiguous() for k, v in student.state_dict().items()}, str(checkpoint_dir / "best.safetensors"))
        else:
            state.bad_evals += 1
        logger.info("distill step %d: valid loss %.4f (best %.4f)", state.step, loss, state.best_loss)
        student.train()
        return config.patience > 0 and state.bad_evals >= config.patience

    if state.step == 0 and not state.history:
        evaluate()
    started = time.monotonic() - state.elapsed
    student.train()
    progress = tqdm(total=total_steps, initial=state.step, desc="distill", unit="step")
    reason = None
    while reason is None and state.step < total_steps:
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(config.seed + state.epoch)).tolist()
        while state.position < len(order):
            chosen = [indices[i] for i in order[state.position : state.position + config.batch_size]]
            state.position += len(chosen)
            teacher = teacher_cache.targets(chosen)
            batch = _batch([teacher_cache.examples[i] for i in chosen], pad_id).to(device)
            logits = response_logits(student, batch)
            teacher_on_device = TeacherTargets(teacher.top_index.to(device), teacher.top_logprob.to(device), teacher.tail_logprob.to(device))
            loss = distillation_loss(logits, batch.targets, teacher_on_device, config.alpha, config.temperature)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state.step += 1
            state.elapsed = time.monotonic() - started
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss.detach()):.3f}")
            out_of_time = config.max_minutes is not None and state.elapsed >= config.max_minutes * 60
            done = state.step >= total_steps or out_of_time
            if state.step % config.eval_every == 0 or done:
                if evaluate():
                    reason = "early stopping"
                checkpoint()
            if done and reason is None:
                reason = "time budget" if out_of_time else "steps"
            if reason is not None:
                break
        else:
            state.epoch += 1
            state.position = 0
    progress.close()
    student.load_state_dict(load_file(str(checkpoint_dir / "best.safetensors")), strict=False)
    student.eval()
    record = {
        "steps": state.step, "stop_reason": reason or "steps", "minutes": round(state.elapsed / 60, 2),
        "best_valid_loss": state.best_loss, "valid_history": state.history,
        "teacher_examples_computed": teacher_cache.computed,
    }
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return student, record
