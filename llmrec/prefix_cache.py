"""A KV cache for beam search whose prompt part is shared by the beams of one user.

Plain beam search keeps ``beams`` copies of every user's prompt cache and re-gathers (copies) the whole
cache at every step, which on CPU costs far more than the arithmetic (profiled on SmolLM2: over 60% of the
decoding time went to ``copy_``/``index_select``/``cat`` of the cache). Here the prompt keys/values are
stored once per user, shape ``(users, kv_heads, prompt_len, head_dim)``, and only the generated suffix is
stored per beam in a pre-allocated buffer ``(users * beams, kv_heads, max_new, head_dim)``; reordering beams
touches the suffix alone.

It plugs into stock transformers models without editing their code: the cache layer returns
:class:`SplitKV` objects from ``update``, and an attention function registered under
``prunerec_prefix_beam`` computes attention over the shared prefix plus the per-beam suffix (GQA without
repeating K/V). For ordinary tensors that function defers to SDPA, so the prompt pass is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "prunerec_prefix_beam"


@dataclass
class SplitKV:
    """Keys or values of one layer: a per-user prefix and a per-beam suffix."""

    prefix: torch.Tensor
    """(users, kv_heads, prompt_len, head_dim)"""
    suffix: torch.Tensor
    """(users * beams, kv_heads, generated, head_dim)"""
    prefix_mask: torch.Tensor
    """(users, prompt_len) bool: True where a prompt position is real (left padding is False)."""


class PrefixBeamLayer(CacheLayerMixin):
    """One layer's cache: shared prompt prefix + per-beam suffix buffer."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, prefix_mask: torch.Tensor, beams: int, capacity: int):
        super().__init__()
        users, heads, _, dim = keys.shape
        self.prefix_keys, self.prefix_values = keys, values
        self.prefix_mask = prefix_mask
        self.beams = beams
        self.suffix_keys = keys.new_empty((users * beams, heads, capacity, dim))
        self.suffix_values = values.new_empty((users * beams, heads, capacity, dim))
        self.length = 0
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device

    def lazy_initialization(self, key_states: torch.Tensor) -> None:  # already initialised
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[Any, Any]:
        step = key_states.shape[-2]
        if self.length + step > self.suffix_keys.shape[-2]:
            raise RuntimeError("beam cache capacity exceeded")
        self.suffix_keys[:, :, self.length : self.length + step] = key_states
        self.suffix_values[:, :, self.length : self.length + step] = value_states
        self.length += step
        end = self.length
        return (
            SplitKV(self.prefix_keys, self.suffix_keys[:, :, :end], self.prefix_mask),
            SplitKV(self.prefix_values, self.suffix_values[:, :, :end], self.prefix_mask),
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder beams; parents are always beams of the same user, so the shared prefix stays."""
        if self.length:
            end = self.length
            self.suffix_keys[:, :, :end] = self.suffix_keys[:, :, :end].index_select(0, beam_idx)
            self.suffix_values[:, :, :end] = self.suffix_values[:, :, :end].index_select(0, beam_idx)

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + cache_position.shape[0], 0

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + self.length

    def get_max_cache_shape(self) -> int:
        return self.prefix_keys.shape[-2] + self.suffix_keys.shape[-2]


def prefix_beam_cache(prompt_cache: Cache, prefix_mask: torch.Tensor, beams: int, capacity: int) -> Cache:
    """Wrap the cache of a prompt pass (one row per user) into a shared-prefix beam cache."""
    layers: list[CacheLayerMixin] = []
    for layer in prompt_cache.layers:
        if layer.keys is None or layer.values is None:
            raise ValueError("the prompt cache is empty")
        layers.append(PrefixBeamLayer(layer.keys, layer.values, prefix_mask, beams, capacity))
    return Cache(layers=layers)


def prefix_beam_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over a shared prefix and a per-beam suffix; plain SDPA for ordinary tensors.

    Shapes: query (N = users * beams, q_heads, 1, d); returns (N, 1, q_heads, d) like the SDPA integration.
    """
    if not isinstance(key, SplitKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rows, q_heads, q_len, dim = query.shape
    if q_len != 1:
        raise ValueError("the shared-prefix beam cache decodes one token per step")
    users, kv_heads, prefix_len, _ = key.prefix.shape
    beams, groups = rows // users, q_heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    # Prefix: all beams and query heads of a KV group of a user in one matmul against that user's keys.
    q_user = query.reshape(users, beams, kv_heads, groups, dim).permute(0, 2, 1, 3, 4).reshape(users, kv_heads, beams * groups, dim)
    prefix_scores = torch.matmul(q_user, key.prefix.transpose(-1, -2)).float() * scale  # (users, kv, beams*g, P)
    prefix_scores = prefix_scores.masked_fill(~key.prefix_mask[:, None, None, :], float("-inf"))
    prefix_scores = prefix_scores.view(users, kv_heads, beams, groups, prefix_len).permute(0, 2, 1, 3, 4)
    prefix_scores = prefix_scores.reshape(rows, kv_heads, groups, prefix_len)
    # Suffix: per beam.
    q_beam = query.reshape(rows, kv_heads, groups, dim)
    suffix_scores = torch.matmul(q_beam, key.suffix.transpose(-1, -2)).float() * scale  # (rows, kv, g, S)
    probs = torch.softmax(torch.cat([prefix_scores, suffix_scores], dim=-1), dim=-1).to(query.dtype)
    prefix_probs, suffix_probs = probs[..., :prefix_len], probs[..., prefix_len:]
    prefix_probs = prefix_probs.view(users, beams, kv_heads, groups, prefix_len).permute(0, 2, 1, 3, 4)
    prefix_out = torch.matmul(prefix_probs.reshape(users, kv_heads, beams * groups, prefix_len), value.prefix)
    prefix_out = prefix_out.view(users, kv_heads, beams, groups, dim).permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, groups, dim)
    out = prefix_out + torch.matmul(suffix_probs, value.suffix)  # (rows, kv, g, d)
    return out.reshape(rows, 1, q_heads, dim), None


AttentionInterface.register(ATTENTION_NAME, prefix_beam_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextlib.contextmanager
def prefix_beam_attention_enabled(model: PreTrainedModel) -> Iterator[None]:
    """Route the model's attention through :func:`prefix_beam_attention` for the duration."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
