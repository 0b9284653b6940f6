"""Least-squares reconstruction of the weights that read a cut dimension (past PruneRec, arXiv 2507.07064).

PruneRec (§3.3) cuts heads, residual width and MLP channels by importance and leaves all of the repair to
distillation (§3.5). Before distilling, every linear layer that *reads* a cut dimension can be refit in
closed form so that, on the calibration tokens, it computes from what is kept what it computed before from
everything. For a reader ``y = W x`` whose input becomes ``x'`` (the kept part, as the cut model computes it):

    W' = argmin_W' E‖W x − W' x'‖²  =  W · E[x x'ᵀ] · (E[x' x'ᵀ] + λ·mean(diag E[x' x'ᵀ])·I)⁻¹

the layer-wise reconstruction objective of OBS-style pruning (as in SparseGPT, arXiv 2301.00774), here for
structured cuts, where it has this one solution per reader: what a removed input carried that the kept
inputs correlate with is carried by them. λ (``ridge``, relative to the mean kept variance) keeps the solve
stable when a kept channel barely varies over the calibration tokens.

Three cuts use it, each with moments gathered from the model *before* the cut, in one calibration pass:

- heads (the attn stage): ``o_proj`` from the kept heads' outputs (``x' = x[kept head rows]``);
- residual width (the attn stage): q/k/v from ``input_layernorm``, gate/up from ``post_attention_layernorm``
  and an untied LM head from the final norm. ``x`` is the norm's output over every channel, ``x'`` the one
  the sliced model computes, whose RMS is taken over the kept channels only. A tied LM head is left as it
  is (refitting it would untie it from the embedding);
- MLP channels (the mlp stage): ``down_proj`` from the kept channels.

The writers (embedding, ``o_proj``/``down_proj`` outputs into the residual) are only sliced: a removed
residual channel is gone for every later reader, which the readers' refit accounts for.

The greedy depth stage refits writers instead (:func:`refit_depth`): once whole layers are dropped, each kept
layer's ``down_proj`` is fit, first layer to last on the stream the refit layers before it produce, so that
the stream after the layer matches the parent's stream entering the parent's next kept layer: the dropped
layers' contribution written, as far as it is a linear map of the kept layer's MLP activation. (Related in
spirit to replacing removed layers by a light trained layer, LLM-Streamline; here no layer
is added and nothing is trained.)

:func:`refit_sequential` (``reconstruct_sequential``, off by default) goes further: every linear layer of the
cut model, layer by layer on the inputs the cut model computes, each refit kept only if it lowers the error
on held-out calibration tokens. Its cut starts lower but distils worse on the cpu profile (README).

Measured on the cpu benchmark's dense model (README, `prunerec prune`): the validation CE right
after a cut, before any distillation, 4.01 → 1.73 for the 3 → 1 KV groups cut (dense 0.97), 8.98 → 3.54 for
the residual 576 → 288 cut, and 3.07 → 2.46 for the MLP 1536 → 384 cut of the attn stage's model (2.10).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning.calibration import Batch
from pruning.layerwise import advance, decoder_inputs, run_layer
from pruning.surgery import head_rows, shape_of

logger = logging.getLogger(__name__)


@dataclass
class Moments:
    """Second moments of one reader's input over the calibration tokens (float64)."""

    cross: torch.Tensor
    """(n, k) E[x x'ᵀ]: the input before the cut (n wide) against the input after it (k wide)."""
    kept: torch.Tensor
    """(k, k) E[x' x'ᵀ]"""


@dataclass
class ReaderFit:
    """One reader to refit: its weight before the cut and the moments of its input."""

    weight: torch.Tensor
    """(out, n) a copy of the weight before the cut"""
    moments: Moments

    def solve(self, ridge: float) -> torch.Tensor:
        return refit(self.weight, self.moments, ridge)


