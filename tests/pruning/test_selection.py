"""Quality levers of fine-tuning: longer histories under the prompt-length guard, and model selection on
NDCG@10 of validation users (the reported metric) instead of the loss."""

from __future__ import annotations

import pytest
import torch
from helpers import save_model_dir, tiny_llama

from llmrec.artifact import read_manifest
from llmrec.model import load_model
from llmrec.prompting import PromptEncoder
from llmrec.recommender import Recommender
from pruning.engine import Engine, Schedule
from pruning.evaluate import RankingCheck
from pruning.examples import training_examples
from pruning.train import TrainConfig, run
from recdata.prompts import PromptTemplate


def config(tmp_path, model_dir, **overrides) -> TrainConfig:
    values = dict(output=str(tmp_path / "out"), model=str(model_dir), template="compact", batch_size=8, lr=3e-3,
                  max_steps=8, eval_every=4, valid_examples=16, warmup_steps=0, patience=0, epochs=20.0)
    values.update(overrides)
    return TrainConfig(**values)


def test_a_long_history_is_guarded_by_the_context_and_the_guard_travels_with_the_artifact(tmp_path, tokenizer, prepared):
    model = tiny_llama(len(tokenizer))
    model.config.max_position_embeddings = 96  # a small context, so that 50 titles do not fit
    model_dir = save_model_dir(tmp_path / "base", model, tokenizer)
    out = run(config(tmp_path, model_dir, max_history=50, max_steps=2, eval_every=2), prepared)
    manifest = read_manifest(out)
    encoder = PromptEncoder(tokenizer, PromptTemplate.from_dict(manifest["template"]))
    longest = max(len(encoder.response_ids(t)) for t in prepared.catalog.titles)
    assert manifest["max_history"] == 50 and manifest["max_prompt_tokens"] == 96 - longest
    guarded = PromptEncoder(tokenizer, encoder.template, 50, manifest["max_prompt_tokens"])
    windows = training_examples(prepared, guarded, packing=True)
    assert max(len(w.input_ids) for w in windows) <= 96  # every window fits the context
    recommender = Recommender.from_artifact(out, device="cpu")
    assert recommender.encoder.max_prompt_tokens == manifest["max_prompt_tokens"]
    long_history = list(range(len(prepared.catalog)))[:40]
    assert len(recommender.prompt_ids(long_history)) <= manifest["max_prompt_tokens"]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        run(config(tmp_path / "big", model_dir, max_prompt_tokens=96), prepared)


def test_selection_on_ndcg_keeps_the_weights_with_the_best_validation_ndcg(tmp_path, tokenizer, prepared):
    model_dir = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    out = run(config(tmp_path, model_dir, select_metric="ndcg@10", select_users=12, eval_every=2, max_steps=6), prepared)
    training = read_manifest(out)["training"]
    history = [h["valid_ndcg@10"] for h in training["valid_history"]]
    assert len(history) == 4 and training["best_valid_ndcg@10"] == max(history)
    # the written artifact is the best one: the same check on it gives the recorded best value
    loaded = load_model(str(out), device="cpu")
    check = RankingCheck(loaded.model, loaded.tokenizer, prepared, PromptTemplate.from_dict(read_manifest(out)["template"]),
                         10, users=12, seed=0, max_prompt_tokens=read_manifest(out)["max_prompt_tokens"])
    assert check() == pytest.approx(training["best_valid_ndcg@10"], abs=1e-6)


def test_the_engine_keeps_the_highest_value_of_a_metric_to_maximise():
    model = torch.nn.Linear(2, 1)
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), Schedule(batch_size=2, epochs=10, eval_every=1,
                                                                                  patience=2), maximize=True)
    values = iter([0.1, 0.3, 0.2, 0.25, 0.4])
    snapshots = []

    def validate() -> float:
        snapshots.append(model.weight.detach().clone())
        return next(values)

    data = [torch.randn(2) for _ in range(8)]
    reason = engine.fit(data, torch.stack, lambda x: model(x).pow(2).mean(), validate)
    assert reason == "early stopping" and engine.state.best == 0.3 and engine.state.step == 3
    engine.restore_best()
    torch.testing.assert_close(model.weight, snapshots[1])
