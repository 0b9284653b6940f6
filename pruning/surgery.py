"""Physical slicing of Llama / Qwen2 / Mistral decoder LMs (PruneRec, arXiv 2507.07064, §3).

Every operation slices the state dict, writes the new counts into a copy of the config (always with an
explicit ``head_dim``) and builds a fresh model of the stock class from it, so the result is exactly what
``AutoModelForCausalLM.from_pretrained`` will load from the saved artifact: no custom classes, no
monkey-patched attributes. Counts are uniform across layers (DESIGN.md §4).

Parameter layout (names shared by the three families):
``model.embed_tokens.weight`` (V, d); ``lm_head.weight`` (V, d) when untied; per layer
``self_attn.{q,k,v}_proj.weight`` (heads·hd, d) with optional biases, ``self_attn.o_proj.weight`` (d, heads·hd),
``mlp.{gate,up}_proj.weight`` (I, d), ``mlp.down_proj.weight`` (d, I), ``input_layernorm.weight`` and
``post_attention_layernorm.weight`` (d); ``model.norm.weight`` (d).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from llmrec.item_tokens import attach, detached, item_tokens_of

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Shape:
    """The counts that pruning changes."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    tied: bool

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


def shape_of(model: PreTrainedModel) -> Shape:
    return shape_of_config(model.config)


def shape_of_config(c: PretrainedConfig) -> Shape:
    """A model's shape from its Hugging Face config alone (no weights loaded)."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Shape(
        hidden=c.hidden_size,
        heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim,
        intermediate=c.intermediate_size,
        layers=c.num_hidden_layers,
        vocab=c.vocab_size,
        tied=bool(getattr(c, "tie_word_embeddings", False)),
    )


def count_parameters(shape: Shape, attention_bias: bool = False, mlp_bias: bool = False) -> dict[str, int]:
    """Parameter counts implied by a shape (what a plan predicts and a test checks against the model)."""
    d, hd = shape.hidden, shape.head_dim
    q, kv = shape.heads * hd, shape.kv_heads * hd
    attention = d * q + 2 * d * kv + q * d + (q + 2 * kv if attention_bias else 0)
    mlp = 3 * d * shape.intermediate + (2 * shape.intermediate + d if mlp_bias else 0)
    per_layer = attention + mlp + 2 * d
    non_embedding = shape.layers * per_layer + d  # + final norm
    embedding = shape.vocab * d * (1 if shape.tied else 2)
    return {"total": non_embedding + embedding, "embedding": embedding, "non_embedding": non_embedding}


def _config_with(config: PretrainedConfig, **counts: int) -> PretrainedConfig:
    new = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    new.head_dim = head_dim  # explicit, so that a narrower hidden size keeps the head size
    for key, value in counts.items():
        setattr(new, key, value)
    return new


def rebuild(model: PreTrainedModel, config: PretrainedConfig, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A fresh stock model from ``config`` holding ``state``; dtype and device follow the source model."""
    parameter = next(model.parameters())
    fresh = AutoModelForCausalLM.from_config(config, dtype=parameter.dtype, attn_implementation=model.config._attn_implementation)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"surgery produced a state dict that does not fit: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.generation_config = copy.deepcopy(model.generation_config)
    fresh = fresh.to(parameter.device).train(model.training)
    items = item_tokens_of(model)
    if items is not None and config.hidden_size == model.config.hidden_size:  # slice_residual cuts their width
        attach(fresh, items.sliced(torch.arange(config.hidden_size, device=parameter.device)))
    return fresh