Split = Callable[[tuple, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(hook args, hook output) at the tokens kept by the mask -> (x: (N, n), x': (N, k))."""


@torch.no_grad()
def collect(model: PreTrainedModel, calibration: list[Batch], taps: Sequence[tuple[nn.Module, Split]],
            description: str = "reconstruction moments") -> list[Moments]:
    """One pass over the calibration batches with a forward hook per tap; padding tokens are left out."""
    model.eval()
    cross: list[torch.Tensor | None] = [None] * len(taps)
    kept: list[torch.Tensor | None] = [None] * len(taps)
    mask: dict[str, torch.Tensor] = {}
    count = 0

    def hook_for(index: int, split: Split) -> Callable:
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            full, after = split(tuple(a[mask["tokens"]] if torch.is_tensor(a) else a for a in args),
                                output[mask["tokens"]])
            full, after = full.double(), after.double()
            a, b = full.T @ after, after.T @ after
            cross[index] = a if cross[index] is None else cross[index] + a  # type: ignore[operator]
            kept[index] = b if kept[index] is None else kept[index] + b  # type: ignore[operator]

        return hook

    handles = [module.register_forward_hook(hook_for(i, split)) for i, (module, split) in enumerate(taps)]
    device = next(model.parameters()).device
    try:
        for batch in tqdm(calibration, desc=description, leave=False):
            batch = batch.to(device)
            mask["tokens"] = batch.attention_mask.bool()
            count += int(mask["tokens"].sum())
            model.model(**batch.model_inputs(), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("reconstruction needs calibration tokens; the calibration set is empty")
    moments = []
    for total_cross, total_kept in zip(cross, kept, strict=True):
        assert total_cross is not None and total_kept is not None
        moments.append(Moments(total_cross / count, total_kept / count))
    return moments


def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(gram + ridge·mean(diag gram)·I)⁻¹ rhs, for a symmetric (k, k) gram matrix and a (k, m) right-hand side."""
    scale = ridge * gram.diagonal().mean().clamp(min=1e-12)
    return torch.linalg.solve(gram + scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), rhs)


def refit(weight: torch.Tensor, moments: Moments, ridge: float) -> torch.Tensor:
    """(out, n) weight over the inputs before the cut -> (out, k) over the inputs after it, in its dtype."""
    # W' = W C K⁻¹  <=>  W'ᵀ = K⁻¹ Cᵀ Wᵀ (K symmetric)
    solved = _ridge_solve(moments.kept, moments.cross.T @ weight.detach().to(moments.kept.dtype).T, ridge)
    return solved.T.to(weight.dtype)


def _copy(linear: nn.Linear, weight: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)


# ---------------------------------------------------------------------------------------------------------
# heads: o_proj
# ---------------------------------------------------------------------------------------------------------


def _column_fits(model: PreTrainedModel, calibration: list[Batch], readers: list[nn.Linear],
                 columns: list[torch.Tensor], what: str) -> list[ReaderFit]:
    """Per layer, one reader whose input keeps ``columns[layer]``: its weight and the moments of its input
    against the kept columns (model before the cut)."""

    def split_for(layer: int) -> Split:
        return lambda args, _output: (args[0], args[0][:, columns[layer]])

    moments = collect(model, calibration, [(r, split_for(i)) for i, r in enumerate(readers)],
                      f"reconstruction moments ({what})")
    return [ReaderFit(r.weight.detach().clone(), m) for r, m in zip(readers, moments, strict=True)]


def _refit_all(readers: list[nn.Linear], fits: list[ReaderFit], ridge: float) -> None:
    for reader, fit in zip(readers, fits, strict=True):
        _copy(reader, fit.solve(ridge))


def head_moments(model: PreTrainedModel, calibration: list[Batch], keep_q: Sequence[Sequence[int]]) -> list[ReaderFit]:
    """Per layer, ``o_proj`` with the moments of its input against its kept heads' rows (model before the cut)."""
    head_dim = shape_of(model).head_dim
    device = next(model.parameters()).device
    rows = [head_rows(sorted(int(h) for h in heads), head_dim).to(device) for heads in keep_q]
    return _column_fits(model, calibration, [layer.self_attn.o_proj for layer in model.model.layers], rows, "heads")


def refit_heads(model: PreTrainedModel, fits: list[ReaderFit], ridge: float) -> None:
    """Refit every ``o_proj`` of the cut model in place."""
    _refit_all([layer.self_attn.o_proj for layer in model.model.layers], fits, ridge)


# ---------------------------------------------------------------------------------------------------------
# residual width: the readers of every RMSNorm
# ---------------------------------------------------------------------------------------------------------


def _norm_readers(model: PreTrainedModel) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(norm, the linear layers reading its output) for every norm whose readers can be refit."""
    sites: list[tuple[nn.Module, list[nn.Linear]]] = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        sites.append((layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj]))
        sites.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]))
    if not model.config.tie_word_embeddings:
        sites.append((model.model.norm, [model.lm_head]))
    return sites


def _rms_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def residual_moments(model: PreTrainedModel, calibration: list[Batch], keep: torch.Tensor) -> list[list[ReaderFit]]:
    """Per norm with refittable readers, the readers with the moments of the norm's output against the output
    the sliced norm will give (RMS over the kept channels, their weights), from the model before the cut."""
    device = next(model.parameters()).device
    index = keep.to(device)

    def split_for(norm: nn.Module) -> Split:
        eps = _rms_eps(norm)

        def split(args: tuple, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kept = args[0][:, index].float()  # (N, k) the norm's input at the kept channels
            weight = norm.weight[index].float()  # type: ignore[index]
            after = kept * torch.rsqrt(kept.pow(2).mean(-1, keepdim=True) + eps) * weight
            return output, after

        return split

    sites = _norm_readers(model)
    moments = collect(model, calibration, [(norm, split_for(norm)) for norm, _ in sites], "reconstruction moments (residual)")
    return [[ReaderFit(reader.weight.detach().clone(), site_moments) for reader in readers]
            for (_norm, readers), site_moments in zip(sites, moments, strict=True)]


def refit_residual(model: PreTrainedModel, fits: list[list[ReaderFit]], ridge: float) -> None:
    """Refit the readers of every norm of the sliced model in place (same order as :func:`residual_moments`)."""
    sites = _norm_readers(model)
    if len(sites) != len(fits):
        raise ValueError(f"fits for {len(fits)} norms, the model has {len(sites)}: not the model they were gathered on")
    for (_norm, readers), site_fits in zip(sites, fits, strict=True):
        _refit_all(readers, site_fits, ridge)
    if model.config.tie_word_embeddings:
        logger.info("reconstruction: the LM head is tied to the embedding, so the final norm's reader is not refit")


# ---------------------------------------------------------------------------------------------------------
# MLP channels: down_proj
# ---------------------------------------------------------------------------------------------------------


def mlp_moments(model: PreTrainedModel, calibration: list[Batch], keep: Sequence[Sequence[int]]) -> list[ReaderFit]:
    """Per layer, ``down_proj`` with the moments of its input against its kept channels (model before the cut)."""
    device = next(model.parameters()).device
    indices = [torch.as_tensor(sorted(int(c) for c in channels), dtype=torch.long, device=device) for channels in keep]
    return _column_fits(model, calibration, [layer.mlp.down_proj for layer in model.model.layers], indices, "mlp")


def refit_mlp(model: PreTrainedModel, fits: list[ReaderFit], ridge: float) -> None:
    """Refit every ``down_proj`` of the cut model in place."""
    _refit_all([layer.mlp.down_proj for layer in model.model.layers], fits, ridge)


# ---------------------------------------------------------------------------------------------------------
# depth: each kept layer's down_proj writes what the removed layers after it wrote
# ---------------------------------------------------------------------------------------------------------


def _squared_error_part(weight: torch.Tensor, cross: torch.Tensor, kept: torch.Tensor) -> float:
    """The part of Σ‖t − W a‖² that depends on W, from the moment sums: −2 tr(W Σ a tᵀ) + tr(W Σ a aᵀ Wᵀ)."""
    return float(-2 * (weight * cross.T).sum() + (weight @ kept * weight).sum())


@torch.no_grad()
def refit_depth(parent: PreTrainedModel, child: PreTrainedModel, kept: Sequence[int], calibration: list[Batch],
                ridge: float) -> list[dict]:
    """After whole layers are dropped, refit each kept layer's ``down_proj`` of ``child`` in place, first to
    last, so that the residual stream after it matches the parent's stream entering the parent's next kept layer
    (after the last kept layer: the parent's stream entering the final norm). With ``mid`` the child's stream
    after the layer's attention and ``a`` its MLP's hidden activation (the ``down_proj`` input), the target is
    ``t = parent stream − mid`` and ``W' = E[t aᵀ] (E[a aᵀ] + λ·mean diag·I)⁻¹``: the removed layers'
    contribution, and the error the child's stream carries so far, written as well as a linear map of ``a``
    can. Sequential, so that every layer is fit on the stream the refit layers before it produce; a refit that
    does not lower the layer's error on the calibration tokens is not applied. Returns, per kept layer, the
    mean squared stream error before and after.

    Both models run a layer at a time (:mod:`pruning.layerwise`): the parent's stream and the child's are
    carried from layer to layer per batch, so every parent layer runs once and every child layer twice (for
    its moments, then refit, to carry the stream on), instead of both whole models per kept layer."""
    parent.eval()
    child.eval()
    device = next(child.parameters()).device
    if len(kept) != len(child.model.layers):
        raise ValueError(f"{len(kept)} kept layers for a child with {len(child.model.layers)}")
    masks = [batch.attention_mask.bool().to(device) for batch in calibration]
    parent_inputs, child_inputs = decoder_inputs(parent, calibration), decoder_inputs(child, calibration)
    parent_streams = [captured.hidden for captured in parent_inputs]  # entering parent layer ``position``
    child_streams = [captured.hidden for captured in child_inputs]  # entering child layer j
    position = 0
    # the parent's stream is read entering its next kept layer, or the final norm after the last
    ends = [*kept[1:], len(parent.model.layers)]
    record = []
    for j, layer in enumerate(tqdm(child.model.layers, desc="reconstruction (depth)", leave=False)):
        while position < ends[j]:
            parent_streams = advance(parent, position, parent_streams, parent_inputs)
            position += 1
        taps = _Taps(pre={"mid": layer.post_attention_layernorm, "act": layer.mlp.down_proj})
        cross = kept_moment = None
        residual_before = 0.0
        count = 0
        weight = layer.mlp.down_proj.weight.detach().double()
        with taps:
            for i, (hidden, captured) in enumerate(zip(child_streams, child_inputs, strict=True)):
                taps.mask = masks[i]
                run_layer(layer, hidden, captured.kwargs[j])
                target, act = parent_streams[i][masks[i]].double() - taps.values["mid"], taps.values["act"]
                a, b = act.T @ target, act.T @ act
                cross = a if cross is None else cross + a
                kept_moment = b if kept_moment is None else kept_moment + b
                residual_before += float((target - act @ weight.T).pow(2).sum())
                count += target.shape[0]
        assert cross is not None and kept_moment is not None
        if count == 0:
            raise ValueError("reconstruction needs calibration tokens; the calibration set is empty")
        solved = _ridge_solve(kept_moment, cross, ridge).T  # (d, I)
        error_before = residual_before / count
        change = _squared_error_part(solved, cross, kept_moment) - _squared_error_part(weight, cross, kept_moment)
        error_after = error_before + change / count
        applied = error_after < error_before
        if applied:
            layer.mlp.down_proj.weight.copy_(solved.to(layer.mlp.down_proj.weight.dtype))
        child_streams = advance(child, j, child_streams, child_inputs)
        record.append({"layer": j, "parent_layer": int(kept[j]), "stream_error_before": round(error_before, 5),
                       "stream_error_after": round(error_after if applied else error_before, 5), "applied": applied})
    return record


# ---------------------------------------------------------------------------------------------------------
# sequential: every linear layer of the cut model, layer by layer, on the stream the cut model produces
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Correspondence:
    """Where each part of a cut child comes from in its parent (None: every one, in order)."""

    layers: list[int]
    """Parent layer of each child layer."""
    residual: list[int] | None = None
    """Parent residual channel of each child channel."""
    heads: list[list[int]] | None = None
    """Per child layer, the parent query heads it keeps."""
    kv_heads: list[list[int]] | None = None
    """Per child layer, the parent KV heads it keeps."""
    mlp: list[list[int]] | None = None
    """Per child layer, the parent MLP channels it keeps."""


class _Taps:
    """Inputs (``pre``) or outputs of submodules captured while inside, at the real tokens only."""

    def __init__(self, pre: dict[str, nn.Module] | None = None, post: dict[str, nn.Module] | None = None):
        self.pre, self.post = pre or {}, post or {}
        self.values: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None

    def __enter__(self) -> _Taps:
        def keep(name: str, tensor: torch.Tensor) -> None:
            self.values[name] = tensor[self.mask].double()

        self.handles = [m.register_forward_pre_hook(lambda _m, args, n=n: keep(n, args[0])) for n, m in self.pre.items()]
        self.handles += [m.register_forward_hook(lambda _m, _a, out, n=n: keep(n, out)) for n, m in self.post.items()]
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self.handles:
            handle.remove()


class _Fit:
    """Moment sums of one linear layer's least-squares refit, input a (N, k) and target t (N, out), over two
    halves of the calibration tokens (alternate tokens): the refit is solved on one half and accepted only if
    it lowers the error on the other, so that a reader with more inputs than the calibration tokens support
    (the attn stage's down_proj has 1,536 inputs: its refit on ~2,000 tokens fits the calibration and raised
    the cpu benchmark model's validation CE after the cut from 4.0 to 15) is left as it was."""

    def __init__(self) -> None:
        self.cross: list[torch.Tensor] = []  # per half, (k, out) Σ a tᵀ
        self.gram: list[torch.Tensor] = []  # per half, (k, k) Σ a aᵀ
        self.target_square = [0.0, 0.0]
        self.count = [0, 0]

    def add(self, inputs: torch.Tensor, target: torch.Tensor) -> None:
        """Rows of ``inputs`` (N, k) and ``target`` (N, out), alternately to the two halves."""
        for half in (0, 1):
            a, t = inputs[half::2], target[half::2]
            cross, gram = a.T @ t, a.T @ a
            if len(self.cross) <= half:
                self.cross.append(cross)
                self.gram.append(gram)
            else:
                self.cross[half] += cross
                self.gram[half] += gram
            self.target_square[half] += float(t.pow(2).sum())
            self.count[half] += t.shape[0]

    def _error(self, weight: torch.Tensor, half: int) -> float:
        """Mean squared error per token (summed over outputs) of ``weight`` on one half."""
        part = _squared_error_part(weight, self.cross[half], self.gram[half])
        return (self.target_square[half] + part) / max(self.count[half], 1)

    def apply(self, linear: nn.Linear, ridge: float) -> dict:
        """Refit ``linear``'s weight (solved on every token) if the solve on the first half lowers the error on
        the second; returns that held-out error before and after."""
        weight = linear.weight.detach().double()
        trial = _ridge_solve(self.gram[0], self.cross[0], ridge).T  # (out, k)
        before, after = self._error(weight, 1), self._error(trial, 1)
        applied = after < before
        if applied:
            solved = _ridge_solve(self.gram[0] + self.gram[1], self.cross[0] + self.cross[1], ridge).T
            _copy(linear, solved.to(linear.weight.dtype))
        return {"held_out_before": round(before, 6), "held_out_after": round(after, 6), "applied": applied}


def _bias_free(linear: nn.Linear, target: torch.Tensor) -> torch.Tensor:
    """The part of a target the weight must produce: the layer's own bias is kept as it is."""
    return target if linear.bias is None else target - linear.bias.detach().double()


_TARGET = {"q": "q", "k": "k", "v": "v", "o": "mid", "gate": "gate", "up": "up", "down": "after"}
"""The parent quantity each child linear layer is fit to; the writers ``o`` and ``down`` to the stream after
them less the stream before (the parent's update: after a depth cut, that of the dropped layers too)."""


def _refit_group(layer: nn.Module, streams: list[tuple[torch.Tensor, dict]], masks: list[torch.Tensor],
                 targets: list[dict[str, torch.Tensor]], linears: dict[str, nn.Linear], ridge: float) -> dict:
    """One pass of the child's ``layer`` over the calibration streams, then the refit of ``linears`` (layers
    reading the same input, by name in :data:`_TARGET`).

    A writer is fit to the parent's update of the stream, not to the parent's stream less the child's: asking
    it to cancel the child's accumulated error as well raised the validation CE after the attn cut of the cpu
    benchmark's model from 4.0 (per-cut refits) to 10–13, with or without weighing each token's error by its
    stream's scale (a few tokens carry massive activations); fit to the update, 3.7."""
    sums = {name: _Fit() for name in linears}
    reader = next(iter(linears.values()))
    taps = _Taps(pre={"input": reader})
    with taps:
        for i, (hidden, kwargs) in enumerate(streams):
            taps.mask = masks[i]
            run_layer(layer, hidden, kwargs)
            for name, linear in linears.items():
                target = targets[i][_TARGET[name]]
                if name in ("o", "down"):  # a writer adds the parent's update to the stream, not its state
                    target = target - targets[i]["in" if name == "o" else "mid"]
                sums[name].add(taps.values["input"], _bias_free(linear, target))
    return {name: sums[name].apply(linear, ridge) for name, linear in linears.items()}


@torch.no_grad()
def refit_sequential(parent: PreTrainedModel, child: PreTrainedModel, correspondence: Correspondence,
                     calibration: list[Batch], ridge: float) -> list[dict]:
    """Refit every linear layer of ``child``'s decoder in place, first layer to last and within a layer in the
    order it computes, each on the inputs the child computes after the refits before it: q/k/v to the parent
    layer's projections at the rows the child keeps, ``o_proj`` to the parent's attention update of the stream
    at the kept channels, gate/up to the parent's at the kept MLP channels, ``down_proj`` to the parent's update
    from after its attention to its next kept layer (after the last kept layer: to the final norm), which after
    a depth cut holds the dropped layers' updates.

    Unlike the per-cut refits, which take the moments of the parent's stream, every fit here sees what the cut
    model computes (the sequential calibration of SparseGPT, arXiv 2301.00774 §3, here for structured cuts).
    Each refit is solved on half the calibration tokens and applied (solved on all) only if it lowers the
    error on the other half. Returns per child layer each refit's held-out error before and after, and the
    mean squared error of the stream after the layer against the parent's at the kept channels."""
    parent.eval()
    child.eval()
    shape = shape_of(parent)
    device = next(child.parameters()).device
    layers = correspondence.layers
    if len(layers) != len(child.model.layers):
        raise ValueError(f"a correspondence for {len(layers)} layers, the child has {len(child.model.layers)}")
    channels = torch.as_tensor(correspondence.residual if correspondence.residual is not None
                               else range(shape.hidden), dtype=torch.long, device=device)

    def rows(per_layer: list[list[int]] | None, j: int, count: int, width: int) -> torch.Tensor:
        kept = per_layer[j] if per_layer is not None else range(count)
        return head_rows(sorted(int(h) for h in kept), width).to(device)

    parent_inputs, child_inputs = decoder_inputs(parent, calibration), decoder_inputs(child, calibration)
    parent_streams = [captured.hidden for captured in parent_inputs]  # entering parent layer ``position``
    child_streams = [captured.hidden for captured in child_inputs]  # entering child layer j
    masks = [batch.attention_mask.bool().to(device) for batch in calibration]
    tokens = sum(int(mask.sum()) for mask in masks)
    if tokens == 0:
        raise ValueError("reconstruction needs calibration tokens; the calibration set is empty")
    position = 0  # the parent layer the parent streams have reached
    record = []
    for j, layer in enumerate(tqdm(child.model.layers, desc="reconstruction (sequential)", leave=False)):
        source = parent.model.layers[layers[j]]
        while position < layers[j]:  # parent layers dropped before this one
            parent_streams = advance(parent, position, parent_streams, parent_inputs)
            position += 1
        q_rows = rows(correspondence.heads, j, shape.heads, shape.head_dim)
        kv_rows = rows(correspondence.kv_heads, j, shape.kv_heads, shape.head_dim)
        mlp_rows = rows(correspondence.mlp, j, shape.intermediate, 1)  # channels: "heads" one wide
        # the parent's layer: its projections (the readers' targets) and its stream after attention
        targets: list[dict[str, torch.Tensor]] = []
        advanced: list[torch.Tensor] = []
        taps = _Taps(pre={"mid": source.post_attention_layernorm},
                     post={"q": source.self_attn.q_proj, "k": source.self_attn.k_proj, "v": source.self_attn.v_proj,
                           "gate": source.mlp.gate_proj, "up": source.mlp.up_proj})
        with taps:
            for i, hidden in enumerate(parent_streams):
                taps.mask = masks[i]
                advanced.append(run_layer(source, hidden, parent_inputs[i].kwargs[position]))
                targets.append({"in": hidden[masks[i]].double()[:, channels], "q": taps.values["q"][:, q_rows], "k": taps.values["k"][:, kv_rows],
                                "v": taps.values["v"][:, kv_rows], "mid": taps.values["mid"][:, channels],
                                "gate": taps.values["gate"][:, mlp_rows], "up": taps.values["up"][:, mlp_rows]})
        parent_streams, position = advanced, position + 1
        # ... and the parent's stream where the child's layer must leave it: entering the next kept layer
        end = layers[j + 1] if j + 1 < len(layers) else shape.layers
        while position < end:
            parent_streams = advance(parent, position, parent_streams, parent_inputs)
            position += 1
        for i, hidden in enumerate(parent_streams):
            targets[i]["after"] = hidden[masks[i]].double()[:, channels]

        attention, mlp = layer.self_attn, layer.mlp
        fits: dict[str, dict] = {}
        streams = [(hidden, captured.kwargs[j]) for hidden, captured in zip(child_streams, child_inputs, strict=True)]
        for names, linears in ((["q", "k", "v"], [attention.q_proj, attention.k_proj, attention.v_proj]),
                               (["o"], [attention.o_proj]), (["gate", "up"], [mlp.gate_proj, mlp.up_proj]),
                               (["down"], [mlp.down_proj])):
            fits.update(_refit_group(layer, streams, masks, targets, dict(zip(names, linears, strict=True)), ridge))

        child_streams = advance(child, j, child_streams, child_inputs)
        error = sum(float((h[masks[i]].double() - targets[i]["after"]).pow(2).sum()) for i, h in enumerate(child_streams))
        record.append({"layer": j, "parent_layer": int(layers[j]), "refits": fits,
                       "stream_error_after": round(error / tokens, 6)})
    return record
