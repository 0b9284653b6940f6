"""The lean decoding step: hidden states equal the stock forward's, beam search gives the same lists and
scores as the stock step (Llama, Qwen2, Mistral, biases, RoPE scaling, GQA, left padding, exclusions, the
assistant), the cache reorders rows and enforces its capacity, and unsupported models fall back."""

from __future__ import annotations

import pytest
import torch
from helpers import histories, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from llmrec.decode import BeamSearchConfig, constrained_beam_search, lean_decoder_for
from llmrec.fast_step import LeanDecoder, lean_supported
from llmrec.recommender import Recommender
from recdata.prompts import compact_template, d3_template


def _tiny(kind: str, vocab: int):
    torch.manual_seed(1)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=1, max_position_embeddings=1024, eos_token_id=1, pad_token_id=0, bos_token_id=None,
                  initializer_range=0.2)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    # Llama with every optional bias and llama3 RoPE scaling (the rotary table must come from the model's module)
    config = LlamaConfig(**common, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the stock init zeroes biases; make them count
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.3)
    return model


def _assert_same(lean, stock):
    for a, b in zip(lean, stock, strict=True):
        assert [i for i, _ in a] == [i for i, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-4)


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids) of prompts left-padded to the longest, as the prompt pass runs them."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), length), dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def test_lean_step_hidden_states_equal_the_stock_forward(tokenizer):
    """Teacher-forced: the prompt through the stock model, then tokens one at a time through the lean step, for
    two users of different prompt lengths with 2 beams each; every step's hidden state equals the stock
    forward's over the whole (unpadded) sequence at that position."""
    model = tiny_llama(len(tokenizer), layers=3)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    continuations = [[[20, 21, 22], [23, 24, 25]], [[26, 27, 28], [29, 30, 31]]]  # per user, per beam
    ids, mask, positions = _left_padded(prompts)
    lean = LeanDecoder(model)
    with torch.no_grad():
        out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        next_position = torch.tensor([len(prompts[0])] * 2 + [len(prompts[1])] * 2)
        cache = lean.start(out.past_key_values, mask.bool(), 2, next_position, capacity=3)
        for step in range(3):
            tokens = torch.tensor([continuations[u][b][step] for u in range(2) for b in range(2)])
            hidden = lean.step(cache, tokens, next_position + step)
            for user in range(2):
                for beam in range(2):
                    full = torch.tensor([prompts[user] + continuations[user][beam][: step + 1]])
                    expected = model.get_decoder()(input_ids=full).last_hidden_state[0, -1]
                    torch.testing.assert_close(hidden[user * 2 + beam], expected, rtol=1e-4, atol=1e-4)
        with pytest.raises(RuntimeError, match="capacity"):
            lean.step(cache, tokens, next_position + 3)


def test_extend_equals_steps_one_token_at_a_time(tokenizer):
    """T tokens per row in one pass (causal among them) give the hidden states T single steps give, and leave
    the cache as they would: a step after the pass equals a step after the single steps."""
    model = _tiny("llama", len(tokenizer))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids, mask, positions = _left_padded(prompts)
    tokens = torch.tensor([[20, 21, 22, 23], [24, 25, 26, 27], [28, 29, 30, 31], [32, 33, 34, 35]])  # 2 users × 2 beams
    start = torch.tensor([len(prompts[0])] * 2 + [len(prompts[1])] * 2)
    lean = LeanDecoder(model)
    with torch.no_grad():
        out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        stepped = lean.start(out.past_key_values, mask.bool(), 2, start, capacity=6)
        expected = torch.stack([lean.step(stepped, tokens[:, t], start + t) for t in range(4)], dim=1)
        passed = lean.start(out.past_key_values, mask.bool(), 2, start, capacity=6)
        first = lean.step(passed, tokens[:, 0], start)  # a pass may follow steps: it starts at slot 1
        rest = lean.extend(passed, tokens[:, 1:], start[:, None] + torch.arange(1, 4))
        torch.testing.assert_close(torch.cat([first[:, None], rest], dim=1), expected, rtol=1e-4, atol=1e-4)
        assert passed.length == stepped.length == 4
        # rows of different lengths: only each row's first tokens computed, the rest zero
        ragged = lean.start(out.past_key_values, mask.bool(), 2, start, capacity=6)
        lean.step(ragged, tokens[:, 0], start)
        valid = torch.tensor([[True, True, True], [True, False, False], [True, True, False], [False, False, False]])
        part = lean.extend(ragged, tokens[:, 1:], start[:, None] + torch.arange(1, 4), valid)
        torch.testing.assert_close(part[valid], expected[:, 1:][valid], rtol=1e-4, atol=1e-4)
        assert not part[~valid].any()
        after = torch.tensor([40, 41, 42, 43])
        torch.testing.assert_close(lean.step(passed, after, start + 4), lean.step(stepped, after, start + 4),
                                   rtol=1e-4, atol=1e-4)
        with pytest.raises(RuntimeError, match="capacity"):
            lean.extend(passed, tokens[:, :2], start[:, None] + 5 + torch.arange(2))
    with pytest.raises(RuntimeError, match="eager"):
        LeanDecoder(model, static=True).extend(passed, tokens[:, :1], start[:, None])


