"""Least-squares reconstruction after a cut: the closed form, and every reader's error below the plain slice's."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama, tiny_qwen2

from pruning import reconstruct
from pruning.calibration import Batch
from pruning.surgery import head_rows, shape_of, slice_heads, slice_mlp, slice_residual


def test_refit_restores_a_removed_input_that_the_kept_ones_determine():
    generator = torch.Generator().manual_seed(0)
    kept = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    removed = kept @ torch.randn(6, 3, generator=generator, dtype=torch.float64)  # linear in the kept inputs
    full = torch.cat([kept, removed], dim=1)
    weight = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    moments = reconstruct.Moments(full.T @ kept / 500, kept.T @ kept / 500)
    refit = reconstruct.refit(weight, moments, ridge=1e-9)
    assert refit.shape == (4, 6)
    assert torch.allclose(kept @ refit.T, full @ weight.T, atol=1e-5)
    # the plain slice loses what the removed inputs carried
    assert not torch.allclose(kept @ weight[:, :6].T, full @ weight.T, atol=1e-1)


def batches(vocab: int, count: int = 3) -> list[Batch]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(2, vocab, (4, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0  # right padding, left out of the moments
        ids[0, 9:] = 0
        out.append(Batch(ids, mask, torch.full_like(ids, -100)))
    return out


@pytest.fixture(params=["llama-tied", "qwen2-untied-bias"])
def model(request, tokenizer):
    vocab = len(tokenizer)
    return tiny_llama(vocab, layers=3) if request.param == "llama-tied" else tiny_qwen2(vocab, tie=False, layers=3)


def reader_inputs(model, calibration, modules, pre: bool):
    """Per module, its input (pre=True) or output at the real tokens, over the calibration batches."""
    captured: list[list[torch.Tensor]] = [[] for _ in modules]
    mask = {}

    def hook_for(i):
        def hook(_m, args, output):
            tensor = args[0] if pre else output
            captured[i].append(tensor[mask["m"]].detach().double())
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    with torch.no_grad():
        for batch in calibration:
            mask["m"] = batch.attention_mask.bool()
            model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    for h in handles:
        h.remove()
    return [torch.cat(c) for c in captured]


def error(weight_before, x, weight_after, x_after):
    return float((x @ weight_before.detach().double().T - x_after @ weight_after.detach().double().T).pow(2).mean())


def check(weight_before, x, plain_weight, refit_weight, x_after):
    """The refit reader reaches the least-squares optimum over the calibration tokens (solved here directly),
    well below the plain slice."""
    target = x @ weight_before.detach().double().T
    best = torch.linalg.lstsq(x_after, target).solution.T
    optimum = error(weight_before, x, best, x_after)
    refit_error = error(weight_before, x, refit_weight, x_after)
    assert refit_error <= optimum * 1.01 + 1e-9
    assert refit_error < 0.9 * error(weight_before, x, plain_weight, x_after)


def test_head_and_mlp_refits_beat_the_plain_slice(model, tokenizer):
    calibration = batches(len(tokenizer))
    shape = shape_of(model)
    keep_kv = [[layer % shape.kv_heads] for layer in range(shape.layers)]
    keep_q = [list(range(g[0] * shape.groups, (g[0] + 1) * shape.groups)) for g in keep_kv]
    o_inputs = reader_inputs(model, calibration, [layer.self_attn.o_proj for layer in model.model.layers], pre=True)
    plain = slice_heads(model, keep_kv, keep_q)
    refit = slice_heads(model, keep_kv, keep_q)
    reconstruct.refit_heads(refit, reconstruct.head_moments(model, calibration, keep_q), ridge=1e-6)
    for layer in range(shape.layers):
        x = o_inputs[layer]
        x_kept = x[:, head_rows(keep_q[layer], shape.head_dim)]
        check(model.model.layers[layer].self_attn.o_proj.weight, x, plain.model.layers[layer].self_attn.o_proj.weight,
              refit.model.layers[layer].self_attn.o_proj.weight, x_kept)

    keep = [list(range(0, shape.intermediate, 3))[: shape.intermediate // 3] for _ in range(shape.layers)]
    down_inputs = reader_inputs(model, calibration, [layer.mlp.down_proj for layer in model.model.layers], pre=True)
    plain = slice_mlp(model, keep)
    refit = slice_mlp(model, keep)
    reconstruct.refit_mlp(refit, reconstruct.mlp_moments(model, calibration, keep), ridge=1e-6)
    for layer in range(shape.layers):
        x = down_inputs[layer]
        check(model.model.layers[layer].mlp.down_proj.weight, x, plain.model.layers[layer].mlp.down_proj.weight,
              refit.model.layers[layer].mlp.down_proj.weight, x[:, keep[layer]])


def test_residual_refit_beats_the_plain_slice_for_every_reader(model, tokenizer):
    calibration = batches(len(tokenizer))
    shape = shape_of(model)
    keep = torch.arange(0, shape.hidden, 2)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # norm weights away from their initial ones, so that the refit must carry them
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    norms = [norm for layer in model.model.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    tied = model.config.tie_word_embeddings
    if not tied:
        norms.append(model.model.norm)
    norm_inputs = reader_inputs(model, calibration, norms, pre=True)
    norm_outputs = reader_inputs(model, calibration, norms, pre=False)
    plain = slice_residual(model, keep)
    refit = slice_residual(model, keep)
    reconstruct.refit_residual(refit, reconstruct.residual_moments(model, calibration, keep), ridge=1e-6)

    def sites(m):
        out = []
        for layer in m.model.layers:
            out.append((layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]))
            out.append((layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]))
        if not tied:
            out.append((m.model.norm, [m.lm_head]))
        return out

    for site, (before, after_plain, after_refit) in enumerate(zip(sites(model), sites(plain), sites(refit), strict=True)):
        # what the sliced model's own norm gives on the kept channels of the same stream
        with torch.no_grad():
            x_after = after_plain[0](norm_inputs[site][:, keep].float()).double()
        for reader, plain_reader, refit_reader in zip(before[1], after_plain[1], after_refit[1], strict=True):
            check(reader.weight, norm_outputs[site], plain_reader.weight, refit_reader.weight, x_after)
    if tied:  # a tied head stays tied to the (sliced) embedding
        assert refit.lm_head.weight.data_ptr() == refit.model.embed_tokens.weight.data_ptr()


def final_streams(model, calibration):
    """The stream entering the final norm at the real tokens, over the calibration batches."""
    return reader_inputs(model, calibration, [model.model.norm], pre=True)[0]


def test_depth_refit_writes_the_dropped_layers_contribution(model, tokenizer):
    from pruning.surgery import drop_layers

    calibration = batches(len(tokenizer), count=6)
    removed = [1]
    plain = drop_layers(model, removed)
    refit = drop_layers(model, removed)
    record = reconstruct.refit_depth(model, refit, [0, 2], calibration, ridge=1e-6)
    assert [r["parent_layer"] for r in record] == [0, 2]
    # layer 0 of the child must now write what the parent's layers 0 and 1 wrote together
    assert record[0]["applied"] and record[0]["stream_error_after"] < 0.5 * record[0]["stream_error_before"]
    parent_stream = final_streams(model, calibration)
    plain_error = float((final_streams(plain, calibration) - parent_stream).pow(2).sum(-1).mean())
    refit_error = float((final_streams(refit, calibration) - parent_stream).pow(2).sum(-1).mean())
    assert refit_error < plain_error
    # the last layer's error, measured here on the refit child, is the one the moments predicted
    assert refit_error == pytest.approx(record[-1]["stream_error_after"], rel=1e-3)
    with pytest.raises(ValueError, match="kept layers"):
        reconstruct.refit_depth(model, refit, [0], calibration, ridge=1e-6)


def whole_model_depth_refit(parent, child, kept, calibration, ridge):
    """The depth refit computed the plain way: for each kept layer, both whole models over every batch, the
    parent's stream read where the child's layer must leave it, the child's mid stream and MLP activation
    read inside it (after the refits before it); returns the down_proj weights it arrives at."""
    points = [parent.model.layers[k].input_layernorm for k in kept[1:]] + [parent.model.norm]
    weights = []
    seen: dict[str, torch.Tensor] = {}
    for j, layer in enumerate(child.model.layers):
        handles = [points[j].register_forward_pre_hook(lambda _m, a: seen.__setitem__("target", a[0])),
                   layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("mid", a[0])),
                   layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("act", a[0]))]
        cross = gram = 0
        with torch.no_grad():
            for batch in calibration:
                real = batch.attention_mask.bool()
                parent.model(**batch.model_inputs(), use_cache=False)
                child.model(**batch.model_inputs(), use_cache=False)
                target = (seen["target"][real] - seen["mid"][real]).double()
                act = seen["act"][real].double()
                cross, gram = cross + act.T @ target, gram + act.T @ act
            for handle in handles:
                handle.remove()
            solved = reconstruct._ridge_solve(gram, cross, ridge).T
            weight = layer.mlp.down_proj.weight
            old = weight.detach().double()
            part = reconstruct._squared_error_part
            if part(solved, cross, gram) < part(old, cross, gram):
                weight.copy_(solved.to(weight.dtype))
        weights.append(layer.mlp.down_proj.weight.detach().clone())
    return weights


@pytest.mark.parametrize(("kind", "removed"), [("llama", [1]), ("qwen2-sliding", [0, 2])])
def test_depth_refit_carried_layer_by_layer_is_the_whole_model_refit(tokenizer, kind, removed):
    """Carrying both streams from layer to layer gives the refit that whole-model passes give (also with
    the first layer dropped, and with layers whose attention masks differ)."""
    from helpers import tiny_llama, tiny_qwen2

    from pruning.surgery import drop_layers

    vocab = len(tokenizer)
    parent = tiny_llama(vocab, layers=4) if kind == "llama" else tiny_qwen2(vocab, layers=4, sliding_window=5)
    kept = [i for i in range(4) if i not in removed]
    calibration = batches(vocab, count=3)
    carried, plain = drop_layers(parent, removed), drop_layers(parent, removed)
    reconstruct.refit_depth(parent, carried, kept, calibration, ridge=1e-4)
    expected = whole_model_depth_refit(parent, plain, kept, calibration, ridge=1e-4)
    for layer, weight in zip(carried.model.layers, expected, strict=True):
        torch.testing.assert_close(layer.mlp.down_proj.weight.detach(), weight, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(expected[0], parent.model.layers[kept[0]].mlp.down_proj.weight)  # a refit happened


def every_cut(model):
    """The tiny model cut in every way (1 of 2 KV groups, half the residual and MLP width, layer 1 dropped),
    and where each part of the child came from."""
    from pruning.surgery import drop_layers

    shape = shape_of(model)
    keep_kv = [[0]] * shape.layers
    keep_q = [list(range(shape.groups))] * shape.layers
    keep_residual = list(range(0, shape.hidden, 2))
    keep_mlp = [list(range(0, shape.intermediate, 2))] * shape.layers

    def cut():
        child = slice_heads(model, keep_kv, keep_q)
        child = slice_residual(child, torch.tensor(keep_residual))
        return drop_layers(slice_mlp(child, keep_mlp), [1])

    correspondence = reconstruct.Correspondence(layers=[0, 2], residual=keep_residual, heads=[keep_q[0]] * 2,
                                                kv_heads=[keep_kv[0]] * 2, mlp=[keep_mlp[0]] * 2)
    return cut, correspondence


def test_sequential_refit_after_every_cut_lowers_the_final_stream_error(model, tokenizer):
    calibration = batches(len(tokenizer), count=24)  # ~540 tokens per half: enough for 32 to 64 inputs
    shape = shape_of(model)
    cut, correspondence = every_cut(model)
    keep_q, keep_residual = correspondence.heads, correspondence.residual
    plain, refit = cut(), cut()
    record = reconstruct.refit_sequential(model, refit, correspondence, calibration, ridge=1e-6)
    assert [r["parent_layer"] for r in record] == [0, 2]
    fits = [fit for r in record for fit in r["refits"].values()]
    assert all(fit["held_out_after"] < fit["held_out_before"] for fit in fits if fit["applied"])
    assert sum(fit["applied"] for fit in fits) >= len(fits) // 2
    parent_stream = final_streams(model, calibration)[:, keep_residual]
    plain_error = float((final_streams(plain, calibration) - parent_stream).pow(2).sum(-1).mean())
    refit_error = float((final_streams(refit, calibration) - parent_stream).pow(2).sum(-1).mean())
    assert refit_error < plain_error
    # the error recorded after the last layer is the one measured on the refit child
    assert refit_error == pytest.approx(record[-1]["stream_error_after"], rel=1e-3)
    # the first reader fit, q of layer 0 (its input is the sliced embedding's norm in both children), reaches
    # the least-squares optimum against the parent's kept query rows
    x_after = reader_inputs(plain, calibration, [plain.model.layers[0].self_attn.q_proj], pre=True)[0]
    source = model.model.layers[0].self_attn.q_proj
    x = reader_inputs(model, calibration, [source], pre=True)[0]
    rows = head_rows(keep_q[0], shape.head_dim)
    # (Qwen2's query bias is the parent's at the kept rows, so the weight's target is the same without it)
    check(source.weight[rows], x, plain.model.layers[0].self_attn.q_proj.weight,
          refit.model.layers[0].self_attn.q_proj.weight, x_after)


def test_sequential_refit_leaves_a_layer_the_calibration_tokens_cannot_determine(model, tokenizer):
    """With ~22 tokens per half and 32 to 64 inputs per layer, a solve fits its half exactly and misses the
    other: such refits are rejected and the layer keeps its weight."""
    calibration = batches(len(tokenizer), count=1)
    cut, correspondence = every_cut(model)
    plain, refit = cut(), cut()
    record = reconstruct.refit_sequential(model, refit, correspondence, calibration, ridge=1e-9)
    down = record[0]["refits"]["down"]
    assert not down["applied"] and down["held_out_after"] > down["held_out_before"]
    assert torch.equal(refit.model.layers[0].mlp.down_proj.weight, plain.model.layers[0].mlp.down_proj.weight)
    with pytest.raises(ValueError, match="calibration tokens"):
        reconstruct.refit_sequential(model, cut(), correspondence, [], ridge=1e-9)
