"""Fine-tuning a decoder LLM as a generative next-item recommender (BIGRec, arXiv 2308.08434; D3, arXiv
2406.14900): titles of the user's past items in, the next item's title out, loss on the response only.

Full fine-tuning or LoRA (peft), through ``accelerate`` so that ``accelerate launch`` spreads the same
code over several GPUs or CPU processes; bf16 autocast on CUDA, fp32 on CPU; gradient accumulation;
checkpoints with resume after interruption; early stopping on the validation loss; a seeded order.
The result is a prunerec artifact (LoRA weights merged, so stock ``AutoModelForCausalLM`` loads it).
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from llmrec import configs, item_tokens
from llmrec.artifact import write_artifact
from llmrec.model import DEFAULT_MODEL, load_model
from llmrec.prompting import PromptEncoder
from pruning.calibration import LossVocabulary, catalog_vocabulary, head_logits, mean_ce, validation_batches
from pruning.engine import Engine, Schedule, adamw, compiled_layers, eager_layers, warmup_scheduler
from pruning.evaluate import RankingCheck
from pruning.examples import IGNORE, collate, model_inputs, split_examples, training_examples
from pruning.packing import pack
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
    """Items of history in a prompt (10, 20, 50...; SASRec sees 50)."""
    max_prompt_tokens: int | None = None
    """The prompt-length guard: a longer prompt drops its oldest titles (in training, evaluation and serving
    alike; recorded in the artifact). None: the model's context length minus the catalog's longest response."""
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
    pack_tokens: int | None = None
    """Concatenate examples into rows of at most this many tokens, positions restarting per example so
    that attention stays inside each (any template; see pruning.packing); batch_size then counts rows, so
    batches are sized in tokens. None: one example per row."""
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
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up, then the peak rate as ``lr_decay`` says."""
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    """After the warm-up: the peak rate throughout, or decayed towards 0 at the last planned step (epochs and
    max_steps; a max_minutes stop ends the run before the rate has decayed)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = none)."""
    eval_every: int = 50
    """Optimiser steps between validation-loss evaluations (and checkpoints)."""
    checkpoint_minutes: float | None = None
    """Least minutes of training between two checkpoints (None: one at every evaluation); the best weights
    then stay in memory until the next one (see ``pruning.engine.Schedule.checkpoint_minutes``). Changes no
    result, only what a killed run has to redo."""
    compile: bool = False
    """Run every decoder layer compiled while training (``torch.compile`` in place, one layer's graph serving
    them all: :func:`pruning.engine.compiled_layers`); validation stays eager. Meant for a GPU, where a small
    model's step waits for the host launching each layer's many small kernels; compiling costs seconds to a
    minute before the first steps. Changes the speed, not what is learned (to float tolerance; with dropout,
    LoRA's, the compiled layers draw other random masks, from inductor's own generator, so such runs agree in
    distribution, not number for number), so a checkpoint resumes across it."""
    loss_vocab: Literal["full", "catalog"] = "full"
    """The tokens the loss's softmax runs over: the whole vocabulary (the causal LM loss), or the catalog's
    (every title token and the end token: the softmax the served catalog head ranks with, so the model learns
    the scores it is ranked by, and the LM head runs on a few thousand rows at the labelled positions instead
    of the whole vocabulary at every position). The validation loss then runs over the same tokens. One
    process only: it calls the decoder directly, past the wrapper through which multi-GPU training synchronises
    gradients. On the CPU it stepped 1.5x faster and ranked worse than 'full' (README, "The loss's vocabulary")."""
    valid_examples: int = 200
    """Validation users (seeded subset of the valid split) for the loss."""
    patience: int = 3
    """Evaluations without improvement before early stopping (0 = never stop early)."""
    select_metric: Literal["loss", "ndcg@10"] = "loss"
    """What validation measures for early stopping and the best weights: 'loss' (CE of the valid targets) or
    'ndcg@10' (the evaluation protocol, constrained beam search over the full catalog with the past excluded,
    on select_users seeded validation users: the metric that is reported, at the cost of decoding)."""
    select_users: int = 200
    """Validation users of the ndcg@10 selection."""
    select_beams: int = 20
    """Beams of the ndcg@10 selection (the evaluation's 20)."""
    item_tokens: Literal["none", "learned", "sasrec"] = "none"
    """Collaborative item tokens after each history title (llmrec.item_tokens): 'learned' (one vector per item,
    initialised from its title's token embeddings, trained with the model), 'sasrec' (a SASRec trained here
    first; its frozen item embeddings through a learned projection: LLaRA's hybrid), 'none'."""
    item_sasrec_minutes: float | None = None
    """Time budget of the SASRec behind --item-tokens sasrec (None: until early stopping)."""
    seed: int = 0
    """Seed of the example sample, the batch order and the initial weights of adapters."""
    checkpoint_dir: str | None = None
    """Where checkpoints go (default: '<output>.ckpt'); removed after success unless keep_checkpoints."""
    resume: bool = True
    """Continue from the checkpoint directory when it holds a checkpoint of the same configuration."""
    keep_checkpoints: bool = False
    """Keep the checkpoint directory after success."""
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
    # One GPU. The compact template's windows: on one H100 (2026-11-25) 3 epochs of them (951 steps of 32
    # windows, lr 5e-5) scored NDCG@10 0.0816 in 5 minutes against 0.0729 for the d3 template's 2 epochs in 21
    # minutes. The windows are packed into rows of 2048 tokens (~16 windows a row; 96% full), so a step of 2
    # rows is the same ~32 windows without the padding; 3 epochs as measured, stopping earlier when the
    # validation loss stops improving. Batch size and rate follow the measured run; a faster recipe waits for
    # a GPU. A checkpoint at most every 5 minutes: at ~4 steps/s a validation comes every ~25 s, and writing
    # the weights, AdamW's state and the best weights there (seconds each: 3-6 s for the checkpoint and 2-4 s
    # for the best weights on the 2-core machine's disk) at each would take a large share of the run.
    "gpu": {"template": "compact", "method": "full", "pack_tokens": 2048, "batch_size": 2, "lr": 5e-5, "epochs": 3.0,
            "eval_every": 100, "valid_examples": 256, "patience": 3, "checkpoint_minutes": 5.0},
    # Seconds: for tests and smoke runs.
    "tiny": {"template": "compact", "max_train_examples": 64, "batch_size": 8, "max_steps": 8, "eval_every": 4,
             "valid_examples": 16},
}