def test_reorder_narrows_rows_to_fewer_beams_per_user():
    """parent with users × new-beams entries moves the chosen earlier rows into the first rows, user-major."""
    from llmrec.fast_step import BeamCache

    keys = [torch.zeros(2, 1, 2, 4)]
    suffix = torch.arange(6 * 1 * 2 * 1 * 3 * 4, dtype=torch.float).view(6, 1, 2, 1, 3, 4)  # 2 users × 3 beams
    cache = BeamCache(keys, keys, torch.zeros(2, 1, 1, 2), suffix.clone(), beams=3, cos=torch.ones(4, 4),
                      sin=torch.zeros(4, 4), length=2)
    cache.reorder(torch.tensor([1, 0, 5, 5]), beams=2)
    assert cache.beams == 2
    assert torch.equal(cache.suffix[:4, :, :, :, :2], suffix[[1, 0, 5, 5]][:, :, :, :, :2])
    with pytest.raises(ValueError, match="users"):
        cache.reorder(torch.tensor([0, 1, 2]), beams=1)


def test_reorder_moves_rows_of_every_layer_and_only_the_filled_part():
    keys = [torch.zeros(1, 1, 2, 4)]
    from llmrec.fast_step import BeamCache

    suffix = torch.arange(3 * 2 * 2 * 1 * 3 * 4, dtype=torch.float).view(3, 2, 2, 1, 3, 4)
    cache = BeamCache(keys, keys, torch.zeros(1, 1, 1, 2), suffix.clone(), beams=3, cos=torch.ones(4, 4),
                      sin=torch.zeros(4, 4), length=2)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.suffix[:, :, :, :, :2], suffix[[2, 2, 0]][:, :, :, :, :2])
    assert torch.equal(cache.suffix[:, :, :, :, 2:], suffix[:, :, :, :, 2:])  # unfilled slots untouched


@pytest.mark.parametrize("head", ["catalog", "full", "trie"])
def test_lean_beam_search_equals_the_stock_step(recommender, prepared, head):
    """Llama (d3 template) and Qwen2 (biases, untied; compact template): several users of different prompt
    lengths in one batch, their past excluded: identical lists, scores within float tolerance."""
    hs = histories(prepared, 6)
    kwargs = dict(k=5, num_beams=8, batch_size=6, exclude=hs, head=head)
    _assert_same(recommender.recommend(hs, step="lean", **kwargs), recommender.recommend(hs, step="stock", **kwargs))


@pytest.mark.parametrize("kind", ["mistral", "llama-bias-rope-scaling"])
def test_lean_equals_stock_on_other_families_and_options(kind, tokenizer, prepared):
    model = _tiny(kind.split("-")[0], len(tokenizer))
    assert lean_supported(model) is None
    recommender = Recommender(model, tokenizer, prepared.catalog, compact_template())
    hs = histories(prepared, 4)
    kwargs = dict(k=5, num_beams=6, batch_size=4, exclude=hs)
    _assert_same(recommender.recommend(hs, step="lean", **kwargs), recommender.recommend(hs, step="stock", **kwargs))


def test_lean_equals_stock_with_the_assistant(tokenizer, prepared):
    from llmrec.assistant import AssistantConfig, SASRec

    recommender = Recommender(tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, d3_template())
    torch.manual_seed(0)
    assistant = SASRec(AssistantConfig(num_items=len(prepared.catalog), catalog_fingerprint=prepared.catalog.fingerprint()))
    recommender.attach_assistant(assistant, 2.0)
    hs = histories(prepared, 4)
    kwargs = dict(k=5, num_beams=8, batch_size=4, exclude=hs, assist=True)
    _assert_same(recommender.recommend(hs, step="lean", **kwargs), recommender.recommend(hs, step="stock", **kwargs))


