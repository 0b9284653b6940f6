"""TRSP / ELDeR: regularised depth pruning (arXiv 2505.18232; ELDeR is its first version).

An alternative to the greedy depth stage of :mod:`pruning.prune`. Every decoder layer ``f`` gets a learnable
scalar gate ``s`` in the delta form ``h + s·(f(h) − h)``: s = 1 is the unchanged layer, s = 0 the removed one.
The gates are attached with forward hooks, so the model's source is never edited.

1. **Selection (stage one).** Train the gates on the recommendation loss plus ``λ1·Σ|s|`` over the live gates;
   after every round the live layer with the smallest ``|s|`` joins the pruned set and is bypassed, until
   the target number of layers is chosen. The gates have their own optimiser (SGD by default: Adam's first
   updates are ±lr whatever the gradient, a sign vote that says nothing about which gate matters).
2. **Regularisation (stage two).** With every layer running, train the model's weights on the recommendation
   loss plus ``λ2`` times the mean over chosen layers of ``‖f(h) − h‖ / ‖h‖`` per token (padding masked),
   which pushes the chosen layers toward the identity and moves their work into the kept ones. Stop when
   bypassing the chosen layers costs at most ``tolerance`` (relative) of the held-out recommendation loss,
   or when the step budget is spent.
3. The chosen layers are removed physically (:func:`pruning.surgery.drop_layers`), as in the default stage;
   the pipeline then recovers the result by distillation like any other stage.

ELDeR is the setting ``λ1 = 0`` (gates learnt from the recommendation loss alone); recovery is optional.

The gate is evaluated as ``s·f(h) + (1 − s)·h`` — equal to the delta form, but exact in floating point at
both ends: s = 1 returns ``f(h)`` bit for bit and s = 0 returns ``h``, so an all-ones gate set reproduces the
model's logits exactly and a zero gate equals deleting the layer.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from pruning.calibration import Batch, batches, mean_ce, recommendation_loss
from pruning.engine import Engine, Schedule, frozen
from pruning.examples import Example
from pruning.importance import layers_replaced
from pruning.surgery import drop_layers

logger = logging.getLogger(__name__)


@dataclass
class TRSPConfig:
    """Settings of the TRSP depth stage (``--depth-method trsp``; ``elder`` sets ``lambda1 = 0``)."""

    lambda1: float = 0.05
    """Weight of the L1 penalty Σ|s| over live gates in stage one (0 = ELDeR)."""
    lambda2: float = 1.0
    """Weight of the identity penalty on the chosen layers in stage two."""
    steps_per_round: int = 8
    """Stage one: gate-training steps before each selection (one layer is chosen per round)."""
    gate_optimizer: Literal["sgd", "adam"] = "sgd"
    """Optimiser of the gates: sgd or adam."""
    gate_lr: float = 0.5
    """Learning rate of the gates (their own optimiser, separate from the weights'). The gates' gradients are
    small (≈0.05 on SmolLM2: one scalar scales a whole layer's update of a loss averaged over tokens), so a
    large SGD rate is what lets a gate move by tenths within a round."""
    stage_two_steps: int = 200
    """Stage two: the most weight-training steps."""
    stage_two_minutes: float | None = None
    """Stage two: time budget (None = steps only)."""
    lr: float = 1e-4
    """Stage two: AdamW learning rate of the model weights."""
    tolerance: float = 0.02
    """Stage two stops when bypassing the chosen layers raises the held-out loss by at most this share."""
    check_every: int = 20
    """Stage two: steps between held-out checks."""
    batch_size: int = 8
    """Examples per step of both stages."""
    recovery: bool = True
    """Distil the result like the other stages (False: ELDeR without recovery fine-tuning)."""
    seed: int = 0
    """Seed of the batch order."""


class LayerGates(nn.Module):
    """One scalar gate per decoder layer, applied by forward hooks (see the module docstring)."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_layers))
        self.penalised: list[int] = []
        """Layers whose ‖f(h) − h‖ / ‖h‖ is recorded at each forward (stage two)."""
        self.token_mask: torch.Tensor | None = None
        """(B, T) attention mask of the current batch; padding is left out of the penalty."""
        self.penalties: list[torch.Tensor] = []

    def _hook(self, index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
            hidden_in = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
            hidden_out = output[0] if isinstance(output, tuple) else output
            if index in self.penalised:
                delta = (hidden_out.float() - hidden_in.float()).norm(dim=-1)
                relative = delta / hidden_in.float().norm(dim=-1).clamp(min=1e-6)  # (B, T)
                if self.token_mask is not None:
                    mask = self.token_mask.to(relative.dtype)
                    self.penalties.append((relative * mask).sum() / mask.sum().clamp(min=1.0))
                else:
                    self.penalties.append(relative.mean())
            s = self.scale[index].to(hidden_out.dtype)
            mixed = s * hidden_out + (1 - s) * hidden_in
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    @contextlib.contextmanager
    def attached(self, model: PreTrainedModel) -> Iterator[LayerGates]:
        layers = list(model.model.layers)
        if len(layers) != self.scale.numel():
            raise ValueError(f"{self.scale.numel()} gates for a model with {len(layers)} layers")
        self.to(next(model.parameters()).device)
        handles = [layer.register_forward_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def take_penalty(self) -> torch.Tensor:
        """Mean recorded penalty over the penalised layers since the last call (0 if none)."""
        if not self.penalties:
            return torch.zeros((), device=self.scale.device)
        value = torch.stack(self.penalties).mean()
        self.penalties = []
        return value


def _single(items: list[Batch]) -> Batch:
    """The engine's collate for pre-built batches (one per step)."""
    return items[0]


def select_layers(
    model: PreTrainedModel, train: list[Batch], remove: int, config: TRSPConfig
) -> tuple[list[int], list[list[float]]]:
    """Stage one: choose ``remove`` layers by iterative gate training; returns them (in the order chosen)
    and the gate values seen at each selection. The model's weights are not changed."""
    layers = list(model.model.layers)
    gates = LayerGates(len(layers))
    params = [gates.scale]
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=config.gate_lr) if config.gate_optimizer == "sgd" else torch.optim.Adam(params, lr=config.gate_lr)
    )
    # one engine for every round, so that the batch order runs on across rounds; no clipping: the gates'
    # gradients are small already (see TRSPConfig.gate_lr)
    rounds = remove * config.steps_per_round
    schedule = Schedule(batch_size=1, epochs=math.inf, max_steps=rounds, max_grad_norm=None, seed=config.seed)
    engine = Engine(gates, optimizer, schedule, desc="trsp gates")
    device = next(model.parameters()).device
    chosen: list[int] = []
    history: list[list[float]] = []
    live: list[int] = []

    def loss_of(batch: Batch) -> torch.Tensor:
        return recommendation_loss(model, batch.to(device)) + config.lambda1 * gates.scale[live].abs().sum()

    model.eval()  # dropout off: the gates are judged on the deterministic model
    try:
        with frozen(model), gates.attached(model):
            for _ in range(remove):
                live = [i for i in range(len(layers)) if i not in chosen]
                # a bypassed gate (s = 0) equals skipping the layer, so the chosen layers are not run at all
                with layers_replaced(model, [layers[i] for i in live]):
                    engine.fit(train, _single, loss_of, until_step=engine.state.step + config.steps_per_round)
                values = gates.scale.detach().clone().cpu()
                history.append(values.tolist())
                pick = min(live, key=lambda i: abs(float(values[i])))
                chosen.append(pick)
                with torch.no_grad():
                    gates.scale[pick] = 0.0
                logger.info("trsp round %d: layer %d chosen (|s| = %.4f)", len(chosen), pick, abs(float(values[pick])))
    finally:
        engine.close()
    return chosen, history


def bypass_gap(model: PreTrainedModel, held_out: list[Batch], chosen: list[int]) -> tuple[float, float]:
    """Held-out recommendation loss with every layer, and with the chosen layers bypassed."""
    layers = list(model.model.layers)
    full = mean_ce(model, held_out)
    with layers_replaced(model, [layer for i, layer in enumerate(layers) if i not in set(chosen)]):
        bypassed = mean_ce(model, held_out)
    return full, bypassed


def regularise(
    model: PreTrainedModel, train: list[Batch], held_out: list[Batch], chosen: list[int], config: TRSPConfig
) -> dict:
    """Stage two: train the weights toward making the chosen layers the identity (in place). The engine
    validates the relative bypass cost every ``check_every`` steps and stops once it is within tolerance."""
    gates = LayerGates(len(model.model.layers))
    gates.scale.requires_grad_(False)
    gates.penalised = list(chosen)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    schedule = Schedule(batch_size=1, epochs=math.inf, max_steps=config.stage_two_steps,
                        max_minutes=config.stage_two_minutes, eval_every=config.check_every, seed=config.seed + 1)
    engine = Engine(model, optimizer, schedule, desc="trsp identity", metric="bypass_cost", keep_best=False)
    history: list[dict[str, float]] = []
    penalties: list[float] = []

    def loss_of(batch: Batch) -> torch.Tensor:
        batch = batch.to(device)
        gates.token_mask = batch.attention_mask
        rec = recommendation_loss(model, batch)
        penalty = gates.take_penalty()
        penalties.append(float(penalty.detach()))
        return rec + config.lambda2 * penalty

    def check() -> float:
        gates.penalised = []  # the held-out check records nothing
        full, bypassed = bypass_gap(model, held_out, chosen)
        gates.penalised = list(chosen)
        gates.take_penalty()
        entry = {"step": engine.state.step, "full": full, "bypassed": bypassed}
        if penalties:
            entry["identity_penalty"] = penalties[-1]
        history.append(entry)
        logger.info("trsp step %d: held-out %.4f, bypassed %.4f", engine.state.step, full, bypassed)
        return (bypassed - full) / max(full, 1e-12)

    with gates.attached(model):
        reason = engine.fit(train, _single, loss_of, check, stop_when=lambda cost: cost <= config.tolerance,
                            target_reason="bypass cost within tolerance")
    model.eval()
    record = engine.record()
    return {"steps": record["steps"], "stop_reason": reason, "minutes": record["minutes"], "held_out": history,
            "identity_penalty": penalties}


def trsp_depth(
    model: PreTrainedModel, train_examples: list[Example], held_out_examples: list[Example], pad_id: int, remove: int,
    config: TRSPConfig,
) -> tuple[PreTrainedModel, dict]:
    """The whole TRSP depth stage: select, regularise, remove. Returns the smaller model and a record."""
    if remove <= 0:
        return model, {}
    train = batches(train_examples, pad_id, config.batch_size)
    held_out = batches(held_out_examples, pad_id, config.batch_size)
    if not train or not held_out:
        raise ValueError("TRSP needs training and held-out examples")
    chosen, gate_history = select_layers(model, train, remove, config)
    record: dict = {"method": "trsp" if config.lambda1 > 0 else "elder", "chosen_layers": chosen, "gates_per_round": gate_history}
    record["stage_two"] = regularise(model, train, held_out, chosen, config)
    final = record["stage_two"]["held_out"][-1]
    record["removed_layers"] = sorted(chosen)
    record["bypass_cost"] = (final["bypassed"] - final["full"]) / max(final["full"], 1e-12) if math.isfinite(final["full"]) else None
    return drop_layers(model, chosen), record