def apply_profile(config: TrainConfig, profile: str) -> TrainConfig:
    """``config`` with the profile's values (and its name recorded)."""
    return configs.apply_profile(config, PROFILES, profile, profile=profile)


def _config_key(config: TrainConfig) -> dict[str, Any]:
    """The fields a checkpoint must agree on to be resumed (not the stopping criteria)."""
    skip = {"max_steps", "max_minutes", "epochs", "patience", "checkpoint_dir", "resume", "keep_checkpoints",
            "checkpoint_minutes", "compile"}
    return {k: v for k, v in asdict(config).items() if k not in skip}


def prompt_budget(requested: int | None, model: Any, encoder: PromptEncoder, data: PreparedData) -> int | None:
    """The prompt-length guard: ``requested``, or the model's context minus the longest catalog response, so
    that a prompt and any title always fit."""
    longest = max(len(encoder.response_ids(title)) for title in data.catalog.titles)
    context = getattr(model.config, "max_position_embeddings", None)
    budget = requested if requested is not None else (context - longest if context else None)
    if budget is not None and context and budget + longest > context:
        raise ValueError(f"max_prompt_tokens {budget} plus the longest title ({longest} tokens) exceeds the model's "
                         f"context of {context} tokens")
    return budget


def schedule_of(config: TrainConfig) -> Schedule:
    return Schedule(batch_size=config.batch_size, epochs=config.epochs, max_steps=config.max_steps,
                    max_minutes=config.max_minutes, grad_accum=config.grad_accum, warmup_steps=config.warmup_steps,
                    max_grad_norm=config.max_grad_norm, eval_every=config.eval_every, patience=config.patience,
                    seed=config.seed, checkpoint_minutes=config.checkpoint_minutes, lr_decay=config.lr_decay)


def attach_item_tokens(config: TrainConfig, model: PreTrainedModel, encoder: PromptEncoder, data: PreparedData) -> None:
    """Give the model the item tokens ``config.item_tokens`` asks for (see :mod:`llmrec.item_tokens`)."""
    if config.method == "lora":
        raise ValueError("item tokens are trained with the whole model; use --method full (LoRA would leave the "
                         "item vectors untrained)")
    if item_tokens.item_tokens_of(model) is not None:
        raise ValueError(f"{config.model} already has item tokens; fine-tune it with --item-tokens none")
    if config.item_tokens == "learned":
        item_tokens.attach(model, item_tokens.learned(model, [encoder.title_ids(t) for t in data.catalog.titles]))
        return
    from pruning.assist import AssistConfig, train_assistant

    sasrec, record = train_assistant(AssistConfig(artifact="", max_minutes=config.item_sasrec_minutes, seed=config.seed),
                                     data, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    logger.info("SASRec for the item tokens: valid NDCG@10 %.4f", record["best_valid_ndcg@10"])
    table = sasrec.items.weight.detach()[1:].cpu()  # row 0 is SASRec's padding
    item_tokens.attach(model, item_tokens.from_sasrec(model, table, config.seed))


def catalog_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor], vocabulary: LossVocabulary) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens over ``vocabulary``'s tokens (``loss_vocab`` 'catalog'): the
    decoder's final states at the positions before a label, (n, d), through those rows of the LM head only."""
    inputs = {key: value for key, value in model_inputs(batch).items() if key != "labels"}
    hidden = model.model(**inputs).last_hidden_state  # (B, T, d) after the final norm
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1, as the causal LM loss shifts
    labelled = labels != IGNORE
    logits = head_logits(model, hidden[:, :-1][labelled], vocabulary)  # (n, U)
    return torch.nn.functional.cross_entropy(logits.float(), vocabulary.columns(labels[labelled]))


