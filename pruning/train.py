"""Fine-tuning a decoder LLM as a generative next-item recommender (BIGRec, arXiv 2308.08434; D3, arXiv
2406.14900): titles of the user's past items in, the next item's title out, loss on the response only.

Full fine-tuning or LoRA (peft), through ``accelerate`` so that ``accelerate launch`` spreads the same
code over several GPUs or CPU processes; bf16 autocast on CUDA, fp32 on CPU; gradient accumulation;
checkpoints with resume after interruption; early stopping on the validation loss; a seeded order.
The result is a prunerec artifact (LoRA weights merged, so stock ``AutoModelForCausalLM`` loads it).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from llmrec.artifact import write_artifact
from llmrec.model import DEFAULT_MODEL, load_model
from llmrec.prompting import PromptEncoder
from pruning.examples import Example, collate, split_examples, training_examples
from recdata.prep import PreparedData
from recdata.prompts import get_template

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """Fine-tuning settings. Every field is recorded in the artifact's manifest."""

    output: str
    """Artifact directory to write."""
    model: str = DEFAULT_MODEL
    """Base model: the embedded default alias, a local HF directory, or a prunerec artifact."""
    template: str = "compact"
    """Prompt template: 'compact' (packable, CPU-friendly) or 'd3' (BIGRec/D3 instruction)."""
    max_history: int = 10
    """Items of history in a prompt."""
    method: Literal["full", "lora"] = "full"
    """Full fine-tuning or LoRA adapters (merged into the weights at the end)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Module names (suffixes or full dotted names) that get adapters; PrunePEFT writes full names."""
    packing: bool | None = None
    """Pack windows of a user's sequence into one example (default: when the template allows)."""
    pack_stride: int | None = None
    """Targets per packed window (default max_history: each target once, 1..N items of history)."""
    max_train_examples: int | None = None
    """Seeded random subset of training examples (windows or samples); None = all."""
    epochs: float = 1.0
    """Passes over the training examples."""
    max_steps: int | None = None
    """Stop after this many optimiser steps."""
    max_minutes: float | None = None
    """Stop after this much training time (summed over resumed runs)."""
    batch_size: int = 8
    """Examples per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    warmup_steps: int = 10
    """Linear warm-up, then constant."""
    max_grad_norm: float = 1.0
    eval_every: int = 50
    """Optimiser steps between validation-loss evaluations (and checkpoints)."""
    valid_examples: int = 200
    """Validation users (seeded subset of the valid split) for the loss."""
    patience: int = 3
    """Evaluations without improvement before early stopping (0 = never stop early)."""
    seed: int = 0
    checkpoint_dir: str | None = None
    """Where checkpoints go (default: '<output>.ckpt'); removed after success unless keep_checkpoints."""
    resume: bool = True
    """Continue from the checkpoint directory when it holds a checkpoint of the same configuration."""
    keep_checkpoints: bool = False
    profile: str = "custom"
    """Name of the profile that set these values (recorded for the report)."""

    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(f"{self.output}.ckpt")


PROFILES: dict[str, dict[str, Any]] = {
    # Minutes on a 2-core CPU: packed windows, a sample of them, a time budget; protocol unchanged.
    "cpu": {
        "template": "compact",
        "method": "full",
        "max_train_examples": 2000,
        "batch_size": 8,
        "lr": 2e-4,
        "max_minutes": 8.0,
        "eval_every": 25,
        "valid_examples": 64,
        "patience": 0,
    },
    # The full-size run for one GPU.
    "gpu": {"template": "d3", "method": "full", "batch_size": 32, "lr": 5e-5, "epochs": 2.0, "eval_every": 500},
    # Seconds: for tests and smoke runs.
    "tiny": {"template": "compact", "max_train_examples": 64, "batch_size": 8, "max_steps": 8, "eval_every": 4,
             "valid_examples": 16},
}


def apply_profile(config: TrainConfig, profile: str) -> TrainConfig:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    values = {**asdict(config), **PROFILES[profile], "profile": profile}
    return TrainConfig(**values)


@dataclass
class TrainerState:
    """Progress that a checkpoint restores."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_loss: float = math.inf
    bad_evals: int = 0
    elapsed: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def _stop_reason(config: TrainConfig, state: TrainerState, total_steps: int) -> str | None:
    if config.max_steps is not None and state.step >= config.max_steps:
        return "max steps"
    if state.step >= total_steps:
        return "epochs"
    if config.max_minutes is not None and state.elapsed >= config.max_minutes * 60:
        return "time budget"
    return None


def _config_key(config: TrainConfig) -> dict[str, Any]:
    """The fields a checkpoint must agree on to be resumed (not the stopping criteria)."""
    skip = {"max_steps", "max_minutes", "epochs", "patience", "checkpoint_dir", "resume", "keep_checkpoints"}
    return {k: v for k, v in asdict(config).items() if k not in skip}