def test_trie_head_narrowed_equals_every_row_and_the_stock_step(recommender, prepared):
    """The 'trie' head finishes titles with one way left at once, which leaves gaps among a user's beams: the
    narrowed search (live rows first) still gives every row's and the stock step's lists, alone and batched."""
    hs = histories(prepared, 6)
    kwargs = dict(k=5, num_beams=8, exclude=hs, head="trie")
    for batch_size in (1, 6):
        narrowed = recommender.recommend(hs, step="lean", batch_size=batch_size, **kwargs)
        _assert_same(narrowed, recommender.recommend(hs, step="lean", batch_size=batch_size, narrow=False, **kwargs))
        _assert_same(narrowed, recommender.recommend(hs, step="stock", batch_size=batch_size, **kwargs))


@pytest.mark.parametrize("head", ["catalog", "full"])
def test_narrowed_rows_and_one_pass_titles_equal_every_row_one_step_at_a_time(recommender, prepared, head, monkeypatch):
    """The default lean search (live rows of searching users only; once every live beam's title has one way
    left, its rest scored in one pass) gives the lists and scores of every row one token a step and of the
    stock step, with exclusions, batches of users and k > 1; and the narrowing and the one-pass scoring do
    happen."""
    from llmrec.fast_step import BeamCache

    hs = histories(prepared, 6)
    kwargs = dict(k=5, num_beams=8, exclude=hs, head=head)
    lean = recommender.lean_decoder("lean")
    passes: list[int] = []
    original = lean.extend
    lean.extend = lambda cache, tokens, positions, valid=None: (  # type: ignore[method-assign]
        passes.append(tokens.shape[1]) or original(cache, tokens, positions, valid))
    reorders: list[tuple[int | None, bool]] = []
    reorder = BeamCache.reorder
    monkeypatch.setattr(BeamCache, "reorder", lambda self, parent, beams=None, users=None: reorders.append(
        (beams, users is not None)) or reorder(self, parent, beams, users))
    for batch_size in (1, 6):
        narrowed = recommender.recommend(hs, step="lean", batch_size=batch_size, **kwargs)
        assert any(t > 1 for t in passes)
        assert any(beams is not None for beams, _ in reorders)  # the narrowed layout
        passes.clear()
        reorders.clear()
        _assert_same(narrowed, recommender.recommend(hs, step="lean", batch_size=batch_size, narrow=False, **kwargs))
        assert all(t == 1 for t in passes)  # not narrowed: one token a step
        _assert_same(narrowed, recommender.recommend(hs, step="stock", batch_size=batch_size, **kwargs))


def test_a_finished_user_leaves_the_narrowed_step(tokenizer, monkeypatch):
    """A user whose items are all found while the others still share a long title prefix leaves the step (its
    prompt's keys and values dropped from the cache): same lists and scores as every row one token a step and
    as the stock step."""
    from llmrec.decode import TitleTrie
    from llmrec.fast_step import BeamCache

    model = tiny_llama(len(tokenizer))
    end = 3
    short = [[10, end], [11, end]]
    long = [[20, 21, 22, 23, 24, 30 + i, end] for i in range(4)] + [[20, 21, 22, 23, 24, 40, 41 + i, end] for i in range(3)]
    trie = TitleTrie.build(short + long, end_id=end)
    prompts = [[5, 6, 7, 8], [9, 12, 13], [14, 15, 16, 17, 18]]
    excluded = [list(range(2, 9)), [0, 1], [0, 1, 3]]  # the first user may only end in the two short titles
    dropped: list[int] = []
    widths: list[int | None] = []
    reorder = BeamCache.reorder
    monkeypatch.setattr(BeamCache, "reorder", lambda self, parent, beams=None, users=None: widths.append(beams) or (
        dropped.append(int(users.numel())) if users is not None else None) or reorder(self, parent, beams, users))
    lean = LeanDecoder(model)
    narrowed = constrained_beam_search(model, prompts, trie, BeamSearchConfig(num_beams=4, top_k=2), 0, excluded=excluded,
                                       lean=lean)
    assert dropped and dropped[0] == 2  # two users left in the cache
    assert 1 in widths  # then one row each: the other two users share one title prefix
    assert [i for i, _ in narrowed[0]] and all(i in (0, 1) for i, _ in narrowed[0])
    wide = constrained_beam_search(model, prompts, trie, BeamSearchConfig(num_beams=4, top_k=2, narrow=False), 0,
                                   excluded=excluded, lean=lean)
    stock = constrained_beam_search(model, prompts, trie, BeamSearchConfig(num_beams=4, top_k=2, step="stock"), 0,
                                    excluded=excluded)
    _assert_same(narrowed, wide)
    _assert_same(narrowed, stock)


