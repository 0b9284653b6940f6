"""bench.reconstruction, the CPU smoke form: a tiny dense model pruned with and without reconstruction, the
arms differ only there, the report is written, a re-run reuses everything."""

from __future__ import annotations

import json

import pytest
from helpers import TINY_PRUNE

from bench.reconstruction import ReconstructionConfig, run_ablation
from llmrec.artifact import read_manifest


def test_reconstruction_ablation_prunes_both_arms_alike_but_for_the_refit(tmp_path, tiny_dense, prepared):
    config = ReconstructionConfig(teacher=str(tiny_dense), profile="cpu", users=None, prune_overrides=TINY_PRUNE,
                                  work=str(tmp_path / "work"), output=str(tmp_path / "out"))
    report = run_ablation(config, prepared)
    plain, refit = report["arms"]["plain"], report["arms"]["reconstruct"]
    assert [r["stage"] for r in plain["stages"]] == [r["stage"] for r in refit["stages"]] == ["1-attn", "2-mlp", "3-depth"]
    assert [r["non_embedding"] for r in plain["stages"]] == [r["non_embedding"] for r in refit["stages"]]
    assert all(not r["reconstructed"] for r in plain["stages"]) and all(r["reconstructed"] for r in refit["stages"])
    keys = [read_manifest(arm["artifact"])["stage_key"] for arm in (plain, refit)]
    assert {k: v for k, v in keys[0].items() if k != "reconstruct"} == {k: v for k, v in keys[1].items() if k != "reconstruct"}
    for arm in (plain, refit):
        assert 0.0 <= arm["ndcg@10"] <= 1.0 and arm["valid_ce"] > 0
        assert arm["retention"] == pytest.approx(arm["ndcg@10"] / report["dense"]["ndcg@10"]) if report["dense"]["ndcg@10"] else True
    assert report["protocol"]["users"] == len(prepared.splits["test"])
    assert "| reconstruct | 1-attn |" in (tmp_path / "out" / "report.md").read_text()
    again = run_ablation(config, prepared)  # resumable: the same artifacts and evaluations
    assert again["arms"] == report["arms"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["arms"] == report["arms"]
    with pytest.raises(ValueError, match="unknown pruning profile"):
        run_ablation(ReconstructionConfig(teacher=str(tiny_dense), profile="tpu"), prepared)
