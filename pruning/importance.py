"""Importance scores for the PruneRec stages (arXiv 2507.07064, §3.2–3.4).

- Attention heads: KL(teacher ‖ model with the head ablated) at the response positions of the calibration
  set. A head is ablated by zeroing its slice of the ``o_proj`` input; a KV group by zeroing all of its
  query heads. Each layer's input is cached from one clean pass, and the ablated pass starts at that layer
  (the layers before it are unaffected), which halves the cost on average; a layer's units are ablated
  together, each on its own copy of the batch in one pass (fewer passes; the same scores). The scores depend
  only on the model, the calibration set and the teacher's targets, so :func:`reused_head_importance` keeps them per
  process, keyed by a digest of all three: the retention curve prunes one dense model to several targets and
  scores its heads once (about 5 minutes per target on a 2-core CPU).
- Residual channels: activation energy E[y_d²] at the output of every RMSNorm (what enters q/k/v/gate/up and
  the LM head), summed over norms, padding masked.
- MLP channels: E[|x_c|] of the real input of ``down_proj`` (act(gate)·up) times the norm of the matching
  ``down_proj`` column (the channel's contribution to the residual stream).
- Layers: the calibration recommendation loss with each remaining layer removed (BlockPruner style,
  arXiv 2406.10594), greedily; a round scores every candidate in one layer-at-a-time pass per batch, the
  candidates as copies of the batch that branch off where their layer is left out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning import reuse
from pruning.calibration import Batch, TeacherTargets, coarse_kl
from pruning.layerwise import LayerwiseBatch, decoder_inputs, run_layer, tiled
from pruning.surgery import shape_of

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def layers_replaced(model: PreTrainedModel, layers: list[nn.Module]) -> Iterator[None]:
    """Run the model with another list of decoder layers (a suffix, or one with a layer left out)."""
    original = model.model.layers
    model.model.layers = nn.ModuleList(layers)
    try:
        yield
    finally:
        model.model.layers = original


def _kl_from_layer(
    model: PreTrainedModel, start: int, inputs: list[LayerwiseBatch], calibration: list[Batch], targets: list[TeacherTargets],
    copies: int,
) -> torch.Tensor:
    """(copies,) the mean KL(teacher ‖ model) over the calibration set's response positions, the layers from
    ``start`` on run over ``copies`` copies of each batch in one pass (the hooks in place tell the copies apart)."""
    device = next(model.parameters()).device
    totals = torch.zeros(copies, dtype=torch.float64, device=device)
    count = 0
    with layers_replaced(model, list(model.model.layers)[start:]):
        for batch, cached, target in zip(calibration, inputs, targets, strict=True):
            batch = batch.to(device)
            assert cached.streams is not None
            embeds = cached.streams[start].repeat(copies, 1, 1)  # (copies·B, T, d): the batch once per copy
            hidden = model.model(inputs_embeds=embeds, attention_mask=batch.attention_mask.repeat(copies, 1),
                                 use_cache=False).last_hidden_state
            assert batch.response_index is not None
            states = hidden.reshape(copies, -1, hidden.shape[-1]).index_select(1, batch.response_index)  # (copies, n, d)
            n, k = target.top_index.shape
            per_copy = TeacherTargets(target.top_index.expand(copies, n, k), target.top_logprob, target.tail_logprob)
            totals += coarse_kl(per_copy, model.lm_head(states)).sum(-1)  # (copies,)
            count += n
    return (totals / max(count, 1)).float().cpu()


ABLATION_ROWS = 256
"""Most sequences in one ablation pass of :func:`head_importance` (a calibration batch times the units it
ablates at once): on a GPU the `gpu` profile's batches of 32 run 8 units a pass; the LM head over the response
positions of those copies is the largest tensor (~0.5 GB for SmolLM2's vocabulary there)."""


@torch.no_grad()
def head_importance(
    model: PreTrainedModel, calibration: list[Batch], targets: list[TeacherTargets], level: str = "both"
) -> dict[str, torch.Tensor]:
    """KL when ablating each KV group ("groups": (L, kv_heads)) and each query head ("heads": (L, heads)).

    ``level`` picks "groups", "heads" or "both" (only what a plan needs is computed).
    """
    if level not in LEVEL_PARTS:
        raise ValueError(f"level must be one of {sorted(LEVEL_PARTS)}, got {level!r}")
    model.eval()
    shape = shape_of(model)
    inputs = decoder_inputs(model, calibration, streams=True)
    device = next(model.parameters()).device
    results: dict[str, torch.Tensor] = {}
    units: list[tuple[str, int]] = []
    if level in ("groups", "both"):
        results["groups"] = torch.zeros(shape.layers, shape.kv_heads)
        units += [("groups", g) for g in range(shape.kv_heads)]
    if level in ("heads", "both"):
        results["heads"] = torch.zeros(shape.layers, shape.heads)
        units += [("heads", h) for h in range(shape.heads)]

    # one zero-one mask over the o_proj input per ablated unit (U, heads·hd); a pass runs the batch once per unit
    # of a chunk, each copy with its own mask, so a layer's units cost a few passes, not one each (on a GPU
    # each pass is mostly the host launching the layers' kernels)
    masks = torch.ones(len(units), shape.heads * shape.head_dim, device=device)
    for row, (kind, unit) in enumerate(units):
        heads = range(unit * shape.groups, (unit + 1) * shape.groups) if kind == "groups" else [unit]
        for head in heads:
            masks[row, head * shape.head_dim : (head + 1) * shape.head_dim] = 0.0
    largest = max((b.input_ids.shape[0] for b in calibration), default=1)
    per_pass = max(1, ABLATION_ROWS // largest)
    chunk = masks  # the masks of the pass under way (rebound per pass; the hook reads the current one)

    def apply_mask(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (copies·B, T, heads·hd)
        return ((x.reshape(chunk.shape[0], -1, *x.shape[1:]) * chunk[:, None, None, :]).reshape(x.shape),)

    progress = tqdm(total=shape.layers * len(units), desc="head importance", unit="ablation")
    for layer in range(shape.layers):
        o_proj = model.model.layers[layer].self_attn.o_proj
        scores = []
        with _hooks([o_proj.register_forward_pre_hook(apply_mask)]):
            for first in range(0, len(units), per_pass):
                chunk = masks[first : first + per_pass]
                scores.append(_kl_from_layer(model, layer, inputs, calibration, targets, chunk.shape[0]))
                progress.update(chunk.shape[0])
        for (kind, unit), score in zip(units, torch.cat(scores).tolist(), strict=True):
            results[kind][layer, unit] = score
    progress.close()
    return results


LEVEL_PARTS = {"groups": {"groups"}, "heads": {"heads"}, "both": {"groups", "heads"}}
HEAD_SCORES_KEPT = 4
"""Models whose head scores the process keeps (least recently used dropped first; a few KB each)."""
_HEAD_SCORES: reuse.ProcessStore[dict[str, torch.Tensor]] = reuse.ProcessStore(HEAD_SCORES_KEPT, dict)


def scoring_key(model: PreTrainedModel, calibration: list[Batch], targets: list[TeacherTargets]) -> str:
    """A digest of everything head scores depend on: the model's weights and config, the calibration batches,
    the teacher's targets, and the device they are computed on (about a second for SmolLM2 on a CPU)."""
    into = hashlib.blake2b(digest_size=16)
    reuse.digest_model(model, into)
    for batch in calibration:
        reuse.digest_tensors([t for t in (batch.input_ids, batch.attention_mask, batch.labels, batch.position_ids)
                              if t is not None], into)
    for target in targets:
        reuse.digest_tensors([target.top_index, target.top_logprob, target.tail_logprob], into)
    return into.hexdigest()


def reused_head_importance(
    model: PreTrainedModel, calibration: list[Batch], targets: list[TeacherTargets], level: str = "both"
) -> dict[str, torch.Tensor]:
    """:func:`head_importance`, computed once per (model, calibration set, teacher targets) in this process:
    what an earlier call scored is reused, only the parts ``level`` needs that it lacks are computed."""
    known = _HEAD_SCORES.get(scoring_key(model, calibration, targets))
    missing = LEVEL_PARTS[level] - set(known)
    if missing:
        known.update(head_importance(model, calibration, targets, "both" if len(missing) == 2 else missing.pop()))
    else:
        logger.info("head importance: reusing the scores computed earlier in this process for the same model, "
                    "calibration set and teacher")
    return {part: known[part].clone() for part in sorted(LEVEL_PARTS[level])}


@torch.no_grad()
def _accumulate(
    model: PreTrainedModel,
    calibration: list[Batch],
    modules: list[nn.Module],
    statistic: Callable[[torch.Tensor], torch.Tensor],
    on_input: bool,
) -> list[torch.Tensor]:
    """Mean of ``statistic`` over non-padding tokens at each module's input or output."""
    sums: list[torch.Tensor | None] = [None] * len(modules)
    count = 0
    current: dict[str, torch.Tensor] = {}

    def hook_for(index: int) -> Callable:
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor | None = None) -> None:
            tensor = args[0] if on_input else output
            assert tensor is not None
            values = statistic(tensor[current["mask"]].float()).sum(0)  # (channels,)
            previous = sums[index]
            sums[index] = values if previous is None else previous + values

        return hook

    handles = [
        m.register_forward_pre_hook(hook_for(i)) if on_input else m.register_forward_hook(hook_for(i))
        for i, m in enumerate(modules)
    ]
    device = next(model.parameters()).device
    with _hooks(handles):
        for batch in calibration:
            batch = batch.to(device)
            current["mask"] = batch.attention_mask.bool()
            count += int(current["mask"].sum())
            model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return [s / count for s in sums if s is not None]


def residual_importance(model: PreTrainedModel, calibration: list[Batch]) -> torch.Tensor:
    """(d,) activation energy of each residual channel at every RMSNorm output, summed."""
    model.eval()
    norms: list[nn.Module] = []
    for layer in model.model.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    norms.append(model.model.norm)
    energies = _accumulate(model, calibration, norms, lambda x: x.pow(2), on_input=False)
    # Each norm weighs equally: energies are normalised to unit mean before summing.
    return torch.stack([e / e.mean().clamp(min=1e-12) for e in energies]).sum(0).cpu()


def mlp_importance(model: PreTrainedModel, calibration: list[Batch]) -> torch.Tensor:
    """(L, I) |down_proj input| times the norm of the matching down_proj column."""
    model.eval()
    downs = [layer.mlp.down_proj for layer in model.model.layers]
    magnitudes = _accumulate(model, calibration, downs, lambda x: x.abs(), on_input=True)
    return torch.stack([m * d.weight.detach().float().norm(dim=0) for m, d in zip(magnitudes, downs, strict=True)]).cpu()


LAYER_SEARCH_ROWS = 256
"""Most sequences one layer call of :func:`greedy_layer_removal` runs on a GPU (copies of a calibration batch
stacked): there a small layer's call costs its launches, not its arithmetic. On a CPU a call runs one copy:
stacking them bought nothing there (the cpu benchmark's 2-mlp model, 6 of 30 layers removed on 16 samples:
87-93 s a copy per call, 91-93 s for the trials run one by one before, 102 s with 32 copies a call)."""


@torch.no_grad()
def _loss_without_each(model: PreTrainedModel, layers: list[nn.Module], kept: list[int], inputs: list[LayerwiseBatch],
                       calibration: list[Batch], max_rows: int) -> torch.Tensor:
    """(len(kept),) the calibration CE of the stack ``kept`` with each of its layers left out in turn.

    One pass per batch: block 0 of a stack of stream copies runs every kept layer; when kept layer p comes, the
    copy that leaves it out branches off the block 0 stream as it enters p and runs only the layers after it.
    So layer p runs on 1 + p copies, ~K²/2 layer-copies a round, as many as separate trials that start at
    the left-out layer, in K calls a batch instead of ~K²/2 (on a GPU, the host's launches set a small
    layer's time)."""
    device = next(model.parameters()).device
    totals = torch.zeros(len(kept), dtype=torch.float64, device=device)
    count = 0
    for batch, captured in zip(calibration, inputs, strict=True):
        batch = batch.to(device)
        rows = captured.rows
        per_call = max(1, max_rows // rows)  # copies of the batch in one layer call
        # (1 + K) copies, copy-major: block 0 runs every kept layer, block 1 + p leaves out kept[p]
        stream = captured.hidden.new_empty((1 + len(kept)) * rows, *captured.hidden.shape[1:])
        stream[:rows] = captured.hidden
        for p, index in enumerate(kept):
            entering = stream[:rows].clone()
            for first in range(0, 1 + p, per_call):
                copies = min(per_call, 1 + p - first)
                part = slice(first * rows, (first + copies) * rows)
                stream[part] = run_layer(layers[index], stream[part], tiled(captured.kwargs[index], rows, copies))
            stream[(1 + p) * rows : (2 + p) * rows] = entering
        for p in range(len(kept)):
            hidden = model.model.norm(stream[(1 + p) * rows : (2 + p) * rows])
            logits = model.lm_head(batch.response_states(hidden))
            totals[p] += nn.functional.cross_entropy(logits.float(), batch.targets, reduction="sum")
        count += int(batch.targets.numel())
    if count == 0:
        raise ValueError("the layer search needs calibration targets; the calibration set has none")
    return (totals / count).cpu()


@torch.no_grad()
def greedy_layer_removal(model: PreTrainedModel, calibration: list[Batch], remove: int,
                         max_rows: int | None = None) -> tuple[list[int], list[float]]:
    """Remove ``remove`` layers one at a time, each time the one whose absence raises the calibration
    recommendation loss least (ties: the earlier layer). Returns the removed indices (original numbering)
    and the loss after each.

    The decoder's inputs are recorded once; a round scores every remaining layer's removal in one pass per
    calibration batch (:func:`_loss_without_each`), at most ``max_rows`` sequences a layer call (default:
    :data:`LAYER_SEARCH_ROWS` on a GPU, one batch elsewhere)."""
    model.eval()
    if max_rows is None:
        max_rows = LAYER_SEARCH_ROWS if next(model.parameters()).device.type == "cuda" else 1
    layers = list(model.model.layers)
    kept = list(range(len(layers)))
    removed: list[int] = []
    losses: list[float] = []
    if remove <= 0:
        return removed, losses
    inputs = decoder_inputs(model, calibration)
    progress = tqdm(total=sum(len(layers) - r for r in range(remove)), desc="layer search", unit="trial")
    for _ in range(remove):
        without = _loss_without_each(model, layers, kept, inputs, calibration, max_rows)
        position = int(torch.argmin(without))  # the first of equal losses
        progress.update(len(kept))
        removed.append(kept.pop(position))
        losses.append(float(without[position]))
        logger.info("layer %d removed: calibration loss %.4f", removed[-1], losses[-1])
    progress.close()
    return removed, losses