def test_the_static_shape_step_equals_the_stock_step_across_batch_shapes(tokenizer, prepared):
    """The fixed-shape variant a compiled graph runs (step index as a tensor, attention over the whole
    preallocated suffix with unfilled slots masked), eager: batches of 1, 3 and 2 users give the stock lists."""
    model = tiny_llama(len(tokenizer))
    recommender = Recommender(model, tokenizer, prepared.catalog, compact_template())
    static = LeanDecoder(model, static=True)
    assert static.static and not static.compiled
    hs = histories(prepared, 6)
    for chunk in (hs[:1], hs[1:4], hs[4:]):
        prompts = [recommender.prompt_ids(h) for h in chunk]
        config = BeamSearchConfig(num_beams=6, top_k=5)
        lean = constrained_beam_search(model, prompts, recommender.trie, config, recommender.pad_id, excluded=chunk,
                                       lean=static)
        stock = constrained_beam_search(model, prompts, recommender.trie, BeamSearchConfig(num_beams=6, top_k=5, step="stock"),
                                        recommender.pad_id, excluded=chunk)
        _assert_same(lean, stock)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the step is for a GPU: on a 2-core CPU "
                    "compiling took minutes even for a 2-layer model")
def test_the_compiled_step_equals_the_stock_step_on_cuda(tokenizer, prepared):
    model = tiny_llama(len(tokenizer)).to("cuda")
    recommender = Recommender(model, tokenizer, prepared.catalog, compact_template())
    hs = histories(prepared, 6)
    for chunk in (hs[:1], hs[1:4], hs[4:]):
        kwargs = dict(k=5, num_beams=6, batch_size=len(chunk), exclude=chunk)
        _assert_same(recommender.recommend(chunk, step="compiled", **kwargs),
                     recommender.recommend(chunk, step="stock", **kwargs))


def test_graph_workspaces_equal_the_stock_step_and_are_reused_per_shape(tokenizer, prepared, monkeypatch):
    """The 'graphs' step's per-shape workspaces (prompt right-aligned in a bucketed length, stale contents of an
    earlier search overwritten), eager on the CPU: batches of 1, 3, 2 users, the 3 again, 4 and 1 give the stock
    lists; a shape seen before reuses its workspace — the 4 users the 3 users' one, whose fourth user was a
    dummy —, and the least recently used one is dropped past the limit."""
    import llmrec.fast_step as fast_step

    monkeypatch.setattr(fast_step, "GRAPH_WORKSPACES", 2)
    model = tiny_llama(len(tokenizer))
    recommender = Recommender(model, tokenizer, prepared.catalog, compact_template())
    graphs = lean_decoder_for(model, "graphs")
    assert graphs is not None and graphs.graphs and graphs.static
    hs = histories(prepared, 10)
    seen = []
    # the 4-user batch: the 3 users and a fourth whose prompt is no longer, so only the user count differs
    four = [*hs[1:4], min(hs, key=lambda h: len(recommender.prompt_ids(h)))]
    for chunk in (hs[:1], hs[1:4], hs[4:6], hs[1:4], four, hs[9:]):
        prompts = [recommender.prompt_ids(h) for h in chunk]
        config = BeamSearchConfig(num_beams=6, top_k=5, step="graphs")
        lean = constrained_beam_search(model, prompts, recommender.trie, config, recommender.pad_id, excluded=chunk,
                                       lean=graphs)
        stock = constrained_beam_search(model, prompts, recommender.trie, BeamSearchConfig(num_beams=6, top_k=5, step="stock"),
                                        recommender.pad_id, excluded=chunk)
        _assert_same(lean, stock)
        shape = next(reversed(graphs._workspaces))  # the one this search used
        assert shape[0] == {1: 1, 2: 2, 3: 4, 4: 4}[len(chunk)] and shape[2] % fast_step.PROMPT_BUCKET == 0
        assert shape[2] >= max(len(p) for p in prompts)
        seen.append(graphs._workspaces[shape])
        assert len(graphs._workspaces) <= 2
    assert seen[3] is seen[1]  # the same 3 users again: the same buffers (still cached: 2 kept)
    assert seen[4] is seen[1]  # 4 users: the workspace the 3 used with a dummy user
    assert seen[2] is not seen[1]
    assert all(not w.on_cuda and w.graph is None for w in seen)


