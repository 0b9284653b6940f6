"""bench.paired: two evaluations of the same users compared user by user."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_llama

from bench.paired import compare
from llmrec.recommender import Recommender
from pruning.evaluate import EvalConfig, run
from recdata.prompts import compact_template


def test_two_heads_on_the_same_users_compare_user_by_user(tmp_path, tokenizer, prepared):
    rec = Recommender(tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, compact_template())
    paths = {}
    for head in ("catalog", "trie"):
        paths[head] = tmp_path / f"{head}.json"
        run(EvalConfig(artifact=str(tmp_path / "none"), users=12, head=head, output=str(paths[head])), prepared, recommender=rec)
    same = compare(paths["catalog"], paths["catalog"])
    assert same["identical_top10_lists"] == 12 and same["mean_top10_overlap"] == 1.0
    assert same["ndcg@10"]["mean_difference"] == 0 and same["protocol_differences"] == {}
    other = compare(paths["catalog"], paths["trie"])
    assert other["protocol_differences"] == {"head": ["catalog", "trie"]}
    assert other["ndcg@10"]["users"] == 12 and 0 <= other["mean_top10_overlap"] <= 1
    metrics = {head: json.loads(path.read_text())["metrics"]["ndcg@10"] for head, path in paths.items()}
    assert other["ndcg@10"]["mean_a"] == pytest.approx(metrics["catalog"]) and other["ndcg@10"]["mean_b"] == pytest.approx(metrics["trie"])


def test_evaluations_of_other_users_are_refused(tmp_path, tokenizer, prepared):
    rec = Recommender(tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, compact_template())
    for users in (6, 8):
        run(EvalConfig(artifact=str(tmp_path / "none"), users=users, output=str(tmp_path / f"{users}.json")), prepared, recommender=rec)
    with pytest.raises(ValueError, match="different users"):
        compare(tmp_path / "6.json", tmp_path / "8.json")
    with pytest.raises(FileNotFoundError, match="ranks"):
        compare(tmp_path / "6.json", tmp_path / "missing.json")


def test_a_reference_pairs_each_sides_overlap_with_its_lists(tmp_path, tokenizer, prepared):
    """--reference: per user, the share of the reference's top-10 items each side's list holds, paired B − A."""
    paths = {}
    for seed in (0, 1):
        rec = Recommender(tiny_llama(len(tokenizer), seed=seed), tokenizer, prepared.catalog, compact_template())
        paths[seed] = tmp_path / f"{seed}.json"
        run(EvalConfig(artifact=str(tmp_path / "none"), users=12, output=str(paths[seed])), prepared, recommender=rec)
    result = compare(paths[1], paths[0], reference=paths[0])
    agreement = result["top10_overlap_with_reference"]
    assert agreement["mean_b"] == 1.0  # the reference's own lists
    assert agreement["mean_a"] == pytest.approx(result["mean_top10_overlap"]) and agreement["mean_a"] < 1.0
    assert agreement["mean_difference"] == pytest.approx(1.0 - agreement["mean_a"])
    import pandas as pd

    lengths = [len(str(x).split()[:10]) for x in pd.read_csv(paths[0].with_suffix(".ranks.csv"))["top_item_ids"]]
    # the reference's own lists hold every item they have (a short list: fewer than ten left after the history)
    assert result["kept_by_reference_rank"]["b"] == [sum(n > r for n in lengths) / 12 for r in range(10)]
    assert all(0 <= a <= b for a, b in zip(result["kept_by_reference_rank"]["a"], result["kept_by_reference_rank"]["b"], strict=True))
    reference_hits = result["hits_b"]
    assert sum(result["reference_hits_by_rank"]) == reference_hits
    assert result["hits_shared_with_reference"]["b"] == reference_hits
    assert result["hits_shared_with_reference"]["a"] <= min(result["hits_a"], reference_hits)
    assert "top10_overlap_with_reference" not in compare(paths[0], paths[1])
