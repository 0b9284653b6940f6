"""Constrained beam search: real catalog items only, k distinct sorted, batch == single, exact scores."""

from __future__ import annotations

import pytest
import torch
from helpers import histories, teacher_forced_score, teacher_forced_trie_score

from llmrec.decode import TitleTrie, grouped_topk, log_softmax_by_group


def test_returns_k_distinct_catalog_items_sorted(recommender, prepared):
    for ranked in recommender.recommend(histories(prepared), k=5, num_beams=8, batch_size=3):
        items = [i for i, _ in ranked]
        scores = [s for _, s in ranked]
        assert len(items) == 5 and len(set(items)) == 5
        assert all(0 <= i < len(prepared.catalog) for i in items)
        assert scores == sorted(scores, reverse=True)


def test_batch_equals_one_by_one(recommender, prepared):
    hs = histories(prepared)
    batched = recommender.recommend(hs, k=5, num_beams=8, batch_size=len(hs))
    single = [recommender.recommend([h], k=5, num_beams=8)[0] for h in hs]
    for a, b in zip(batched, single, strict=True):
        assert [i for i, _ in a] == [i for i, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-4)


def test_scores_are_exact_log_probabilities_and_search_is_exact_with_enough_beams(recommender, prepared):
    history = histories(prepared, 1)[0]
    n = len(prepared.catalog)
    ranked = recommender.recommend([history], k=5, num_beams=n, head="full")[0]
    brute = sorted(((teacher_forced_score(recommender, history, i), i) for i in range(n)), reverse=True)
    assert [i for i, _ in ranked] == [i for _, i in brute[:5]]
    for (_item, score), (expected, _) in zip(ranked, brute[:5], strict=True):
        assert score == pytest.approx(expected, abs=1e-3)


def test_exclusion_and_k_bounds(recommender, prepared):
    hs = histories(prepared, 3)
    for history, ranked in zip(hs, recommender.recommend(hs, k=5, num_beams=10, exclude=hs), strict=True):
        assert not set(history) & {i for i, _ in ranked}
    with pytest.raises(ValueError, match="k must be between"):
        recommender.recommend(hs, k=0)
    with pytest.raises(ValueError, match="k must be between"):
        recommender.recommend(hs, k=len(prepared.catalog) + 1)


def test_trie_rejects_bad_sequences_and_expands_by_tensor_ops():
    trie = TitleTrie.build([[5, 6, 1], [5, 7, 1], [8, 1]], end_id=1)
    beam, token, child = trie.expand(torch.tensor([0, 0]), torch.tensor([True, False]))
    assert beam.tolist() == [0, 0] and token.tolist() == [5, 8]
    node_5 = int(child[0])
    beam, token, child = trie.expand(torch.tensor([node_5]), torch.tensor([True]))
    assert token.tolist() == [6, 7]
    ends = trie.node_item[trie.expand(child[:1], torch.tensor([True]))[2]]
    assert ends.tolist() == [0]
    with pytest.raises(ValueError, match="end with the end token"):
        TitleTrie.build([[5, 6]], end_id=1)
    with pytest.raises(ValueError, match="identical token sequences"):
        TitleTrie.build([[5, 1], [5, 1]], end_id=1)


def test_trie_knows_the_titles_with_one_way_left():
    """node_single_item names the one item below a node whose subtree holds one; item_tokens/item_length are
    the response ids (what the search's one-pass scoring of the rest of a title reads)."""
    trie = TitleTrie.build([[5, 6, 9, 1], [5, 7, 1], [8, 1]], end_id=1)
    node_5 = int(trie.item_paths[0, 0])
    assert int(trie.node_single_item[0]) == -1 and int(trie.node_single_item[node_5]) == -1  # shared prefixes
    assert [int(trie.node_single_item[n]) for n in trie.item_paths[0, 1:]] == [0, 0, 0]  # 5-6-... is item 0's alone
    assert [int(trie.node_single_item[n]) for n in trie.item_paths[2, :2]] == [2, 2]
    assert trie.item_tokens.tolist() == [[5, 6, 9, 1], [5, 7, 1, 1], [8, 1, 1, 1]]
    assert trie.item_length.tolist() == [4, 3, 2]
    moved = trie.to(torch.device("cpu"))
    assert torch.equal(moved.node_single_item, trie.node_single_item) and torch.equal(moved.item_tokens, trie.item_tokens)


def test_grouped_topk():
    group = torch.tensor([0, 0, 0, 2])
    scores = torch.tensor([1.0, 3.0, 2.0, 5.0])
    top, index = grouped_topk(group, scores, num_groups=3, k=2)
    assert top[0].tolist() == [3.0, 2.0] and index[0].tolist() == [1, 2]
    assert torch.isinf(top[1]).all() and top[2, 0] == 5.0 and index[2, 0] == 3


def test_catalog_head_modes(recommender, prepared):
    hs = histories(prepared, 4)
    full = recommender.recommend(hs, k=5, num_beams=8, head="full")
    assert recommender.recommend(hs, k=5, num_beams=8) == recommender.recommend(hs, k=5, num_beams=8, head="catalog")  # the default
    fullnorm = recommender.recommend(hs, k=5, num_beams=8, head="catalog-fullnorm")
    for a, b in zip(full, fullnorm, strict=True):
        assert [i for i, _ in a] == [i for i, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-4)
    catalog = recommender.recommend(hs, k=5, num_beams=8, head="catalog")
    for a, c in zip(full, catalog, strict=True):
        assert len({i for i, _ in c}) == 5 and all(0 <= i < len(prepared.catalog) for i, _ in c)
        # renormalising over fewer tokens can only raise each token's probability
        assert c[0][1] >= a[0][1] - 1e-4
    assert recommender.trie.vocabulary.numel() < len(recommender.tokenizer)
    with pytest.raises(ValueError, match="unknown head mode"):
        recommender.recommend(hs, k=5, head="tiny")


