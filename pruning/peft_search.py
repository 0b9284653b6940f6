"""PrunePEFT: choose where LoRA goes by pruning candidate adapters (arXiv 2506.07587).

Every (layer, projection) pair of the decoder (q/k/v/o of attention, gate/up/down of the MLP) starts with a
LoRA adapter of the same rank. The search runs rounds: train every live adapter briefly on the
recommendation loss, score the adapters with several pruning criteria, and drop the most prunable ones,
until the adapters left fit a trainable-parameter budget. The kept adapters' full module names are the
peft ``target_modules`` that ``prunerec train --method lora --lora-targets <json>`` consumes.

Criteria (each: higher = more useful; computed per adapter on its LoRA weights ``A`` (r, in), ``B`` (out, r)
and ``ΔW = B·A``):

- ``magnitude``: mean |ΔW|;
- ``zeros``: 1 − the share of ΔW entries that are near zero (below 1e-3 of the round's mean |ΔW|);
- ``threshold``: the share of ΔW entries above the round's median |ΔW| over all live adapters;
- ``activation``: mean |B·A·x| per real token, accumulated over the round's steps;
- ``gradient``: mean |∂L/∂w| over A and B, accumulated over the steps;
- ``taylor``: mean |w·∂L/∂w| over A and B (first-order Taylor estimate of the loss change on removal).

Fixes to the released code: activation statistics are kept per adapter (the released code shared one
buffer between modules, so every module saw the last one's activations), gradients are made absolute
before summing (signed sums cancel), Taylor scores are |w·g| (not w·|g|), and padding is masked.

**Hybrid assignment.** Which criteria judge an adapter depends on its type (attention or MLP) and depth
band (the first, middle or last third of the layers), as the paper found no single criterion best
everywhere. The criteria of a cell are fused by rank-weighted votes (a Borda count): each criterion ranks
the live adapters from most to least prunable, an adapter's vote is its normalised rank in [0, 1], and the
fused score is the mean vote; the lowest scores are dropped first. The default assignment is ours (the
paper's exact table depends on its model and task); it is configurable.

A dropped adapter's ``B`` is zeroed and frozen: its branch then contributes exactly nothing, which is the
same as not having it, so one peft model serves all rounds.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmrec.model import DEFAULT_MODEL, load_model
from llmrec.prompting import PromptEncoder
from pruning.calibration import Batch, batches, recommendation_loss
from pruning.engine import Engine, Schedule
from pruning.examples import training_examples
from recdata.prep import PreparedData
from recdata.prompts import get_template

logger = logging.getLogger(__name__)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CRITERIA = ("magnitude", "zeros", "threshold", "activation", "gradient", "taylor")
BANDS = ("shallow", "middle", "deep")

DEFAULT_ASSIGNMENT: dict[str, list[str]] = {
    "attn/shallow": ["gradient", "activation"],
    "attn/middle": ["taylor", "magnitude"],
    "attn/deep": ["taylor", "activation"],
    "mlp/shallow": ["magnitude", "zeros"],
    "mlp/middle": ["taylor", "threshold"],
    "mlp/deep": ["gradient", "taylor"],
}


@dataclass
class PeftSearchConfig:
    """A PrunePEFT search; every field is written into the output JSON."""

    output: str
    """JSON file to write (``target_modules`` and the search record)."""
    model: str = DEFAULT_MODEL
    """Base model to fine-tune later (alias, HF directory or artifact), the one ``prunerec train`` will use."""
    template: str = "compact"
    """Prompt template (as in train): compact or d3."""
    max_history: int = 10
    """Items of history per prompt."""
    rank: int = 8
    """LoRA rank of every candidate (and of the resulting configuration)."""
    alpha: int = 16
    """LoRA alpha of every candidate."""
    projections: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    """Projection names that are candidates in every layer."""
    budget: float = 0.25
    """Trainable-parameter budget as a share of all candidates' LoRA parameters (used if budget_params is None)."""
    budget_params: int | None = None
    """Trainable-parameter budget in parameters (e.g. the count of a plain LoRA to match)."""
    drop_fraction: float = 0.3
    """Share of the live adapters dropped per round (the last round trims to the budget)."""
    steps_per_round: int = 6
    """Training steps before each round's scoring."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 1e-3
    """LoRA learning rate during the search."""
    examples: int = 256
    """Seeded subset of training examples the rounds train on."""
    assignment: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_ASSIGNMENT))
    """Criteria per '<attn|mlp>/<shallow|middle|deep>' cell."""
    seed: int = 0
    """Random seed (LoRA initialisation, example sample, batch order)."""

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], not {self.budget}")
        if not 0 < self.drop_fraction < 1:
            raise ValueError(f"drop_fraction must be in (0, 1), not {self.drop_fraction}")
        unknown = {c for criteria in self.assignment.values() for c in criteria} - set(CRITERIA)
        cells = {f"{kind}/{band}" for kind in ("attn", "mlp") for band in BANDS}
        if unknown or set(self.assignment) != cells or not all(self.assignment.values()):
            raise ValueError(f"assignment needs one non-empty list of {CRITERIA} for each of {sorted(cells)}")


@dataclass
class Candidate:
    name: str
    """Full module name in the base model, e.g. ``model.layers.3.self_attn.q_proj``."""
    layer: int
    kind: str
    """attn or mlp"""
    band: str
    params: int
    """LoRA parameters: rank × (in + out)."""
    module: Any
    """The peft LoRA layer (an ``nn.Linear`` before the adapters are injected)."""


def candidates_of(model: Any, projections: list[str], rank: int) -> list[Candidate]:
    """The candidate adapters of a base model, in layer order; shapes come from the modules."""
    layers = len(model.model.layers)
    out = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) < 5 or parts[1] != "layers" or parts[-1] not in projections or not isinstance(module, nn.Linear):
            continue
        layer = int(parts[2])
        band = BANDS[min(3 * layer // layers, 2)]
        kind = "attn" if parts[3] == "self_attn" else "mlp"
        out.append(Candidate(name, layer, kind, band, rank * (module.in_features + module.out_features), module))
    if not out:
        raise ValueError(f"no candidate modules named {projections} in the model")
    return out


def budget_of(config: PeftSearchConfig, total: int) -> int:
    budget = config.budget_params if config.budget_params is not None else int(config.budget * total)
    if budget <= 0:
        raise ValueError("the trainable-parameter budget must be positive")
    return budget


class _Statistics:
    """Per-adapter accumulators of one round (activation, |g|, |w·g|); separate state per adapter."""

    def __init__(self, names: list[str]):
        self.activation = dict.fromkeys(names, 0.0)
        self.gradient = dict.fromkeys(names, 0.0)
        self.taylor = dict.fromkeys(names, 0.0)
        self.token_mask: torch.Tensor | None = None

    def activation_hook(self, name: str):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            magnitude = output.detach().abs().mean(-1)  # (B, T)
            if self.token_mask is not None:
                mask = self.token_mask.to(magnitude.dtype)
                self.activation[name] += float((magnitude * mask).sum() / mask.sum().clamp(min=1.0))
            else:
                self.activation[name] += float(magnitude.mean())

        return hook


def _lora_pair(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return module.lora_A["default"].weight, module.lora_B["default"].weight


def score(live: list[Candidate], stats: _Statistics) -> dict[str, dict[str, float]]:
    """Every criterion's value for every live adapter (higher = more useful)."""
    deltas = {}
    for c in live:
        a, b = _lora_pair(c.module)
        deltas[c.name] = (b.detach().float() @ a.detach().float()).abs()  # (out, in)
    mean_magnitude = float(torch.stack([d.mean() for d in deltas.values()]).mean())
    median = float(torch.cat([d.flatten()[:: max(1, d.numel() // 4096)] for d in deltas.values()]).median())
    values: dict[str, dict[str, float]] = {criterion: {} for criterion in CRITERIA}
    for c in live:
        delta = deltas[c.name]
        values["magnitude"][c.name] = float(delta.mean())
        values["zeros"][c.name] = 1.0 - float((delta < 1e-3 * mean_magnitude).float().mean())
        values["threshold"][c.name] = float((delta > median).float().mean())
        values["activation"][c.name] = stats.activation[c.name]
        values["gradient"][c.name] = stats.gradient[c.name]
        values["taylor"][c.name] = stats.taylor[c.name]
    return values


def fuse(live: list[Candidate], values: dict[str, dict[str, float]], assignment: dict[str, list[str]]) -> dict[str, float]:
    """Rank-weighted votes: per criterion a normalised rank (0 = most prunable), averaged over the criteria
    of the adapter's cell. Ties are broken by the candidate order, so the result is deterministic."""
    votes: dict[str, dict[str, float]] = {}
    denominator = max(len(live) - 1, 1)
    for criterion, per_name in values.items():
        ordered = sorted((c.name for c in live), key=lambda name: per_name[name])
        votes[criterion] = {name: rank / denominator for rank, name in enumerate(ordered)}
    return {c.name: sum(votes[k][c.name] for k in assignment[f"{c.kind}/{c.band}"]) / len(assignment[f"{c.kind}/{c.band}"]) for c in live}


def search(config: PeftSearchConfig, data: PreparedData, device: str | None = None) -> dict:
    """Run the search and write ``config.output``; returns the written record."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    loaded = load_model(config.model, device=device or "cpu", dtype=torch.float32)
    base, tokenizer = loaded.model, loaded.tokenizer
    encoder = PromptEncoder(tokenizer, get_template(config.template), config.max_history)
    examples = training_examples(data, encoder, encoder.template.packable, None, config.examples, config.seed)
    train = batches(examples, int(tokenizer.pad_token_id), config.batch_size)
    if not train:
        raise ValueError("no training examples for the search")

    candidates = candidates_of(base, config.projections, config.rank)
    total = sum(c.params for c in candidates)
    budget = budget_of(config, total)
    if budget >= total:
        raise ValueError(f"the budget ({budget:,}) already holds every candidate ({total:,} parameters); nothing to search")
    smallest = min(c.params for c in candidates)
    if budget < smallest:
        raise ValueError(f"the budget ({budget:,}) is smaller than the smallest adapter ({smallest:,} parameters)")

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=[c.name for c in candidates])
    model = get_peft_model(base, lora)
    inner: Any = model.get_base_model()
    modules = dict(inner.named_modules())
    for c in candidates:
        c.module = modules[c.name]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    model_device = next(model.parameters()).device
    # one engine for every round, so that the batch order runs on across rounds; no clipping, as the search
    # scores the adapters' raw gradients
    schedule = Schedule(batch_size=1, epochs=math.inf, max_grad_norm=None, seed=config.seed)
    engine = Engine(model, optimizer, schedule, desc="peft search")

    live = list(candidates)
    rounds = []
    stats = _Statistics([])
    losses: list[float] = []

    def loss_of(batch: Batch) -> torch.Tensor:
        batch = batch.to(model_device)
        stats.token_mask = batch.attention_mask
        loss = recommendation_loss(inner, batch)
        losses.append(float(loss.detach()))
        return loss

    def accumulate_gradients() -> None:
        for c in live:
            a, b = _lora_pair(c.module)
            grads = [(w, w.grad) for w in (a, b) if w.grad is not None]
            n = sum(w.numel() for w, _ in grads) or 1
            stats.gradient[c.name] += sum(float(g.abs().sum()) for _, g in grads) / n
            stats.taylor[c.name] += sum(float((w.detach() * g).abs().sum()) for w, g in grads) / n

    while sum(c.params for c in live) > budget:
        stats = _Statistics([c.name for c in live])
        losses = []
        handles = [c.module.lora_B["default"].register_forward_hook(stats.activation_hook(c.name)) for c in live]
        try:
            engine.fit(train, lambda items: items[0], loss_of, after_backward=accumulate_gradients,
                       until_step=engine.state.step + config.steps_per_round)
        finally:
            for handle in handles:
                handle.remove()
        fused = fuse(live, score(live, stats), config.assignment)
        order = sorted(live, key=lambda c: fused[c.name])
        quota = max(1, math.ceil(config.drop_fraction * len(live)))
        dropped: list[Candidate] = []
        remaining = sum(c.params for c in live)
        for c in order:  # most prunable first, until the round's quota or the budget is reached
            if remaining <= budget or len(dropped) >= quota:
                break
            dropped.append(c)
            remaining -= c.params
        for c in dropped:
            a, b = _lora_pair(c.module)
            with torch.no_grad():
                b.zero_()
            a.requires_grad_(False)
            b.requires_grad_(False)
            optimizer.state.pop(a, None)
            optimizer.state.pop(b, None)
        names = {c.name for c in dropped}
        live = [c for c in live if c.name not in names]
        rounds.append({"live_before": len(live) + len(dropped), "dropped": sorted(names), "params_after": remaining,
                       "mean_loss": sum(losses) / len(losses)})
        logger.info("peft search round %d: dropped %d adapters, %d left (%s params, budget %s), loss %.4f",
                    len(rounds), len(dropped), len(live), f"{remaining:,}", f"{budget:,}", rounds[-1]["mean_loss"])
    engine.close()

    kept = [c for c in candidates if c in live]
    record = {
        "target_modules": [c.name for c in kept],
        "rank": config.rank,
        "alpha": config.alpha,
        "trainable_params": sum(c.params for c in kept),
        "budget_params": budget,
        "all_candidates": len(candidates),
        "all_candidates_params": total,
        "kept_per_cell": {
            f"{kind}/{band}": sum(1 for c in kept if c.kind == kind and c.band == band) for kind in ("attn", "mlp") for band in BANDS
        },
        "kept_per_projection": {p: sum(1 for c in kept if c.name.endswith("." + p)) for p in config.projections},
        "rounds": rounds,
        "config": asdict(config),
        "dataset": data.summary(),
    }
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(output)
    return record


def read_search(path: str | Path) -> dict:
    """A search result (``target_modules``, ``rank``, ``alpha``); a clear error if it is not one."""
    payload = json.loads(Path(path).read_text())
    if not isinstance(payload, dict) or not isinstance(payload.get("target_modules"), list) or not payload["target_modules"]:
        raise ValueError(f"{path} has no non-empty 'target_modules' list (write one with `prunerec peft-search`)")
    return payload
