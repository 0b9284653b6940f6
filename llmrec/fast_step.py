"""A lean decoding step for constrained beam search: the per-operation overhead of the stock forward gone.

Profiling the pruned model's requests (README, "What limits them") put 85% of a request in the decoder's
forward passes, most of it in many small per-layer calls (RMSNorm as six element-wise ops, rotary
embeddings as ten, three separate q/k/v projections, the attention-interface dispatch, mask building, the
cache's per-layer update and reorder), each a Python module call. One decoding step of beam search runs one
token per beam, so for a small model those calls, not the arithmetic, set the time.

:class:`LeanDecoder` runs the same mathematics for a stock Llama / Qwen2 / Mistral decoder (the families
:mod:`llmrec.model` loads; pruning keeps their stock classes and uniform shapes, DESIGN.md §4) with fewer,
larger operations:

- the q, k, v projections are one matmul (the weights concatenated once, the attention scale folded into
  the q rows, the input norm's weight into the columns); RMSNorm is one ``torch.nn.functional.rms_norm``;
  the o and down projections add to the stream in one ``addmm`` each; gate and up stay two matmuls over the
  model's own weights (packing them too saved about 1% of a pruned request and cost a copy of the largest
  matrices: 212 MB for SmolLM2 in fp32);
- rotary embeddings are applied to q and k together, from a cos/sin table computed once per search for
  every position the search can reach (the model's own rotary module builds it, so RoPE scaling variants
  are honoured);
- a static KV cache: the prompt's keys/values stay one copy per user (as :mod:`llmrec.prefix_cache`), the
  generated suffix of every layer lives in one buffer preallocated for the deepest title,
  ``(rows, layers, 2, kv_heads, capacity, head_dim)``: reordering the beams is one ``index_select`` per
  layer for keys and values together, over the filled part only;
- :meth:`LeanDecoder.extend` runs several tokens per row in one pass (causal among them, only each row's own
  tokens through the projections and the MLP): the beam search scores the rest of titles with one way left
  to go with it;
- no attention mask is built per step: the prompt's padding is an additive bias computed once. (A sliding
  window is not applied while decoding, as in :mod:`llmrec.prefix_cache`: a prompt plus a title is far
  shorter than the windows of released Mistral / Qwen2 models.)

On a GPU a step of a small model is bound by kernel launches, not arithmetic (SmolLM2's 30 layers launch
several hundred kernels per token). ``graphs=True`` records the static-shape step once per shape as a CUDA
graph (:class:`torch.cuda.CUDAGraph`) and replays it: every buffer the step reads or writes lives in a
workspace kept per shape (users rounded up to a power of two, beams, prompt length rounded up to a bucket,
title depth), the prompt's keys/values copied in right-aligned at the start of a search (a padded batch's
dummy users attend to zeros and their rows are ignored), so one launch replaces the step's hundreds.
Away from CUDA the same workspaces run eagerly (what the tests check on a CPU).

Scores equal the stock forward's to float tolerance (``tests/llmrec/test_fast_step.py`` checks the lists and
scores of the beam search against the stock path on tiny Llama / Qwen2 / Mistral models and on SmolLM2).
The prompt pass stays the stock forward: it is one call per batch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
PROMPT_BUCKET = 32
"""Prompt lengths are rounded up to a multiple of this for a graph workspace (fewer shapes, fewer captures)."""
POSITION_BUCKET = 64
"""Rotary tables of a graph workspace cover positions up to a multiple of this."""
USER_BUCKET = 16
"""A graph workspace holds the batch's users rounded up to the next power of two up to this, and to a multiple of
it above: a service at mixed concurrency (1, 3, 5, 6, ... users a batch) then records a few shapes, not one per
batch size. The extra users are dummies whose rows are computed and ignored."""
GRAPH_WORKSPACES = 4
"""Graph workspaces (one per shape, each with its captured graph and buffers) kept, least recently used
dropped first: the suffix buffer of SmolLM2 at 16 users × 20 beams is ~0.6 GB in fp32."""


def lean_supported(model: PreTrainedModel) -> str | None:
    """None when :class:`LeanDecoder` can run ``model``, else why not (the caller falls back to the stock step)."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the lean step implements SiLU)"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None or not len(layers):
        return "the decoder has no layers"
    if not hasattr(decoder, "rotary_emb"):
        return "the decoder has no shared rotary embedding"
    return None