def run(config: TrainConfig, data: PreparedData) -> Path:
    """Fine-tune ``config.model`` on ``data`` and write the artifact at ``config.output``."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        dataloader_config=DataLoaderConfiguration(non_blocking=True),  # with the engine's pinned batches
    )
    set_seed(config.seed)
    loaded = load_model(config.model, device="cpu", dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    template = get_template(config.template)
    if config.item_tokens != "none":
        attach_item_tokens(config, model, PromptEncoder(tokenizer, template), data)
    max_prompt_tokens = prompt_budget(config.max_prompt_tokens, model, PromptEncoder(tokenizer, template), data)
    encoder = PromptEncoder(tokenizer, template, config.max_history, max_prompt_tokens,
                            item_tokens.token_map(model, data.catalog.titles))
    packing = template.packable if config.packing is None else config.packing
    pad_id = int(tokenizer.pad_token_id)

    train_set = training_examples(data, encoder, packing, config.pack_stride, config.max_train_examples, config.seed)
    valid_set = split_examples(data, encoder, "valid", limit=config.valid_examples, seed=config.seed)
    if not train_set:
        raise ValueError("no training examples: the training split is empty")
    targets = sum(e.targets for e in train_set)
    items = sum(e.target_items(encoder.end_id) for e in train_set)
    tokens = sum(len(e.input_ids) for e in train_set)
    examples = len(train_set)
    logger.info(
        "training on %d examples (%d target items, %d target tokens, %d tokens, packing=%s), validating on %d",
        examples, items, targets, tokens, packing, len(valid_set),
    )
    if config.pack_tokens:
        train_set = pack(train_set, config.pack_tokens, config.seed)

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
    model.to(accelerator.device)  # before the optimiser, so that it is the fused kernel on a GPU
    optimizer = adamw(trainable, lr=config.lr, weight_decay=config.weight_decay)
    schedule = schedule_of(config)
    planned = schedule.total_steps(len(train_set), accelerator.num_processes)
    # accelerate steps a prepared scheduler once per process at every optimiser step (as it does the warm-up)
    scheduler = warmup_scheduler(optimizer, config.warmup_steps, config.lr_decay,
                                 planned * accelerator.num_processes if planned < sys.maxsize else None)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    selecting_ndcg = config.select_metric == "ndcg@10"
    engine = Engine(model, optimizer, schedule, scheduler=scheduler, accelerator=accelerator,
                    checkpoint_dir=config.checkpoint_path(), config_key=_config_key(config), resume=config.resume,
                    metric="valid_ndcg@10" if selecting_ndcg else "valid_loss", maximize=selecting_ndcg)
    valid_batches = validation_batches(valid_set, pad_id, config.batch_size, config.pack_tokens)
    inner = accelerator.unwrap_model(model)  # the plain model under any DDP / peft wrapper
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    ranking = (RankingCheck(inner, tokenizer, data, template, config.max_history, config.select_users, config.seed,
                            config.select_beams, max_prompt_tokens=max_prompt_tokens)
               if config.select_metric == "ndcg@10" else None)

    vocabulary = None
    if config.loss_vocab == "catalog":
        if accelerator.num_processes > 1:
            raise ValueError("loss_vocab 'catalog' trains on one process; use 'full' with several GPUs")
        vocabulary = catalog_vocabulary(inner, encoder, data, [*train_set, *valid_set]).to(accelerator.device)

    def validate() -> float:
        with accelerator.autocast(), eager_layers(inner):
            return ranking() if ranking is not None else mean_ce(inner, valid_batches, vocabulary)

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if vocabulary is None:  # through the (possibly DDP-wrapped) model's own forward, so gradients synchronise
            return model(**model_inputs(batch)).loss
        with accelerator.autocast():  # the decoder called directly misses the prepared model's autocast
            return catalog_loss(inner, batch, vocabulary)

    # the layers compiled in place are the same modules under any wrapper
    with compiled_layers(inner, config.compile) as compiled:
        engine.fit(train_set, lambda examples: collate(examples, pad_id), loss_of, validate)

    accelerator.wait_for_everyone()
    output = Path(config.output)
    if accelerator.is_main_process:
        final: Any = engine.unwrapped()
        engine.restore_best(final)
        if config.method == "lora":
            final = final.merge_and_unload()
        final.eval()
        manifest = {
            "stage": "finetune",
            "parent": str(config.model),
            "template": template.to_dict(),
            "max_history": config.max_history,
            "max_prompt_tokens": max_prompt_tokens,
            "dataset": data.summary(),
            "stage_config": asdict(config),
            "training": {
                "examples": examples, "rows": len(train_set), "target_items": items, "target_tokens": targets, "tokens": tokens,
                "packing": packing, "trainable_params": trainable_params, **engine.record(),
                "processes": accelerator.num_processes, "compiled_layers": compiled,
            },
        }
        write_artifact(output, final, tokenizer, data.catalog, manifest)
        if not config.keep_checkpoints:
            shutil.rmtree(config.checkpoint_path(), ignore_errors=True)
    accelerator.wait_for_everyone()
    return output