def test_a_full_head_on_a_catalog_distilled_model_is_warned_about(recommender, caplog):
    """An artifact whose last distillation trained only the catalog tokens' logits (--distill-vocab catalog)
    serves the catalog head quietly; a head that normalises over the whole vocabulary says it is untrained."""
    recommender.manifest = {"distillation": {"loss_vocabulary": 42}}
    with caplog.at_level("WARNING", logger="llmrec.recommender"):
        recommender.scorer("catalog")
        assert not caplog.records
        recommender.scorer("full")
        recommender.scorer("full")  # once per head
    assert len(caplog.records) == 1 and "42 catalog tokens" in caplog.records[0].getMessage()
    caplog.clear()
    recommender.manifest = {"distillation": {"loss_vocabulary": "full"}}
    with caplog.at_level("WARNING", logger="llmrec.recommender"):
        recommender.scorer("catalog-fullnorm")
    assert not caplog.records


def test_excluding_most_of_the_catalog_still_returns_k_items(recommender, prepared):
    n = len(prepared.catalog)
    keep = [3, 7, 11, 15, 19]
    excluded = [i for i in range(n) if i not in keep]
    ranked = recommender.recommend([[0, 1]], k=5, num_beams=5, exclude=[excluded])[0]
    assert sorted(i for i, _ in ranked) == keep
    full = recommender.recommend([[0, 1]], k=5, num_beams=n)[0]
    assert len(full) == 5


def test_log_softmax_by_group_normalises_within_each_group():
    values = torch.tensor([1.0, 2.0, 3.0, -4.0, 0.5, 7.0])
    group = torch.tensor([0, 0, 0, 2, 3, 3])
    out = log_softmax_by_group(values, group, num_groups=4)
    assert out[:3].tolist() == pytest.approx(torch.log_softmax(values[:3], 0).tolist(), abs=1e-6)
    assert out[3] == 0.0  # a group of one: its only member has probability 1
    assert out[4:].tolist() == pytest.approx(torch.log_softmax(values[4:], 0).tolist(), abs=1e-6)
    assert log_softmax_by_group(torch.empty(0), torch.empty(0, dtype=torch.long), 3).numel() == 0


def test_trie_head_scores_are_item_log_probabilities_over_the_catalog(recommender, prepared):
    """With as many beams as items the 'trie' head returns every item with log P(item), each token normalised
    over the continuations of its title prefix: the hand-computed score, and the catalog's items sum to 1."""
    history = histories(prepared, 1)[0]
    n = len(prepared.catalog)
    ranked = recommender.recommend([history], k=n, num_beams=n, head="trie")[0]
    assert sorted(i for i, _ in ranked) == list(range(n))
    assert sum(torch.tensor([s for _, s in ranked]).exp().tolist()) == pytest.approx(1.0, abs=1e-4)
    for item, score in ranked[:5] + ranked[-3:]:
        assert score == pytest.approx(teacher_forced_trie_score(recommender, history, item), abs=1e-3)


def test_trie_head_finishes_titles_with_one_way_left_without_the_model(recommender, prepared):
    """A beam whose title has one way left is finished at once: no one-pass scoring of the rest of a title, and
    fewer model rows than the catalog head's search computes, for lists of real, distinct, sorted items."""
    hs = histories(prepared, 4)
    lean = recommender.lean_decoder("lean")
    extended: list[int] = []
    rows = {"trie": 0, "catalog": 0}
    original_extend, original_step = lean.extend, lean.step
    lean.extend = lambda cache, tokens, positions, valid=None: (  # type: ignore[method-assign]
        extended.append(tokens.shape[1]) or original_extend(cache, tokens, positions, valid))
    for head in rows:
        lean.step = lambda cache, tokens, positions, head=head: (  # type: ignore[method-assign]
            rows.__setitem__(head, rows[head] + tokens.shape[0]) or original_step(cache, tokens, positions))
        ranked = recommender.recommend(hs, k=5, num_beams=8, exclude=hs, head=head, step="lean")
        for history, items in zip(hs, ranked, strict=True):
            assert len({i for i, _ in items}) == 5 and not set(history) & {i for i, _ in items}
            assert [s for _, s in items] == sorted((s for _, s in items), reverse=True)
        if head == "trie":  # (a step is a one-token extend)
            assert extended and all(t == 1 for t in extended)
        else:
            assert any(t > 1 for t in extended)  # the catalog head scores the rest of such titles in one pass
    assert rows["trie"] < rows["catalog"]


def test_the_trie_heads_selected_logits_equal_the_catalog_rows_logits(recommender):
    """Few candidates: one dot product each; many: the rows' catalog logits gathered. The same numbers."""
    from llmrec.decode import NextTokenScorer

    scorer = NextTokenScorer(recommender.model, recommender.trie, "trie")
    torch.manual_seed(0)
    hidden = torch.randn(6, recommender.model.config.hidden_size)
    every = scorer(hidden)  # (6, U) the catalog tokens' logits
    assert every.shape == (6, recommender.trie.vocabulary.numel())
    for count in (3, 6 * every.shape[1]):  # the dot-product path, then the gathered one
        rows = torch.randint(0, 6, (count,))
        columns = torch.randint(0, every.shape[1], (count,))
        assert torch.allclose(scorer.selected_logits(hidden, rows, columns), every[rows, columns], atol=1e-5)
