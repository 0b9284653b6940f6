"""Physical slicing: identity when keeping everything, counts, reload, cached generation, GQA uniformity."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama, tiny_qwen2
from transformers import AutoModelForCausalLM

from llmrec.artifact import parameter_counts
from pruning.surgery import count_parameters, drop_layers, shape_of, slice_heads, slice_mlp, slice_residual


def models(vocab):
    return {
        "llama-tied": tiny_llama(vocab, tie=True, layers=3),
        "qwen2-untied-bias": tiny_qwen2(vocab, tie=False, layers=3),
    }


@pytest.fixture(params=["llama-tied", "qwen2-untied-bias"])
def model(request, tokenizer):
    return models(len(tokenizer))[request.param]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def everything(model):
    s = shape_of(model)
    return {
        "heads": ([list(range(s.kv_heads))] * s.layers, [list(range(s.heads))] * s.layers),
        "residual": list(range(s.hidden)),
        "mlp": [list(range(s.intermediate))] * s.layers,
    }


def test_keeping_everything_is_an_exact_identity(model, tokenizer):
    ids = torch.randint(2, len(tokenizer), (2, 11))
    reference = logits(model, ids)
    keep = everything(model)
    for pruned in (slice_heads(model, *keep["heads"]), slice_residual(model, keep["residual"]), slice_mlp(model, keep["mlp"])):
        torch.testing.assert_close(logits(pruned, ids), reference, atol=1e-5, rtol=0)


def check_counts(pruned):
    counts = parameter_counts(pruned)
    bias = bool(getattr(pruned.config, "attention_bias", False)) or pruned.config.model_type == "qwen2"
    assert counts == count_parameters(shape_of(pruned), attention_bias=bias)


def test_counts_reload_and_cached_generation_after_each_cut(model, tokenizer, tmp_path):
    s = shape_of(model)
    pruned = slice_heads(model, [[1]] * s.layers, [[2, 3]] * s.layers)  # KV group 1 = query heads 2, 3
    assert shape_of(pruned).heads == 2 and shape_of(pruned).kv_heads == 1 and shape_of(pruned).head_dim == s.head_dim
    check_counts(pruned)
    pruned = slice_residual(pruned, list(range(0, s.hidden, 2)))
    assert shape_of(pruned).hidden == s.hidden // 2
    check_counts(pruned)
    pruned = slice_mlp(pruned, [list(range(0, s.intermediate, 4))] * s.layers)
    check_counts(pruned)
    pruned = drop_layers(pruned, [1])
    assert shape_of(pruned).layers == s.layers - 1
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(s.layers - 1))
    check_counts(pruned)
    pruned.save_pretrained(tmp_path / "p")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    ids = torch.randint(2, len(tokenizer), (2, 9))
    assert torch.equal(logits(reloaded, ids), logits(pruned.eval(), ids))
    with torch.no_grad():
        cached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_dropping_a_layer_equals_skipping_it(model, tokenizer):
    ids = torch.randint(2, len(tokenizer), (1, 7))
    dropped = drop_layers(model, [1])
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[0], layers[2]])
    try:
        expected = logits(model, ids)
    finally:
        model.model.layers = layers
    torch.testing.assert_close(logits(dropped, ids), expected, atol=1e-5, rtol=0)


def test_gqa_groups_stay_uniform(model):
    s = shape_of(model)
    with pytest.raises(ValueError, match="fill the kept KV groups"):
        slice_heads(model, [[0, 1]] * s.layers, [[0, 1, 2]] * s.layers)  # 2 + 1 heads in two groups
    with pytest.raises(ValueError, match="fill the kept KV groups"):
        slice_heads(model, [[0]] * s.layers, [[0, 2]] * s.layers)  # head 2 is in group 1
    with pytest.raises(ValueError, match="equal in every layer"):
        slice_heads(model, [[0]] * (s.layers - 1) + [[0, 1]], [[0, 1]] * (s.layers - 1) + [[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="cannot remove"):
        drop_layers(model, list(range(s.layers)))
