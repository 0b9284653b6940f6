"""bench.decoders: the trie walker allows exactly the catalog's continuations, HF generate over it returns
catalog items with the same scores as our full-head search, and the comparison reports rates and agreement."""

from __future__ import annotations

import pytest
import torch
from helpers import histories, tiny_llama

from bench.decoders import TOP_K, TrieWalker, compare_decoders, generate_rank
from llmrec.recommender import Recommender
from recdata.prompts import compact_template


@pytest.fixture()
def recommender(tokenizer, prepared):
    return Recommender(tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, compact_template())


def test_trie_walker_allows_catalog_continuations_only(recommender, prepared):
    walker = TrieWalker(recommender.trie, prompt_length=2, pad_id=recommender.pad_id)
    title = recommender.encoder.response_ids(prepared.catalog.titles[3])
    prompt = [7, 8]
    for depth in range(len(title)):
        allowed = walker(0, torch.tensor(prompt + title[:depth]))
        assert title[depth] in allowed
        firsts = {recommender.encoder.response_ids(t)[0] for t in prepared.catalog.titles}
        if depth == 0:
            assert set(allowed) == firsts
    assert walker(0, torch.tensor(prompt + title)) == [recommender.pad_id]  # finished
    assert walker.item(title + [recommender.pad_id] * 3, recommender.trie.end_id, recommender.pad_id) == 3
    assert walker.item(title[:-1], recommender.trie.end_id, recommender.pad_id) == -1


def test_generate_returns_catalog_items_scored_like_ours(recommender, prepared):
    hs = histories(prepared, 3)
    theirs = generate_rank(recommender, hs)
    ours = recommender.recommend(hs, k=TOP_K, num_beams=20, head="full", assist=False, batch_size=3)
    for mine, ranked in zip(ours, theirs, strict=True):
        assert ranked and all(0 <= i < len(prepared.catalog) for i, _ in ranked)
        mine_scores = dict(mine)
        shared = [(i, s) for i, s in ranked if i in mine_scores]
        assert shared  # the two searches meet on items, and score them alike (sum of log-probs, no length norm)
        for item, score in shared:
            assert score == pytest.approx(mine_scores[item], abs=1e-3)


def test_compare_decoders_reports_rates_and_agreement(recommender, prepared):
    report = compare_decoders(recommender, histories(prepared, 4), batch_size=2)
    assert set(report["users_per_s"]) == {"ours_stock", "ours_lean", "ours_lean_wide", "hf_generate"}
    assert all(rate > 0 for rate in report["users_per_s"].values())
    assert report["lean_vs_stock"]["identical_lists"] == 1.0 and report["lean_vs_stock"]["max_score_difference"] < 1e-3
    assert report["lean_wide_vs_stock"]["identical_lists"] == 1.0  # the search not narrowed: same lists
    assert report["narrow_speedup"] == pytest.approx(report["users_per_s"]["ours_lean"] / report["users_per_s"]["ours_lean_wide"])
    assert 0.0 < report["generate_vs"]["ours_lean"]["top10_overlap"] <= 1.0
    assert report["lean_speedup_vs_generate"] > 0
    assert "hf_generate" not in compare_decoders(recommender, histories(prepared, 2), batch_size=2, generate=False)["users_per_s"]


def test_compare_decoders_times_extra_steps_against_the_stock_step(recommender, prepared):
    report = compare_decoders(recommender, histories(prepared, 3), batch_size=2, generate=False, extra_steps=["graphs"])
    assert set(report["users_per_s"]) == {"ours_stock", "ours_lean", "ours_lean_wide", "ours_graphs"}
    assert report["graphs_vs_stock"]["identical_lists"] == 1.0
    assert report["graphs_vs_stock"]["max_score_difference"] < 1e-3
