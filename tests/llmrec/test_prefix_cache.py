"""The shared-prefix beam cache alone: attention equals plain attention over prefix + suffix, reordering
moves only the suffix, and the capacity is enforced."""

from __future__ import annotations

import pytest
import torch

from llmrec.prefix_cache import PrefixBeamLayer, SplitKV, prefix_beam_attention


def reference_attention(query, prefix_k, prefix_v, suffix_k, suffix_v, mask, beams):
    """Per row: softmax(q·k) over the user's real prompt positions and the row's own suffix (GQA repeated)."""
    rows, q_heads, _, dim = query.shape
    kv_heads = prefix_k.shape[1]
    out = torch.empty(rows, 1, q_heads, dim)
    for row in range(rows):
        user = row // beams
        keys = torch.cat([prefix_k[user][:, mask[user]], suffix_k[row]], dim=1)  # (kv, P' + S, d)
        values = torch.cat([prefix_v[user][:, mask[user]], suffix_v[row]], dim=1)
        keys = keys.repeat_interleave(q_heads // kv_heads, dim=0)
        values = values.repeat_interleave(q_heads // kv_heads, dim=0)
        weights = torch.softmax(query[row] @ keys.transpose(-1, -2) * dim**-0.5, dim=-1)  # (q_heads, 1, P'+S)
        out[row] = (weights @ values).transpose(0, 1)
    return out


@pytest.mark.parametrize(("kv_heads", "q_heads"), [(1, 3), (2, 2)])
def test_prefix_beam_attention_equals_plain_attention(kv_heads, q_heads):
    torch.manual_seed(0)
    users, beams, prompt, generated, dim = 2, 3, 5, 4, 8
    prefix_k, prefix_v = torch.randn(users, kv_heads, prompt, dim), torch.randn(users, kv_heads, prompt, dim)
    suffix_k, suffix_v = torch.randn(users * beams, kv_heads, generated, dim), torch.randn(users * beams, kv_heads, generated, dim)
    mask = torch.ones(users, prompt, dtype=torch.bool)
    mask[1, :2] = False  # left padding of the second user's prompt
    query = torch.randn(users * beams, q_heads, 1, dim)
    out, _ = prefix_beam_attention(torch.nn.Module(), query, SplitKV(prefix_k, suffix_k, mask), SplitKV(prefix_v, suffix_v, mask), None)
    expected = reference_attention(query, prefix_k, prefix_v, suffix_k, suffix_v, mask, beams)
    assert out.shape == (users * beams, 1, q_heads, dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_layer_appends_reorders_the_suffix_only_and_enforces_capacity():
    users, beams, heads, prompt, dim = 1, 2, 1, 3, 4
    keys, values = torch.randn(users, heads, prompt, dim), torch.randn(users, heads, prompt, dim)
    layer = PrefixBeamLayer(keys, values, torch.ones(users, prompt, dtype=torch.bool), beams, capacity=2)
    step = torch.arange(beams, dtype=torch.float).view(beams, 1, 1, 1).expand(beams, heads, 1, dim)
    k, _ = layer.update(step, step)
    assert k.prefix is keys and k.suffix.shape == (beams, heads, 1, dim) and layer.get_seq_length() == prompt + 1
    layer.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(layer.suffix_keys[:, :, :1], torch.ones(beams, heads, 1, dim))
    assert layer.prefix_keys is keys  # the shared prompt is never copied
    layer.update(step, step)
    with pytest.raises(RuntimeError, match="capacity"):
        layer.update(step, step)
    with pytest.raises(ValueError, match="one token"):
        prefix_beam_attention(torch.nn.Module(), torch.randn(beams, heads, 2, dim), k, k, None)