@torch.no_grad()
def validation_loss(model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int, device: torch.device) -> float:
    """Mean cross-entropy per response token over the examples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        mask = shift_labels != -100
        # Only the response positions: (n_targets, V) instead of (B, T, V) log-softmax.
        loss = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
        total += float(loss)
        count += int(mask.sum())
    if was_training:
        model.train()
    return total / max(count, 1)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def run(config: TrainConfig, data: PreparedData) -> Path:
    """Fine-tune ``config.model`` on ``data`` and write the artifact at ``config.output``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
    )
    set_seed(config.seed)
    loaded = load_model(config.model, device="cpu", dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    template = get_template(config.template)
    encoder = PromptEncoder(tokenizer, template, config.max_history)
    packing = template.packable if config.packing is None else config.packing
    pad_id = int(tokenizer.pad_token_id)

    train_set = training_examples(data, encoder, packing, config.pack_stride, config.max_train_examples, config.seed)
    valid_set = split_examples(data, encoder, "valid", limit=config.valid_examples, seed=config.seed)
    if not train_set:
        raise ValueError("no training examples: the training split is empty")
    targets = sum(e.targets for e in train_set)
    items = sum(e.target_items(encoder.end_id) for e in train_set)
    tokens = sum(len(e.input_ids) for e in train_set)
    logger.info(
        "training on %d examples (%d target items, %d target tokens, %d tokens, packing=%s), validating on %d",
        len(train_set), items, targets, tokens, packing, len(valid_set),
    )

    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
        )
        model = get_peft_model(model, lora)  # type: ignore[assignment]
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    logger.info("trainable parameters: %d", trainable_params)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(config.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    steps_per_epoch = math.ceil(len(train_set) / (config.batch_size * accelerator.num_processes * config.grad_accum))
    total_steps = math.ceil(steps_per_epoch * config.epochs)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    ckpt = config.checkpoint_path()
    state = TrainerState()
    if config.resume and (ckpt / "trainer_state.json").is_file():
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        if saved.get("config") != _config_key(config):
            raise ValueError(
                f"checkpoint {ckpt} was made with another configuration; pass --no-resume or another "
                "--checkpoint-dir"
            )
        accelerator.load_state(str(ckpt / "state"))
        state = TrainerState(**saved["state"])
        logger.info("resumed from %s at step %d", ckpt, state.step)

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(ckpt / "state"))
        if accelerator.is_main_process:
            payload = {"config": _config_key(config), "state": asdict(state)}
            tmp = ckpt / "trainer_state.json.tmp"
            tmp.write_text(json.dumps(payload, indent=2))
            tmp.replace(ckpt / "trainer_state.json")

    def evaluate_and_track() -> bool:
        """Validation loss; keep the best weights; True when early stopping triggers."""
        loss = validation_loss(model, valid_set, pad_id, config.batch_size, accelerator.device)
        state.history.append({"step": state.step, "valid_loss": loss})
        if loss < state.best_loss - 1e-4:
            state.best_loss, state.bad_evals = loss, 0
            if accelerator.is_main_process:
                ckpt.mkdir(parents=True, exist_ok=True)
                save_file(_trainable_state(accelerator.unwrap_model(model)), str(ckpt / "best.safetensors"))
        else:
            state.bad_evals += 1
        logger.info("step %d: valid loss %.4f (best %.4f)", state.step, loss, state.best_loss)
        return config.patience > 0 and state.bad_evals >= config.patience

    if state.step == 0 and not state.history:
        evaluate_and_track()  # the starting point, so that a useless run keeps the base weights
        save_checkpoint()

    model.train()
    started = time.monotonic() - state.elapsed
    progress = tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process)
    running = 0.0
    stop_reason = _stop_reason(config, state, total_steps)
    while stop_reason is None:
        generator = torch.Generator().manual_seed(config.seed + state.epoch)
        loader: DataLoader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,  # type: ignore[arg-type]
                                        generator=generator, collate_fn=lambda batch: collate(batch, pad_id))
        loader = accelerator.prepare(loader)
        if state.batches_in_epoch:
            loader = accelerator.skip_first_batches(loader, state.batches_in_epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            value = float(loss.detach())
            running = 0.9 * running + 0.1 * value if state.step > 1 else value
            progress.update(1)
            progress.set_postfix(loss=f"{running:.3f}")
            state.elapsed = time.monotonic() - started
            stop_reason = _stop_reason(config, state, total_steps)
            if state.step % config.eval_every == 0 or stop_reason is not None:
                if evaluate_and_track() and stop_reason is None:
                    stop_reason = "early stopping"
                save_checkpoint()
            if stop_reason is not None:
                break
        else:  # the epoch ended without a stop
            state.epoch += 1
            state.batches_in_epoch = 0
            stop_reason = _stop_reason(config, state, total_steps)
    progress.close()
    logger.info("training stopped (%s) at step %d after %.1f min", stop_reason, state.step, state.elapsed / 60)

    accelerator.wait_for_everyone()
    output = Path(config.output)
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        final.load_state_dict(load_file(str(ckpt / "best.safetensors")))
        if config.method == "lora":
            final = final.merge_and_unload()
        final.eval()
        manifest = {
            "stage": "finetune",
            "parent": str(config.model),
            "template": template.to_dict(),
            "max_history": config.max_history,
            "dataset": data.summary(),
            "stage_config": asdict(config),
            "training": {
                "examples": len(train_set), "target_items": items, "target_tokens": targets, "tokens": tokens,
                "packing": packing, "trainable_params": trainable_params,
                "steps": state.step, "stop_reason": stop_reason, "minutes": round(state.elapsed / 60, 2),
                "best_valid_loss": state.best_loss, "valid_history": state.history,
                "processes": accelerator.num_processes,
            },
        }
        write_artifact(output, final, tokenizer, data.catalog, manifest)
        if not config.keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)
    accelerator.wait_for_everyone()
    return output
