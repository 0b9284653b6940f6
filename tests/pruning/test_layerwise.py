"""Running a decoder a layer at a time: the recorded inputs reproduce the model, copies run as one."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama, tiny_qwen2

from pruning.calibration import Batch
from pruning.layerwise import decoder_inputs, run_layer, tiled


def padded_batches(vocab: int, count: int = 2, length: int = 12) -> list[Batch]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for _ in range(count):
        ids = torch.randint(2, vocab, (3, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, length - 4 :] = 0  # right padding
        ids[1, length - 4 :] = 0
        out.append(Batch(ids, mask, torch.full_like(ids, -100)))
    return out


@pytest.fixture(params=["llama", "qwen2-sliding"])
def model(request, tokenizer):
    if request.param == "llama":
        return tiny_llama(len(tokenizer), layers=3)
    return tiny_qwen2(len(tokenizer), layers=3, sliding_window=4)  # layer 0 full attention, 1 and 2 a window of 4


@torch.no_grad()
def test_layers_run_one_at_a_time_reproduce_the_decoder(model, tokenizer):
    calibration = padded_batches(len(tokenizer))
    inputs = decoder_inputs(model, calibration)
    assert [len(batch.kwargs) for batch in inputs] == [3, 3]
    for batch, captured in zip(calibration, inputs, strict=True):
        hidden = captured.hidden
        for layer, kwargs in zip(model.model.layers, captured.kwargs, strict=True):
            hidden = run_layer(layer, hidden, kwargs)
        expected = model.model(**batch.model_inputs(), use_cache=False).last_hidden_state
        real = batch.attention_mask.bool()
        assert torch.allclose(model.model.norm(hidden)[real], expected[real], atol=1e-5)


@torch.no_grad()
def test_a_sliding_window_layer_gets_its_own_mask(tokenizer):
    """With layer 0's mask for every layer (what a capture of the first layer alone gives) the windowed layers
    would attend too far back: the per-layer record is what makes the stream right."""
    model = tiny_qwen2(len(tokenizer), layers=3, sliding_window=4)
    captured = decoder_inputs(model, padded_batches(len(tokenizer), count=1))[0]
    hidden_own, hidden_first = captured.hidden, captured.hidden
    for layer, kwargs in zip(model.model.layers, captured.kwargs, strict=True):
        hidden_own = run_layer(layer, hidden_own, kwargs)
        hidden_first = run_layer(layer, hidden_first, captured.kwargs[0])
    assert not torch.allclose(hidden_own, hidden_first, atol=1e-3)


@torch.no_grad()
def test_copies_stacked_along_the_batch_run_as_each_alone(model, tokenizer):
    captured = decoder_inputs(model, padded_batches(len(tokenizer), count=1))[0]
    layer, kwargs = model.model.layers[2], captured.kwargs[2]
    streams = [captured.hidden + 0.1 * k for k in range(3)]  # three different streams of the same batch
    together = run_layer(layer, torch.cat(streams), tiled(kwargs, captured.rows, 3))
    for k, stream in enumerate(streams):
        alone = run_layer(layer, stream, kwargs)
        assert torch.allclose(together[k * captured.rows : (k + 1) * captured.rows], alone, atol=1e-5)
    assert tiled(kwargs, captured.rows, 1) is kwargs
