"""TRSP / ELDeR depth pruning: gate exactness, bypass = deletion, the identity penalty falls, pipeline."""

from __future__ import annotations

import pytest
import torch
from helpers import save_model_dir, tiny_llama, tiny_qwen2
from transformers import AutoModelForCausalLM

from llmrec.artifact import read_manifest, write_artifact
from llmrec.model import load_model
from llmrec.prompting import PromptEncoder
from pruning import distill
from pruning.calibration import CalibrationConfig, batches
from pruning.examples import split_examples, training_examples
from pruning.plan import KeepRatios
from pruning.prune import PruneConfig, run
from pruning.surgery import drop_layers, shape_of
from pruning.train import TrainConfig
from pruning.train import run as train
from pruning.trsp import LayerGates, TRSPConfig, bypass_gap, regularise, select_layers, trsp_depth
from recdata.prompts import compact_template


@pytest.fixture(params=["llama", "qwen2"])
def model(request, tokenizer):
    build = tiny_llama if request.param == "llama" else tiny_qwen2
    return build(len(tokenizer), layers=4)


@pytest.fixture
def examples(tokenizer, prepared):
    encoder = PromptEncoder(tokenizer, compact_template(), 5)
    train = training_examples(prepared, encoder, True, None, 32, 0)
    valid = split_examples(prepared, encoder, "valid", limit=16, seed=0)
    return train, valid


def _ids(tokenizer):
    batch = tokenizer(["Toy Story (1995) Heat", "Casino (1995)"], return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def test_gates_at_one_reproduce_the_logits_exactly(model, tokenizer):
    ids, mask = _ids(tokenizer)
    reference = model(input_ids=ids, attention_mask=mask).logits
    gates = LayerGates(len(model.model.layers))
    with gates.attached(model):
        gated = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(gated, reference)
    after = model(input_ids=ids, attention_mask=mask).logits  # hooks are gone afterwards
    assert torch.equal(after, reference)


@torch.no_grad()
def test_a_zero_gate_equals_deleting_the_layer_also_after_reload(model, tokenizer, prepared, tmp_path):
    ids, mask = _ids(tokenizer)
    gates = LayerGates(len(model.model.layers))
    gates.scale[1] = 0.0
    with gates.attached(model):
        gated = model(input_ids=ids, attention_mask=mask).logits
    smaller = drop_layers(model, [1])
    assert torch.allclose(smaller(input_ids=ids, attention_mask=mask).logits, gated, atol=1e-5)
    write_artifact(tmp_path / "a", smaller, tokenizer, prepared.catalog,
                   {"stage": "depth", "template": compact_template().to_dict(), "max_history": 5})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert reloaded.config.num_hidden_layers == 3
    assert torch.allclose(reloaded(input_ids=ids, attention_mask=mask).logits, gated, atol=1e-5)
    # a half-open gate is the delta form h + s (f(h) - h): strictly between the two
    gates.scale[1] = 0.5
    with gates.attached(model):
        half = model(input_ids=ids, attention_mask=mask).logits
    full = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(half, full) and not torch.allclose(half, gated)


def test_selection_picks_the_requested_count_and_leaves_the_weights(model, tokenizer, examples):
    train, _ = examples
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TRSPConfig(steps_per_round=3, lambda1=0.1, gate_lr=0.1)
    chosen, history = select_layers(model, batches(train, int(tokenizer.pad_token_id), 8), 2, config)
    assert len(chosen) == 2 and len(set(chosen)) == 2 and all(0 <= i < 4 for i in chosen)
    assert len(history) == 2
    # the first pick had the smallest |s| among all gates in round one
    assert abs(history[0][chosen[0]]) == min(abs(v) for v in history[0])
    # gates moved (the L1 term pulls them below 1)
    assert any(abs(v - 1.0) > 1e-4 for v in history[0])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_identity_penalty_falls_and_makes_bypassing_cheap(tokenizer, examples):
    train, valid = examples
    pad = int(tokenizer.pad_token_id)
    train_batches, held_out = batches(train, pad, 8), batches(valid, pad, 8)
    gaps = {}
    for lambda2 in (0.0, 5.0):  # the same training without the penalty is the control
        model = tiny_llama(len(tokenizer), layers=4)
        config = TRSPConfig(lambda2=lambda2, stage_two_steps=30, check_every=10, tolerance=0.0, lr=3e-3)
        record = regularise(model, train_batches, held_out, [1, 2], config)
        penalties = record["identity_penalty"]
        assert record["steps"] == 30 and len(penalties) == 30
        full, bypassed = bypass_gap(model, held_out, [1, 2])
        assert record["held_out"][-1] == {"step": 30, "full": full, "bypassed": bypassed, "identity_penalty": penalties[-1]}
        gaps[lambda2] = (bypassed - full) / full
        if lambda2 > 0:
            assert sum(penalties[-5:]) / 5 < 0.5 * sum(penalties[:5]) / 5
    assert gaps[5.0] < gaps[0.0]


def test_trsp_depth_removes_layers_and_records_the_choice(tokenizer, examples):
    train, valid = examples
    model = tiny_qwen2(len(tokenizer), layers=4)
    config = TRSPConfig(steps_per_round=2, stage_two_steps=4, check_every=2)
    smaller, record = trsp_depth(model, train, valid, int(tokenizer.pad_token_id), 2, config)
    assert shape_of(smaller).layers == 2
    assert sorted(record["chosen_layers"]) == record["removed_layers"]
    assert record["method"] == "trsp" and record["stage_two"]["steps"] <= 4


def tiny_prune_config(output, teacher, **overrides) -> PruneConfig:
    return PruneConfig(
        output=str(output), teacher=str(teacher), ratios=KeepRatios(layers=0.5),
        calibration=CalibrationConfig(samples=16, batch_size=8, top_k=16),
        distill=distill.DistillConfig(examples=32, max_steps=2, eval_every=2, valid_examples=8, batch_size=8),
        evaluate=False, **overrides,
    )


def test_pipeline_with_trsp_and_elder_depth(tmp_path, tokenizer, prepared):
    base = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer), layers=4), tokenizer)
    dense = train(TrainConfig(output=str(tmp_path / "dense"), model=str(base), max_steps=4, eval_every=4,
                              valid_examples=8, warmup_steps=0, patience=0), prepared)
    trsp = TRSPConfig(steps_per_round=2, stage_two_steps=4, check_every=2)
    paths = run(tiny_prune_config(tmp_path / "run", dense, stages=["depth"], depth_method="trsp", trsp=trsp), prepared)
    assert paths[-1].name == "1-depth-trsp"
    manifest = read_manifest(paths[-1])
    assert manifest["pruning"]["method"] == "trsp" and len(manifest["pruning"]["removed_layers"]) == 2
    assert load_model(str(paths[-1]), device="cpu").model.config.num_hidden_layers == 2
    elder = run(tiny_prune_config(tmp_path / "run", dense, stages=["depth"], depth_method="elder",
                                  trsp=TRSPConfig(steps_per_round=2, stage_two_steps=2, recovery=False)), prepared)
    manifest = read_manifest(elder[-1])
    assert elder[-1].name == "1-depth-elder" and manifest["pruning"]["method"] == "elder"
    assert "skipped" in manifest["distillation"]
