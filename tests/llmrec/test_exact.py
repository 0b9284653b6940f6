"""Exact ranking: every title's score is its teacher-forced log-probability, equal to beam search with as
many beams as items, in both head modes; exclusions hold; evaluation reports which search it used."""

from __future__ import annotations

import itertools

import pytest
from helpers import histories, teacher_forced_score, tiny_llama

from llmrec.exact import TrieLevels
from llmrec.recommender import Recommender
from recdata.prompts import compact_template


def test_every_title_gets_its_teacher_forced_log_probability(recommender, prepared):
    history = histories(prepared, 1)[0]
    n = len(prepared.catalog)
    ranked = recommender.recommend([history], k=n, head="full", search="exact")[0]
    assert sorted(i for i, _ in ranked) == list(range(n))  # the whole catalog, each item once
    for item, score in ranked:
        assert score == pytest.approx(teacher_forced_score(recommender, history, item), abs=1e-3)


@pytest.mark.parametrize("head", ["full", "catalog", "trie"])
def test_exact_equals_beam_search_with_as_many_beams_as_items(recommender, prepared, head):
    n = len(prepared.catalog)
    hs = histories(prepared, 3)
    exact = recommender.recommend(hs, k=8, head=head, search="exact", exclude=hs)
    beam = recommender.recommend(hs, k=8, num_beams=n, head=head, exclude=hs)
    for a, b, history in zip(exact, beam, hs, strict=True):
        assert [i for i, _ in a] == [i for i, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-4)
        assert not set(history) & {i for i, _ in a}  # the past is excluded


def test_trie_levels_cover_every_node_once_with_its_ancestry(recommender):
    levels = TrieLevels.of(recommender.trie)
    nodes = sorted(int(n) for level in levels.levels for n in level)
    assert nodes == list(range(1, recommender.trie.num_nodes))
    for depth, level in enumerate(levels.levels, start=1):
        for node in level.tolist():
            chain = levels.ancestors[node, :depth].tolist()
            assert chain[-1] == node and all(levels.parent[b] == a for a, b in itertools.pairwise(chain))
            assert levels.parent[chain[0]] == 0


def test_evaluation_with_exact_search_records_it(tmp_path, tokenizer, prepared):
    from pruning.evaluate import EvalConfig, run

    rec = Recommender(tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, compact_template())
    result = run(EvalConfig(artifact=str(tmp_path / "none"), users=4, search="exact", output=str(tmp_path / "e.json")),
                 prepared, recommender=rec)
    assert result["protocol"]["search"] == "exact" and "exactly" in result["protocol"]["ranking"]
    assert 0 <= result["metrics"]["ndcg@10"] <= 1