@dataclass
class _Layer:
    """One decoder layer's weights, packed for the step (views of the model's own where no packing is needed)."""

    qkv_weight: torch.Tensor
    """(heads·hd + 2·kv_heads·hd, d), the q rows pre-multiplied by the attention scale, every column by the input
    norm's weight (so the step normalises without it)."""
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor | None
    up_weight: torch.Tensor
    up_bias: torch.Tensor | None
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None


def _bias(module: torch.nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if bias is not None else None


def _cat_bias(modules: list[torch.nn.Linear], scales: list[float]) -> torch.Tensor | None:
    biases = [_bias(m) for m in modules]
    if all(b is None for b in biases):
        return None
    parts = [(b if b is not None else m.weight.new_zeros(m.weight.shape[0])) * s
             for b, m, s in zip(biases, modules, scales, strict=True)]
    return torch.cat(parts)


def _residual(x: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x + inputs @ weightᵀ (+ bias)``: one ``addmm`` when there is no bias (the stream update and the residual
    add in one call)."""
    if bias is None:
        return torch.addmm(x, inputs, weight.t())
    return x + F.linear(inputs, weight, bias)


def user_bucket(users: int) -> int:
    """Users of the graph workspace that serves a batch of ``users`` (see :data:`USER_BUCKET`)."""
    if users < 1:
        raise ValueError(f"users must be positive, got {users}")
    if users <= USER_BUCKET:
        return 1 << (users - 1).bit_length()
    return -(-users // USER_BUCKET) * USER_BUCKET


class LeanDecoder:
    """Decoding steps of a stock decoder LM over a shared-prefix, preallocated beam cache.

    Built once per model (the packed q/k/v weights are a copy: 66 MB for SmolLM2-135M in fp32;
    :meth:`llmrec.recommender.Recommender.refresh` drops it after training changes the weights).
    """

    def __init__(self, model: PreTrainedModel, compiled: bool = False, static: bool | None = None,
                 graphs: bool = False) -> None:
        reason = lean_supported(model)
        if reason is not None:
            raise ValueError(f"the lean decoding step cannot run this model: {reason}")
        decoder = model.get_decoder()
        first = decoder.layers[0]
        attention = first.self_attn
        self.head_dim = int(attention.head_dim)
        self.heads = attention.q_proj.weight.shape[0] // self.head_dim
        self.kv_heads = attention.k_proj.weight.shape[0] // self.head_dim
        self.groups = self.heads // self.kv_heads
        self.hidden = int(first.input_layernorm.weight.shape[0])
        self.eps = float(first.input_layernorm.variance_epsilon)
        self.final_norm = decoder.norm.weight.detach()
        self.final_eps = float(decoder.norm.variance_epsilon)
        self.embed = model.get_input_embeddings()
        self.rotary = decoder.rotary_emb
        self.layers: list[_Layer] = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            scale = float(attn.scaling)  # folded into q: rotary is linear, so scaling before it is the same
            projections = [attn.q_proj, attn.k_proj, attn.v_proj]
            # the input norm's weight folded into the packed copy's columns: W·(w ⊙ n) = (W·diag(w))·n
            qkv = torch.cat([attn.q_proj.weight.detach().float() * scale, attn.k_proj.weight.detach().float(),
                             attn.v_proj.weight.detach().float()])
            self.layers.append(_Layer(
                qkv_weight=(qkv * layer.input_layernorm.weight.detach().float()[None, :]).to(attn.q_proj.weight.dtype),
                qkv_bias=_cat_bias(projections, [scale, 1.0, 1.0]),
                o_weight=attn.o_proj.weight.detach(),
                o_bias=_bias(attn.o_proj),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_weight=mlp.gate_proj.weight.detach(),
                gate_bias=_bias(mlp.gate_proj),
                up_weight=mlp.up_proj.weight.detach(),
                up_bias=_bias(mlp.up_proj),
                down_weight=mlp.down_proj.weight.detach(),
                down_bias=_bias(mlp.down_proj),
            ))
        self.compiled = compiled
        self.graphs = graphs
        """Per-shape workspaces, the step recorded as a CUDA graph on a CUDA device (eager elsewhere)."""
        self._workspaces: OrderedDict[tuple, _GraphWorkspace] = OrderedDict()
        self.static = bool(static) or compiled or graphs
        """Fixed shapes per batch: the step index a tensor, attention over the whole preallocated suffix with the
        unfilled slots masked (what a compiled graph needs; eager, slicing the filled part is cheaper)."""
        # torch.compile with symbolic shapes: one graph for every batch size and prompt length (sizes 0 and 1
        # are specialised, so the warm-up runs two batch shapes). On this project's 2-core CPU compiling took
        # minutes even for a 2-layer model: 'compiled' is meant for a GPU; the eager lean step is the CPU's.
        self._layers = torch.compile(self._run_layers, dynamic=True) if compiled else self._run_layers

    def start(self, prompt_cache: Cache, prefix_mask: torch.Tensor, beams: int, positions: torch.Tensor,
              capacity: int) -> BeamCache:
        """The beam cache after a stock prompt pass.

        Args:
            prompt_cache: the prompt pass's cache, one row per user, (users, kv_heads, P, hd) per layer.
            prefix_mask: (users, P) bool, True where a prompt position is real (left padding False).
            beams: beams per user; rows are user-major (row = user·beams + beam).
            positions: (rows,) position id of every row's first generated token.
            capacity: most tokens a beam will generate (the trie's depth).
        """
        keys = [layer.keys for layer in prompt_cache.layers]
        values = [layer.values for layer in prompt_cache.layers]
        if any(k is None for k in keys) or any(v is None for v in values):
            raise ValueError("the prompt cache is empty")
        users = prefix_mask.shape[0]
        reference = keys[0]
        assert reference is not None
        if self.graphs:
            return self._start_in_workspace(keys, values, prefix_mask, beams, positions, capacity)  # type: ignore[arg-type]
        # (rows, layers, 2, kv, capacity, hd). Eager, the unfilled slots are never read, so the buffer need not
        # be initialised; the static path multiplies them by masked (zero) weights, so they must hold finite
        # numbers
        shape = (users * beams, len(self.layers), 2, self.kv_heads, capacity, self.head_dim)
        suffix = reference.new_zeros(shape) if self.static else reference.new_empty(shape)
        # (users, 1, 1, P): 0 where the prompt position is real, -inf on the left padding
        prefix_bias = torch.zeros(prefix_mask.shape, dtype=reference.dtype, device=reference.device)
        prefix_bias = prefix_bias.masked_fill(~prefix_mask, float("-inf"))[:, None, None, :]
        # cos/sin for every position a row can reach: (rows, capacity, hd) would be gathered per step from here
        cos, sin = self._rotary_tables(reference, int(positions.max()) + capacity)
        return BeamCache(prefix_keys=keys, prefix_values=values, prefix_bias=prefix_bias, suffix=suffix,  # type: ignore[arg-type]
                         beams=beams, cos=cos, sin=sin)

    def _rotary_tables(self, reference: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(top, hd) cos and sin tables for positions 0..top-1 from the model's own rotary module (RoPE scaling
        variants hold), the sin table's first half negated: ``rotate_half(x)·sin`` is then
        ``roll(x, hd/2)·signed_sin``, one op instead of a slice, a negation and a concatenation."""
        cos, sin = self.rotary(reference, torch.arange(top, device=reference.device)[None])
        sign = torch.ones(self.head_dim, dtype=sin.dtype, device=sin.device)
        sign[: self.head_dim // 2] = -1
        return cos[0], sin[0] * sign

    def step(self, cache: BeamCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row -> (rows, d) final hidden states (after the last norm); appends to the cache.

        Args:
            tokens: (rows,) the token each row appends.
            positions: (rows,) its position id.
        """
        step = cache.length
        capacity = cache.suffix.shape[4]
        if step >= capacity:
            raise RuntimeError("beam cache capacity exceeded")
        workspace = cache.workspace
        if workspace is not None:
            rows = tokens.shape[0]  # the real rows; a dummy user's rows keep the token and position set at start
            workspace.tokens[:rows].copy_(tokens)
            workspace.positions[:rows].copy_(positions)
            workspace.slot.fill_(step)
            if workspace.on_cuda:
                if workspace.graph is None:
                    self._capture(workspace)
                assert workspace.graph is not None and workspace.output is not None
                workspace.graph.replay()
                hidden = workspace.output[:rows].clone()  # the next replay overwrites the graph's output
            else:
                hidden = self._static_step(workspace.tokens, workspace.positions, workspace.slot, cache)[:rows]
        elif self.static:
            # static shapes for the compiled graph: the step is a tensor and attention spans the whole buffer,
            # the unfilled slots masked (a Python int here would be specialised: one compilation per step)
            slot = torch.full((1,), step, dtype=torch.long, device=tokens.device)
            hidden = self._static_step(tokens, positions, slot, cache)
        else:
            return self.extend(cache, tokens[:, None], positions[:, None])[:, 0]
        cache.length = step + 1
        return hidden

    def extend(self, cache: BeamCache, tokens: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """T tokens per row at once -> (rows, T, d) final hidden states; appends all T to the cache (eager only).

        Token t of a row attends to the row's prompt, its earlier suffix and its tokens 0..t: the hidden states
        equal T calls of :meth:`step` (to float tolerance). The beam search uses it to score the rest of titles
        that have only one way left to go (:func:`llmrec.decode.constrained_beam_search`) in one pass.

        Args:
            tokens: (rows, T) the tokens each row appends, in order.
            positions: (rows, T) their position ids.
            valid: (rows, T) bool, the tokens to compute, each row's first few (rows of different lengths):
                the projections and the MLP run on those only, the rest is zero in the output (and in the
                cache, where no valid token can see it). None: all.
        """
        if cache.workspace is not None or self.static:
            raise RuntimeError("extend runs the eager step only (a static or graph-recorded step is one token a call)")
        rows, count = tokens.shape
        step = cache.length
        if step + count > cache.suffix.shape[4]:
            raise RuntimeError("beam cache capacity exceeded")
        index = None if valid is None else torch.nonzero(valid.reshape(-1)).flatten()  # (N,) into rows·T
        flat_tokens, flat_positions = tokens.reshape(-1), positions.reshape(-1)
        if index is not None:
            flat_tokens, flat_positions = flat_tokens[index], flat_positions[index]
        x = self.embed(flat_tokens)  # (N, d)
        cos, sin = cache.cos[flat_positions][:, None, :], cache.sin[flat_positions][:, None, :]  # (N, 1, hd)
        hidden = self._layers(x, cos, sin, cache.suffix, cache.prefix_keys, cache.prefix_values, cache.prefix_bias,
                              step, None, cache.beams, count, index)
        cache.length = step + count
        if index is not None:
            hidden = hidden.new_zeros((rows * count, hidden.shape[-1])).index_copy_(0, index, hidden)
        return hidden.view(rows, count, -1)

    def _static_step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                     cache: BeamCache) -> torch.Tensor:
        """The step with every shape fixed by the cache: ``slot`` (1,) is the step index as a tensor."""
        capacity = cache.suffix.shape[4]
        x = self.embed(tokens[:, None])[:, 0]  # (rows, d)
        cos, sin = cache.cos[positions][:, None, :], cache.sin[positions][:, None, :]  # (rows, 1, hd)
        filled = torch.arange(capacity, device=x.device) <= slot
        suffix_bias = torch.zeros(capacity, dtype=x.dtype, device=x.device).masked_fill(~filled, float("-inf"))
        return self._layers(x, cos, sin, cache.suffix, cache.prefix_keys, cache.prefix_values, cache.prefix_bias,
                            slot, suffix_bias, cache.beams, 1, None)

    def _start_in_workspace(self, keys: list[torch.Tensor], values: list[torch.Tensor], prefix_mask: torch.Tensor,
                            beams: int, positions: torch.Tensor, capacity: int) -> BeamCache:
        """The beam cache in the workspace of this shape (made, and its graph captured, on first use): the users
        rounded up by :func:`user_bucket`, the prompt length to a multiple of :data:`PROMPT_BUCKET`."""
        reference = keys[0]
        users, prompt_len = prefix_mask.shape
        bucket = user_bucket(users)
        padded_len = -(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET
        top = int(positions.max()) + capacity
        table_len = -(-top // POSITION_BUCKET) * POSITION_BUCKET
        shape = (bucket, beams, padded_len, capacity, table_len, reference.dtype, reference.device)
        workspace = self._workspaces.pop(shape, None)
        if workspace is None:
            workspace = _GraphWorkspace.allocate(self, reference, bucket, beams, padded_len, capacity, table_len)
            while len(self._workspaces) >= GRAPH_WORKSPACES:
                self._workspaces.popitem(last=False)
        self._workspaces[shape] = workspace  # most recently used last
        # the prompt right-aligned in the padded length; the extra (left) positions masked like padding. Dummy
        # users attend to zero keys and values, unmasked, so their rows stay finite
        offset = padded_len - prompt_len
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            for buffer, real in ((workspace.prefix_keys[layer], k), (workspace.prefix_values[layer], v)):
                buffer[:users, :, :offset].zero_()
                buffer[:users, :, offset:].copy_(real)
                buffer[users:].zero_()
        workspace.prefix_bias.fill_(float("-inf"))
        workspace.prefix_bias[:users, ..., offset:].masked_fill_(prefix_mask[:, None, None, :], 0.0)
        workspace.prefix_bias[users:].zero_()
        workspace.suffix.zero_()  # the static step multiplies unfilled slots by masked weights: finite numbers
        real_rows = users * beams
        workspace.tokens[real_rows:].zero_()  # a dummy row's input: token 0 at position 0, every step
        workspace.positions[real_rows:].zero_()
        cos, sin = self._rotary_tables(reference, top)
        workspace.cos[:top].copy_(cos)
        workspace.sin[:top].copy_(sin)
        return workspace.beam_cache()

    def _capture(self, workspace: _GraphWorkspace) -> None:
        """Record the workspace's step as a CUDA graph (its buffers are the graph's inputs and output)."""
        cache = workspace.beam_cache()
        device = workspace.suffix.device
        # warm-up on a side stream (cuBLAS handles, allocator) as torch.cuda.graph requires; it writes the same
        # k/v at the same slot as the replay that follows, so it changes nothing
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._static_step(workspace.tokens, workspace.positions, workspace.slot, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            workspace.output = self._static_step(workspace.tokens, workspace.positions, workspace.slot, cache)
        workspace.graph = graph
        logger.debug("captured a decoding-step graph for %d rows, prompt %d, depth %d", workspace.tokens.shape[0],
                     workspace.prefix_bias.shape[-1], workspace.suffix.shape[4])

    def _run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, suffix: torch.Tensor,
                    prefix_keys: list[torch.Tensor], prefix_values: list[torch.Tensor], prefix_bias: torch.Tensor,
                    step: int | torch.Tensor, suffix_bias: torch.Tensor | None, beams: int, count: int,
                    index: torch.Tensor | None) -> torch.Tensor:
        """Every layer and the final norm for ``count`` (T) tokens per row; writes their k/v at ``step`` onwards.

        x (N, d) and cos/sin (N, 1, hd): the tokens computed, row-major; ``index`` (N,) their places among the
        rows·T (None: all of them, N = rows·T). Attention runs over the rows·T layout (a token not computed has
        zero q/k/v there and is never seen by a computed one, which only sees its row's earlier tokens).
        Eager (``suffix_bias`` None, ``step`` an int): attention over the filled part of the suffix only, causal
        among the T new tokens. Compiled (``step`` a (1,) tensor, T = 1, ``suffix_bias`` (capacity,) additive):
        over the whole buffer, masked.
        """
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        rows = prefix_bias.shape[0] * beams  # users × beams, user-major
        half = hd // 2
        causal = None
        if isinstance(step, int) and count > 1:  # (T, step + T): token t sees slots up to step + t
            slots = torch.arange(step + count, device=x.device)
            allowed = slots[None, :] <= step + torch.arange(count, device=x.device)[:, None]
            causal = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        for number, layer in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), None, self.eps)  # the weight is folded into qkv_weight
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)  # (N, (heads + 2·kv)·hd)
            qk = qkv[:, : (heads + kv_heads) * hd].view(-1, heads + kv_heads, hd)
            qk = torch.addcmul(qk * cos, torch.roll(qk, half, -1), sin)  # rotary on q and k at once (sin signed)
            value = qkv[:, (heads + kv_heads) * hd :]
            if index is not None:  # into the rows·T layout
                qk = qk.new_zeros((rows * count, heads + kv_heads, hd)).index_copy_(0, index, qk)
                value = value.new_zeros((rows * count, kv_heads * hd)).index_copy_(0, index, value)
            qk = qk.view(rows, count, heads + kv_heads, hd)
            key = qk[:, :, heads:].transpose(1, 2)  # (rows, kv, T, hd)
            value = value.view(rows, count, kv_heads, hd).transpose(1, 2)
            keys, values = suffix[:, number, 0], suffix[:, number, 1]  # (rows, kv, capacity, hd)
            if isinstance(step, int):
                keys[:rows, :, step : step + count], values[:rows, :, step : step + count] = key, value
                keys, values = keys[:rows, :, : step + count], values[:rows, :, : step + count]
            else:
                keys.index_copy_(2, step, key)
                values.index_copy_(2, step, value)
            attended = self._attend(qk[:, :, :heads], prefix_keys[number], prefix_values[number], prefix_bias, keys, values,
                                    suffix_bias if causal is None else causal, beams)  # (rows·T, heads·hd)
            if index is not None:
                attended = attended.index_select(0, index)
            x = _residual(x, attended, layer.o_weight, layer.o_bias)
            h = F.rms_norm(x, (self.hidden,), layer.post_norm, self.eps)
            gate, up = F.linear(h, layer.gate_weight, layer.gate_bias), F.linear(h, layer.up_weight, layer.up_bias)
            x = _residual(x, F.silu(gate) * up, layer.down_weight, layer.down_bias)
        return F.rms_norm(x, (self.hidden,), self.final_norm, self.final_eps)

    def _attend(self, query: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor,
                prefix_bias: torch.Tensor, suffix_keys: torch.Tensor, suffix_values: torch.Tensor,
                suffix_bias: torch.Tensor | None, beams: int) -> torch.Tensor:
        """query (rows, T, heads, hd), already scaled -> (rows·T, heads·hd) over the user's prompt + the row's suffix.

        prefix_keys/values (users, kv, P, hd); suffix_keys/values (rows, kv, S, hd); ``suffix_bias`` additive,
        (S,) or (T, S). Prompt part: all beams, tokens and query heads of a KV group of a user in one matmul
        against that user's keys (GQA without repeating K/V); suffix part: per row. Within a (user, KV group)
        the queries are ordered (beam, token, group head).
        """
        rows, count = query.shape[:2]
        users, kv_heads, groups, hd = rows // beams, self.kv_heads, self.groups, self.head_dim
        prompt_len, length = prefix_keys.shape[2], suffix_keys.shape[2]
        per_user = beams * count * groups
        q_user = query.view(users, beams, count, kv_heads, groups, hd).permute(0, 3, 1, 2, 4, 5).reshape(
            users, kv_heads, per_user, hd)
        prefix_scores = torch.matmul(q_user, prefix_keys[:users].transpose(-1, -2)) + prefix_bias[:users]  # (users, kv, b·T·g, P)
        q_row = query.view(rows, count, kv_heads, groups, hd).permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, count * groups, hd)
        suffix_scores = torch.matmul(q_row, suffix_keys.transpose(-1, -2))  # (rows, kv, T·g, S)
        if suffix_bias is not None:
            if suffix_bias.dim() == 2:  # (T, S) -> (T·g, S): every head of a token gets the token's row
                suffix_bias = suffix_bias.repeat_interleave(groups, dim=0)
            suffix_scores = suffix_scores + suffix_bias
        suffix_scores = suffix_scores.view(users, beams, kv_heads, count * groups, length).transpose(1, 2)
        scores = torch.cat([prefix_scores, suffix_scores.reshape(users, kv_heads, per_user, length)], dim=-1)
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)  # (users, kv, b·T·g, P + S)
        out = torch.matmul(probs[..., :prompt_len], prefix_values[:users])  # (users, kv, b·T·g, hd)
        suffix_probs = probs[..., prompt_len:].reshape(users, kv_heads, beams, count * groups, length).transpose(1, 2)
        suffix_out = torch.matmul(suffix_probs.reshape(rows, kv_heads, count * groups, length), suffix_values)
        # both to (rows, T, kv, g, hd)
        out = out.view(users, kv_heads, beams, count, groups, hd).permute(0, 2, 3, 1, 4, 5).reshape(
            rows, count, kv_heads, groups, hd)
        out = out + suffix_out.view(rows, kv_heads, count, groups, hd).transpose(1, 2)
        return out.reshape(rows * count, self.heads * hd)


@dataclass
class BeamCache:
    """The static beam cache of :class:`LeanDecoder`."""

    prefix_keys: list[torch.Tensor]
    """Per layer (users, kv_heads, P, hd): the prompt's keys, one copy per user."""
    prefix_values: list[torch.Tensor]
    prefix_bias: torch.Tensor
    """(users, 1, 1, P) additive: -inf on the left padding."""
    suffix: torch.Tensor
    """(rows, layers, 2, kv_heads, capacity, hd): generated keys (0) and values (1), preallocated."""
    beams: int
    cos: torch.Tensor
    """(positions, hd) rotary table."""
    sin: torch.Tensor
    """(positions, hd), its first half negated (see :meth:`LeanDecoder._rotary_tables`)."""
    length: int = 0
    """Tokens generated so far (filled suffix positions)."""
    workspace: _GraphWorkspace | None = None
    """The graph workspace whose buffers these are (``LeanDecoder(graphs=True)``), else None."""

    def reorder(self, parent: torch.Tensor, beams: int | None = None, users: torch.Tensor | None = None) -> None:
        """Row r continues row ``parent[r]`` (always a beam of the same user, so the prompt part stays); ``parent``
        covers the real rows, the first ones (a graph workspace's dummy rows after them are left alone).

        Eager only, the beam search narrows the rows (:class:`llmrec.decode.BeamSearchConfig` ``narrow``):
        ``beams``, rows per user from now on; ``users`` (A,), ascending indices of the users kept (the prompt's
        keys and values of the others dropped). ``parent`` then has A × ``beams`` entries, user-major, indexing
        the earlier rows: a row of a dead beam or a finished user costs as much to compute as a live one.
        """
        rows = parent.shape[0]
        if (users is not None or (beams is not None and beams != self.beams)) and self.workspace is not None:
            raise RuntimeError("a graph workspace keeps its users and rows per user")
        if users is not None:
            self.prefix_keys = [keys.index_select(0, users) for keys in self.prefix_keys]
            self.prefix_values = [values.index_select(0, users) for values in self.prefix_values]
            self.prefix_bias = self.prefix_bias.index_select(0, users)
        if beams is not None:
            if rows != self.prefix_bias.shape[0] * beams:
                raise ValueError(f"parent has {rows} rows, not users ({self.prefix_bias.shape[0]}) × {beams}")
            self.beams = beams
        # one layer at a time: the copy index_select makes is then one layer's, not the whole buffer's (for
        # SmolLM2 at 16 users × 20 beams a whole-buffer copy added ~370 MB to the peak)
        for layer in range(self.suffix.shape[1]) if self.length else ():
            filled = self.suffix[:, layer, :, :, : self.length]
            filled[:rows].copy_(filled.index_select(0, parent))


@dataclass
class _GraphWorkspace:
    """Every buffer one shape's graph-recorded step reads or writes; their addresses never change."""

    beams: int
    prefix_keys: list[torch.Tensor]
    """Per layer (users, kv_heads, padded prompt, hd), the prompt right-aligned."""
    prefix_values: list[torch.Tensor]
    prefix_bias: torch.Tensor
    """(users, 1, 1, padded prompt): 0 on real prompt positions, -inf elsewhere."""
    suffix: torch.Tensor
    """(rows, layers, 2, kv_heads, capacity, hd)."""
    cos: torch.Tensor
    """(table length, hd)."""
    sin: torch.Tensor
    tokens: torch.Tensor
    """(rows,) the step's input tokens."""
    positions: torch.Tensor
    """(rows,) their position ids."""
    slot: torch.Tensor
    """(1,) the step index."""
    on_cuda: bool
    graph: torch.cuda.CUDAGraph | None = field(default=None, repr=False)
    output: torch.Tensor | None = field(default=None, repr=False)
    """(rows, d): the graph's output buffer."""

    def beam_cache(self) -> BeamCache:
        """A search's beam cache over these buffers (the step finds the workspace through it)."""
        return BeamCache(prefix_keys=self.prefix_keys, prefix_values=self.prefix_values, prefix_bias=self.prefix_bias,
                         suffix=self.suffix, beams=self.beams, cos=self.cos, sin=self.sin, workspace=self)

    @classmethod
    def allocate(cls, decoder: LeanDecoder, reference: torch.Tensor, users: int, beams: int, padded_len: int,
                 capacity: int, table_len: int) -> _GraphWorkspace:
        rows, layers = users * beams, len(decoder.layers)
        kv, hd = decoder.kv_heads, decoder.head_dim

        def zeros(*shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype or reference.dtype, device=reference.device)

        return cls(
            beams=beams,
            prefix_keys=[zeros(users, kv, padded_len, hd) for _ in range(layers)],
            prefix_values=[zeros(users, kv, padded_len, hd) for _ in range(layers)],
            prefix_bias=zeros(users, 1, 1, padded_len),
            suffix=zeros(rows, layers, 2, kv, capacity, hd),
            cos=zeros(table_len, hd),
            sin=zeros(table_len, hd),
            tokens=zeros(rows, dtype=torch.long),
            positions=zeros(rows, dtype=torch.long),
            slot=zeros(1, dtype=torch.long),
            on_cuda=reference.device.type == "cuda",
        )
