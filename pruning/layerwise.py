"""Running a decoder one layer at a time on streams captured from the calibration batches.

The depth stage's search (:func:`pruning.importance.greedy_layer_removal`) and the reconstructions that
follow a cut (:mod:`pruning.reconstruct`) need the residual stream between layers, and run layers on streams
the model itself never computes (a layer left out, a refit layer). One forward pass per calibration batch
records what enters the first decoder layer and the keyword arguments the decoder hands *each* layer (the
attention mask, positions, the rotary tables): a Qwen2 with sliding-window layers gives its layers different
masks, so each layer gets its own. A layer then runs on any stream of that batch, or on several copies of
it stacked along the batch dimension (:func:`tiled` repeats the per-sequence arguments to match).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from pruning.calibration import Batch


@dataclass
class LayerwiseBatch:
    """One calibration batch, ready to be run a layer at a time."""

    hidden: torch.Tensor
    """(B, T, d) the stream entering the first decoder layer (the embeddings)."""
    kwargs: list[dict[str, Any]]
    """Per decoder layer, the keyword arguments the decoder passed it (the stream itself left out)."""
    streams: list[torch.Tensor] | None = None
    """Per decoder layer, the (B, T, d) stream entering it in the model as it is (``decoder_inputs(...,
    streams=True)``; None otherwise)."""

    @property
    def rows(self) -> int:
        return int(self.hidden.shape[0])


@torch.no_grad()
def decoder_inputs(model: PreTrainedModel, calibration: Sequence[Batch], streams: bool = False) -> list[LayerwiseBatch]:
    """Per calibration batch, one forward pass of ``model``'s decoder recording what each layer is given (with
    ``streams``, every layer's input stream as well, not only the first)."""
    device = next(model.parameters()).device
    layers = list(model.model.layers)
    entering: list[torch.Tensor] = []  # the batch under way's streams entering the layers (the first only, unless streams)
    kwargs: list[dict[str, Any]] = []  # ... and each layer's arguments

    def grab(_module: nn.Module, args: tuple, given: dict) -> None:
        if streams or not entering:
            entering.append((args[0] if args else given["hidden_states"]).detach())
        kwargs.append({k: v for k, v in given.items() if k != "hidden_states"})

    out: list[LayerwiseBatch] = []
    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    try:
        for batch in calibration:
            entering.clear()
            kwargs.clear()
            model.model(**batch.to(device).model_inputs(), use_cache=False)
            if len(kwargs) != len(layers):
                raise RuntimeError(f"captured the arguments of {len(kwargs)} of {len(layers)} decoder layers")
            out.append(LayerwiseBatch(entering[0], list(kwargs), list(entering) if streams else None))
    finally:
        for handle in handles:
            handle.remove()
    return out


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The stream after ``layer`` (decoder layers return a tensor or, in older releases, a tuple)."""
    output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def advance(model: PreTrainedModel, at: int, streams: Sequence[torch.Tensor], inputs: Sequence[LayerwiseBatch]) -> list[torch.Tensor]:
    """Each batch's stream carried through ``model``'s decoder layer ``at`` (streams entering it -> leaving it)."""
    layer = model.model.layers[at]
    return [run_layer(layer, hidden, captured.kwargs[at]) for hidden, captured in zip(streams, inputs, strict=True)]


def tiled(kwargs: dict[str, Any], rows: int, copies: int) -> dict[str, Any]:
    """``kwargs`` for ``copies`` copies of a batch of ``rows`` sequences stacked along the batch dimension
    (copy-major: rows 0..rows-1 are the first copy): every per-sequence tensor (two or more dimensions, the
    first of them ``rows``) is repeated; broadcast ones ((1, ...) with several rows) and 1-D ones (the cache
    positions) are shared."""
    if copies == 1:
        return kwargs

    def tile(value: Any) -> Any:
        if torch.is_tensor(value):
            if value.dim() >= 2 and value.shape[0] == rows:
                return value.repeat(copies, *([1] * (value.dim() - 1)))
            return value
        if isinstance(value, tuple):
            return tuple(tile(v) for v in value)
        if isinstance(value, list):
            return [tile(v) for v in value]
        return value

    return {key: tile(value) for key, value in kwargs.items()}