def _state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The stock state dict (item tokens, when the model has them, are carried by :func:`rebuild`)."""
    with detached(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _index(values: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    index = torch.as_tensor(values, dtype=torch.long, device=device)
    return index.sort().values  # keep the original order of channels


def head_rows(heads: Sequence[int] | torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a (heads·head_dim, ·) projection."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def slice_heads(model: PreTrainedModel, keep_kv: Sequence[Sequence[int]], keep_q: Sequence[Sequence[int]]) -> PreTrainedModel:
    """Keep, in each layer, the listed KV heads and query heads.

    Every kept query head must belong to a kept KV group and every kept group must keep the same number
    of query heads (so GQA stays uniform); counts must be equal across layers.
    """
    shape = shape_of(model)
    if len(keep_kv) != shape.layers or len(keep_q) != shape.layers:
        raise ValueError("one list of kept heads per layer is needed")
    kv_count, q_count = len(keep_kv[0]), len(keep_q[0])
    state = _state(model)
    for layer in range(shape.layers):
        kv = sorted(int(h) for h in keep_kv[layer])
        q = sorted(int(h) for h in keep_q[layer])
        if len(kv) != kv_count or len(q) != q_count:
            raise ValueError("kept head counts must be equal in every layer")
        per_group = {g: [h for h in q if h // shape.groups == g] for g in kv}
        if sum(len(v) for v in per_group.values()) != len(q) or len({len(v) for v in per_group.values()}) != 1:
            raise ValueError(f"layer {layer}: query heads {q} do not fill the kept KV groups {kv} equally")
        prefix = f"model.layers.{layer}.self_attn."
        q_rows, kv_rows = head_rows(q, shape.head_dim), head_rows(kv, shape.head_dim)
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            state[prefix + proj + ".weight"] = state[prefix + proj + ".weight"][rows]
            if prefix + proj + ".bias" in state:
                state[prefix + proj + ".bias"] = state[prefix + proj + ".bias"][rows]
        state[prefix + "o_proj.weight"] = state[prefix + "o_proj.weight"][:, q_rows]
    config = _config_with(model.config, num_attention_heads=q_count, num_key_value_heads=kv_count)
    return rebuild(model, config, state)


def slice_residual(model: PreTrainedModel, keep: Sequence[int] | torch.Tensor) -> PreTrainedModel:
    """Keep the listed residual-stream channels everywhere: embedding (and untied LM head) columns, every
    RMSNorm, the input side of q/k/v/gate/up and the output side of o/down."""
    state = _state(model)
    index = _index(keep, torch.device("cpu"))
    for name in list(state):
        tensor = state[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name] = tensor[:, index]
        elif name == "model.norm.weight" or name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            state[name] = tensor[index]
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            state[name] = tensor[:, index]
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = tensor[index]
        elif name.endswith(("o_proj.bias", "down_proj.bias")):
            state[name] = tensor[index]
    config = _config_with(model.config, hidden_size=int(index.numel()))
    fresh = rebuild(model, config, state)
    items = item_tokens_of(model)
    if items is not None:  # the item vectors live in the residual stream too
        attach(fresh, items.sliced(index.to(next(model.parameters()).device)))
    return fresh


def slice_mlp(model: PreTrainedModel, keep: Sequence[Sequence[int]]) -> PreTrainedModel:
    """Keep, in each layer, the listed MLP channels (rows of gate/up, columns of down); equal counts."""
    shape = shape_of(model)
    if len(keep) != shape.layers or len({len(k) for k in keep}) != 1:
        raise ValueError("one equally long list of kept MLP channels per layer is needed")
    state = _state(model)
    for layer, channels in enumerate(keep):
        index = _index(channels, torch.device("cpu"))
        prefix = f"model.layers.{layer}.mlp."
        for proj in ("gate_proj", "up_proj"):
            state[prefix + proj + ".weight"] = state[prefix + proj + ".weight"][index]
            if prefix + proj + ".bias" in state:
                state[prefix + proj + ".bias"] = state[prefix + proj + ".bias"][index]
        state[prefix + "down_proj.weight"] = state[prefix + "down_proj.weight"][:, index]
    config = _config_with(model.config, intermediate_size=len(keep[0]))
    return rebuild(model, config, state)


def drop_layers(model: PreTrainedModel, remove: Sequence[int]) -> PreTrainedModel:
    """Remove whole decoder layers; the rest are renumbered (state-dict keys and ``layer_idx``)."""
    shape = shape_of(model)
    removed = set(int(i) for i in remove)
    if not removed <= set(range(shape.layers)) or len(removed) >= shape.layers:
        raise ValueError(f"cannot remove layers {sorted(removed)} of {shape.layers}")
    kept = [i for i in range(shape.layers) if i not in removed]
    renumber = {old: new for new, old in enumerate(kept)}
    state = {}
    for name, tensor in _state(model).items():
        match = _LAYER.match(name)
        if match is None:
            state[name] = tensor
        elif int(match.group(1)) in renumber:
            state[f"model.layers.{renumber[int(match.group(1))]}.{match.group(2)}"] = tensor
    config = copy.deepcopy(model.config)
    config.head_dim = shape.head_dim
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [model.config.layer_types[i] for i in kept]
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, len(kept))
    return rebuild(model, config, state)
