"""The SASRec baseline: RecBole reproduces our split, and the trained model beats MostPop on drifting data."""

from __future__ import annotations

import pytest

from bench.sasrec import SASRecConfig, run
from recdata.metrics import mostpop_ranks, rank_metrics

pytest.importorskip("recbole")


def test_sasrec_on_the_identical_split_beats_mostpop(tmp_path, prepared, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(SASRecConfig(output=str(tmp_path / "work"), epochs=3, batch_size=32), prepared)  # checks the split itself
    assert not (tmp_path / "log_tensorboard").exists() and any((tmp_path / "work" / "tensorboard").iterdir())
    assert len(result["ranks"]) == len(prepared.splits["test"]) and result["epochs_run"] == 3
    pairs = prepared.splits["test"]
    targets = [prepared.target(int(u), int(p)) for u, p in pairs]
    histories = [prepared.history(int(u), int(p)).tolist() for u, p in pairs]
    pop, _ = mostpop_ranks(prepared.train_popularity(), targets, histories, top=20)
    assert result["metrics"]["ndcg@10"] > rank_metrics(pop)["ndcg@10"]


def test_sasrec_refuses_a_temporal_split(tmp_path, prepared):
    import copy

    temporal = copy.deepcopy(prepared)
    temporal.config.split = "temporal"
    with pytest.raises(ValueError, match="leave-one-out"):
        run(SASRecConfig(output=str(tmp_path), epochs=1), temporal)


def test_importing_recbole_leaves_anomaly_detection_off():
    """recbole's sine.py turns autograd anomaly detection on for the whole process at import; ours must not."""
    import subprocess
    import sys

    check = "import torch; {}; print(torch.is_anomaly_enabled())"
    raw = subprocess.run([sys.executable, "-c", check.format("import recbole.model.sequential_recommender")],
                         capture_output=True, text=True, check=True)
    ours = subprocess.run([sys.executable, "-c", check.format("from bench.sasrec import recbole_modules; recbole_modules()")],
                          capture_output=True, text=True, check=True)
    assert raw.stdout.strip().endswith("True")  # the hazard this guards against
    assert ours.stdout.strip().endswith("False")


def test_our_scoring_reproduces_recboles_evaluator_when_nothing_is_masked(tmp_path, prepared, monkeypatch):
    """RecBole masks no history for sequential models; scored the same way, our ranks give its NDCG/HR exactly
    (to its 4 decimals), and masking the past can only lift a target that is not in it."""
    monkeypatch.chdir(tmp_path)
    config = SASRecConfig(output=str(tmp_path / "work"), epochs=1, batch_size=32, exclude_history=False)
    unmasked = run(config, prepared)
    assert unmasked["metrics"]["hr@10"] > 0  # a comparison of two zeros would show nothing
    assert unmasked["metrics"]["ndcg@10"] == pytest.approx(unmasked["test_recbole"]["ndcg@10"], abs=1e-4)
    assert unmasked["metrics"]["hr@10"] == pytest.approx(unmasked["test_recbole"]["hit@10"], abs=1e-4)
    config.exclude_history, config.output = True, str(tmp_path / "masked")
    masked = run(config, prepared)
    assert masked["test_recbole"] == unmasked["test_recbole"]  # same seed, same model
    pairs = [(m, u) for m, u in zip(masked["ranks"], unmasked["ranks"], strict=True) if u is not None]
    assert all(m is not None and m <= u for m, u in pairs)
    assert masked["metrics"]["ndcg@10"] >= unmasked["metrics"]["ndcg@10"]
