"""The assistant stage: training windows, a SASRec that learns, the weight sweep, the artifact it writes, its
reuse for another artifact, and evaluation / loading that follow the artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_llama

from llmrec.artifact import read_manifest, update_manifest, write_artifact
from llmrec.assistant import ASSISTANT_DIR, SASRec
from llmrec.recommender import Recommender
from pruning.assist import (
    PROFILES,
    AssistConfig,
    collate_windows,
    run,
    train_assistant,
    training_windows,
    validation_ndcg,
)
from pruning.evaluate import EvalConfig
from pruning.evaluate import run as evaluate
from recdata.prompts import compact_template


@pytest.fixture()
def artifact(tmp_path, tokenizer, prepared):
    manifest = {"template": compact_template().to_dict(), "max_history": 10, "stage": "finetune"}
    return write_artifact(tmp_path / "dense", tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, manifest)


def test_windows_cover_every_training_target_once(prepared):
    windows = training_windows(prepared, max_length=4)
    assert all(2 <= len(w) <= 5 for w in windows)
    targets = sorted(int(t) for w in windows for t in w[1:])
    expected = sorted(int(t) for s, n in zip(prepared.sequences, prepared.train_lengths, strict=True) for t in s[1:n])
    assert targets == expected  # every item after a user's first, in the training part only
    tokens, labels = collate_windows([np.array([3, 4, 5]), np.array([7, 8])])
    assert tokens.tolist() == [[4, 5], [8, 0]]  # catalog index + 1, right-padded with 0
    assert labels.tolist() == [[4, 5], [8, -100]]


def test_training_learns_the_sequential_signal(prepared):
    config = AssistConfig(artifact="unused", epochs=60, eval_every_epochs=10, patience=0, hidden_size=32, layers=1,
                          max_length=8, dropout=0.0, lr=5e-3)
    torch.manual_seed(0)
    untrained = SASRec(train_assistant(AssistConfig(artifact="unused", epochs=0.01, hidden_size=32, layers=1, max_length=8),
                                       prepared, torch.device("cpu"))[0].config)
    trained, record = train_assistant(config, prepared, torch.device("cpu"))
    valid = prepared.splits["valid"]
    assert validation_ndcg(trained, prepared, valid) > validation_ndcg(untrained, prepared, valid) + 0.1
    assert record["best_valid_ndcg@10"] == pytest.approx(validation_ndcg(trained, prepared, valid), abs=1e-6)
    assert record["windows"] == len(training_windows(prepared, 8))


def test_run_writes_the_assistant_and_its_weight_into_the_artifact(artifact, prepared, tmp_path):
    config = AssistConfig(artifact=str(artifact), **PROFILES["tiny"], device="cpu")
    run(config, prepared)
    entry = read_manifest(artifact)["assistant"]
    assert entry["weight"] in config.weights
    assert set(entry["valid_ndcg@10_by_weight"]) == {str(w) for w in config.weights}
    assert entry["valid_ndcg@10_by_weight"][str(entry["weight"])] == max(entry["valid_ndcg@10_by_weight"].values())
    assert (artifact / ASSISTANT_DIR / "model.safetensors").is_file()
    recommender = Recommender.from_artifact(artifact, device="cpu")
    assert recommender.assistant is not None and recommender.assist_weight == entry["weight"]
    assert not list(artifact.glob(".assistant*"))  # no staging left behind

    # evaluation follows the artifact (None), or is told otherwise; the protocol says which
    recommender.assist_weight = 1.0  # whatever the sweep chose, make the assisted row differ from the pure one
    auto = evaluate(EvalConfig(artifact=str(artifact), users=6, output=str(tmp_path / "auto.json")), prepared, recommender)
    pure = evaluate(EvalConfig(artifact=str(artifact), users=6, assist=False, output=str(tmp_path / "pure.json")),
                    prepared, recommender)
    assert auto["protocol"]["assisted"] and auto["protocol"]["assist_weight"] == 1.0
    assert "log P_assistant" in auto["protocol"]["ranking"]
    assert not pure["protocol"]["assisted"] and pure["protocol"]["assist_weight"] is None
    assert json.loads((tmp_path / "auto.json").read_text())["config"]["assist"] is None


def test_a_best_weight_at_the_grids_edge_is_flagged(artifact, prepared, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="pruning.assist"):
        run(AssistConfig(artifact=str(artifact), **{**PROFILES["tiny"], "weights": [0.0, 1000.0]}, device="cpu"),
            prepared)
    chosen = read_manifest(artifact)["assistant"]["weight"]
    assert ("largest candidate" in caplog.text) == (chosen == 1000.0)


def test_a_trained_assistant_is_reused_with_a_fixed_weight(artifact, prepared, tokenizer, tmp_path):
    run(AssistConfig(artifact=str(artifact), **{**PROFILES["tiny"], "weights": [0.0]}, device="cpu"), prepared)
    manifest = {"template": compact_template().to_dict(), "max_history": 10, "stage": "depth"}
    pruned = write_artifact(tmp_path / "pruned", tiny_llama(len(tokenizer), seed=3, layers=1), tokenizer,
                            prepared.catalog, manifest)
    run(AssistConfig(artifact=str(pruned), source=str(artifact), weight=0.5, device="cpu"), prepared)
    entry = read_manifest(pruned)["assistant"]
    assert entry["weight"] == 0.5 and entry["training"] == {"reused": str(artifact)} and entry["valid_ndcg@10_by_weight"] == {}
    a, b = SASRec.load(artifact / ASSISTANT_DIR), SASRec.load(pruned / ASSISTANT_DIR)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_bad_requests_are_refused(artifact, prepared):
    with pytest.raises(ValueError, match="weight must be >= 0"):
        run(AssistConfig(artifact=str(artifact), weight=-1.0), prepared)
    with pytest.raises(ValueError, match="candidate weights or a fixed weight"):
        run(AssistConfig(artifact=str(artifact), weights=[]), prepared)
    with pytest.raises(FileNotFoundError, match="no assistant"):
        run(AssistConfig(artifact=str(artifact), source=str(artifact), weight=1.0, device="cpu"), prepared)
    update_manifest(artifact, catalog={"items": len(prepared.catalog), "fingerprint": "another"})
    with pytest.raises(ValueError, match="catalog differs"):
        run(AssistConfig(artifact=str(artifact), weight=1.0), prepared)
    assert "assistant" not in read_manifest(artifact)


def test_assistant_metrics_are_the_protocols_ranks(artifact, prepared):
    from pruning.assist import assistant_metrics, assistant_ranks

    run(AssistConfig(artifact=str(artifact), **{**PROFILES["tiny"], "weights": [0.0]}, device="cpu"), prepared)
    pairs = prepared.splits["test"]
    model = SASRec.load(artifact / ASSISTANT_DIR)
    ranks = assistant_ranks(model, prepared, pairs)
    for (u, p), rank in zip(pairs, ranks, strict=True):  # brute force: items above the target, past excluded
        history = prepared.history(int(u), int(p)).tolist()
        scores = model.log_probs([history], excluded=[history])[0]
        assert rank == int((scores > scores[prepared.target(int(u), int(p))]).sum())
    metrics = assistant_metrics(artifact, prepared, pairs)
    assert metrics["hr@20"] == pytest.approx(np.mean([r < 20 for r in ranks]))