def test_user_buckets():
    from llmrec.fast_step import user_bucket

    assert [user_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64)] == [1, 2, 4, 4, 8, 8, 16, 16, 32, 48, 64]
    with pytest.raises(ValueError):
        user_bucket(0)


def test_the_graphs_step_through_the_recommender_equals_stock(tokenizer, prepared):
    recommender = Recommender(tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, d3_template())
    hs = histories(prepared, 5)
    kwargs = dict(k=5, num_beams=6, batch_size=2, exclude=hs)
    _assert_same(recommender.recommend(hs, step="graphs", **kwargs), recommender.recommend(hs, step="stock", **kwargs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_graph_recorded_step_equals_the_stock_step_on_cuda(tokenizer, prepared):
    model = tiny_llama(len(tokenizer)).to("cuda")
    recommender = Recommender(model, tokenizer, prepared.catalog, compact_template())
    hs = histories(prepared, 7)
    for chunk in (hs[:1], hs[1:4], hs[4:], hs[:1]):
        kwargs = dict(k=5, num_beams=6, batch_size=len(chunk), exclude=chunk)
        _assert_same(recommender.recommend(chunk, step="graphs", **kwargs),
                     recommender.recommend(chunk, step="stock", **kwargs))
    graphs = recommender.lean_decoder("graphs")
    assert graphs is not None
    assert all(w.on_cuda and w.graph is not None for w in graphs._workspaces.values())
    auto = lean_decoder_for(model, "auto")  # on CUDA the default records graphs
    assert auto is not None and auto.graphs


def test_unsupported_models_fall_back_to_the_stock_step(tokenizer, caplog):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).eval()
    assert "model type" in (lean_supported(gpt2) or "")
    with pytest.raises(ValueError, match="cannot run this model"):
        LeanDecoder(gpt2)
    with caplog.at_level("INFO"):
        assert lean_decoder_for(gpt2, "lean") is None
    assert "stock step" in caplog.text
    assert lean_decoder_for(tiny_llama(len(tokenizer)), "stock") is None
    auto = lean_decoder_for(tiny_llama(len(tokenizer)), "auto")  # on a CPU: the eager lean step, not the graphs
    assert auto is not None and not auto.graphs and not auto.static and not auto.compiled
    with pytest.raises(ValueError, match="unknown decoding step"):
        lean_decoder_for(gpt2, "fast")


def test_a_prebuilt_lean_decoder_is_used_and_the_stock_config_ignores_it(tokenizer, prepared):
    model = tiny_llama(len(tokenizer))
    recommender = Recommender(model, tokenizer, prepared.catalog, compact_template())
    prompts = [recommender.prompt_ids(h) for h in histories(prepared, 2)]
    lean = LeanDecoder(model)
    calls = []
    original = lean.step
    lean.step = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    config = BeamSearchConfig(num_beams=4, top_k=3)
    constrained_beam_search(model, prompts, recommender.trie, config, recommender.pad_id, lean=lean)
    assert calls
    calls.clear()
    stock = BeamSearchConfig(num_beams=4, top_k=3, step="stock")
    constrained_beam_search(model, prompts, recommender.trie, stock, recommender.pad_id, lean=lean)
    assert not calls


@pytest.mark.slow
def test_lean_equals_stock_on_smollm2_for_ml100k_users():
    """The real model (30 layers, 9 heads over 3 KV groups, tied head) on ml-100k test users: identical top-10
    lists, scores within float tolerance, with the catalog, the full and the trie head."""
    from llmrec.model import load_model
    from recdata.prep import prepare
    from recdata.sources import read_ml100k

    loaded = load_model()
    data = prepare(read_ml100k())
    recommender = Recommender(loaded.model, loaded.tokenizer, data.catalog, compact_template())
    hs = [data.history(int(u), int(p)).tolist() for u, p in data.splits["test"][:3]]
    for head in ("catalog", "full", "trie"):
        kwargs = dict(k=10, num_beams=20, batch_size=3, exclude=hs, head=head)
        _assert_same(recommender.recommend(hs, step="lean", **kwargs), recommender.recommend(hs, step="stock", **kwargs))
