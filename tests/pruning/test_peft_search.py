"""PrunePEFT: the budget holds, the search is reproducible, its output trains with `prunerec train`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_model_dir, tiny_llama
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from llmrec.artifact import read_manifest
from pruning.peft_search import Candidate, PeftSearchConfig, candidates_of, fuse, search

runner = CliRunner()


@pytest.fixture
def base(tmp_path, tokenizer):
    return save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer), layers=3), tokenizer)


def _config(tmp_path, base, name: str, **overrides) -> PeftSearchConfig:
    values = dict(output=str(tmp_path / name), model=str(base), max_history=5, rank=4, budget=0.3,
                  steps_per_round=2, examples=32, lr=1e-2)
    values.update(overrides)
    return PeftSearchConfig(**values)


def test_candidates_and_their_parameter_counts(tokenizer):
    model = tiny_llama(len(tokenizer), layers=3)
    found = candidates_of(model, ["q_proj", "v_proj", "down_proj"], rank=4)
    assert len(found) == 9
    by_name = {c.name: c for c in found}
    # hidden 64, kv heads 2 x head_dim 16 = 32, intermediate 128
    assert by_name["model.layers.0.self_attn.q_proj"].params == 4 * (64 + 64)
    assert by_name["model.layers.1.self_attn.v_proj"].params == 4 * (64 + 32)
    assert by_name["model.layers.2.mlp.down_proj"].params == 4 * (128 + 64)
    assert [c.band for c in found if c.name.endswith("q_proj")] == ["shallow", "middle", "deep"]


def test_fusion_is_a_borda_count_over_the_cell_criteria():
    live = [Candidate(f"m{i}", 0, "attn", "shallow", 1, torch.nn.Identity()) for i in range(3)]
    values = {"gradient": {"m0": 3.0, "m1": 1.0, "m2": 2.0}, "activation": {"m0": 1.0, "m1": 2.0, "m2": 3.0},
              "magnitude": {"m0": 0.0, "m1": 0.0, "m2": 0.0}}
    assignment = {"attn/shallow": ["gradient", "activation"]}
    fused = fuse(live, values, assignment)
    assert fused == {"m0": (1.0 + 0.0) / 2, "m1": (0.0 + 0.5) / 2, "m2": (0.5 + 1.0) / 2}


def test_search_meets_its_budget_and_is_reproducible(tmp_path, base, prepared):
    first = search(_config(tmp_path, base, "a.json"), prepared)
    assert first["trainable_params"] <= first["budget_params"] == int(0.3 * first["all_candidates_params"])
    assert 0 < len(first["target_modules"]) < first["all_candidates"] == 3 * 7
    assert len(first["rounds"]) >= 2  # iterative, not one cut
    assert json.loads((tmp_path / "a.json").read_text())["target_modules"] == first["target_modules"]
    again = search(_config(tmp_path, base, "b.json"), prepared)
    assert again["target_modules"] == first["target_modules"] and again["rounds"] == first["rounds"]
    other = search(_config(tmp_path, base, "c.json", seed=1), prepared)
    assert other["trainable_params"] <= other["budget_params"]
    exact = search(_config(tmp_path, base, "d.json", budget_params=2000), prepared)
    assert exact["trainable_params"] <= 2000 and exact["budget_params"] == 2000


def test_search_rejects_impossible_budgets(tmp_path, base, prepared):
    with pytest.raises(ValueError, match="smaller than the smallest adapter"):
        search(_config(tmp_path, base, "x.json", budget_params=10), prepared)
    with pytest.raises(ValueError, match="budget"):
        PeftSearchConfig(output="x", budget=1.5)
    with pytest.raises(ValueError, match="assignment"):
        PeftSearchConfig(output="x", assignment={"attn/shallow": ["nonsense"]})


def test_search_output_trains_with_prunerec_train(tmp_path, base, prepared):
    prepared.save(tmp_path / "data")
    result = runner.invoke(app, ["peft-search", "-o", str(tmp_path / "s.json"), "--data", str(tmp_path / "data"),
                                 "--model", str(base), "--max-history", "5", "--rank", "4", "--budget", "0.3",
                                 "--steps-per-round", "2", "--examples", "32"])
    assert result.exit_code == 0, result.output
    searched = json.loads((tmp_path / "s.json").read_text())
    result = runner.invoke(app, ["train", "-o", str(tmp_path / "art"), "--data", str(tmp_path / "data"), "--model", str(base),
                                 "--profile", "tiny", "--max-history", "5", "--method", "lora", "--lora-targets",
                                 str(tmp_path / "s.json"), "--lr", "1e-2"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "art")
    assert manifest["stage_config"]["lora_targets"] == searched["target_modules"] and manifest["stage_config"]["lora_r"] == 4
    assert manifest["training"]["trainable_params"] == searched["trainable_params"]
    # exactly the chosen modules changed (LoRA merged into them), nothing else
    before, after = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "art" / "model.safetensors"))
    changed = {k.removesuffix(".weight") for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(searched["target_modules"])
    (tmp_path / "bad.json").write_text("{}")
    result = runner.invoke(app, ["train", "-o", str(tmp_path / "art2"), "--data", str(tmp_path / "data"), "--model", str(base),
                                 "--method", "lora", "--lora-targets", str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and "target_modules" in result.output
