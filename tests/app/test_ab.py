"""Sticky weighted assignment by hashlib, Wilson intervals, the report."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.ab import Experiment, NotInListError, UnknownListError, assign, bucket_of, wilson_interval


def test_assignment_is_sticky_across_processes_and_follows_weights():
    weights = {"dense": 0.5, "pruned": 0.5}
    users = [f"user-{i}" for i in range(20_000)]
    arms = [assign(u, weights, "s1") for u in users]
    share = arms.count("pruned") / len(arms)
    assert abs(share - 0.5) < 0.02
    code = "from app.ab import assign; print(''.join(assign(f'user-{i}', {'dense': .5, 'pruned': .5}, 's1')[0] for i in range(200)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == "".join(a[0] for a in arms[:200])  # same answer in another process (no PYTHONHASHSEED effect)
    skewed = [assign(u, {"dense": 0.9, "pruned": 0.1}, "s1") for u in users]
    assert abs(skewed.count("pruned") / len(users) - 0.1) < 0.01
    assert bucket_of("x", "a") != bucket_of("x", "b") or bucket_of("y", "a") != bucket_of("y", "b")


def test_wilson_interval_and_report():
    low, high = wilson_interval(10, 100)
    assert low == pytest.approx(0.0552, abs=1e-3) and high == pytest.approx(0.1744, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 0.0)
    experiment = Experiment()
    for latency in (10.0, 20.0, 30.0):
        experiment.record_request("dense", latency, ok=True)
    experiment.record_request("pruned", 5.0, ok=True)
    experiment.record_served("r1", "dense", "v1", ["a", "b"])
    experiment.record_feedback("r1", "a", "click")
    report = experiment.report({"dense": 0.5, "pruned": 0.5})
    dense = report["arms"]["dense"]
    assert dense["requests"] == 3 and dense["ctr"] == pytest.approx(1 / 3)
    assert dense["latency_ms"]["p50"] == 20.0 and dense["observed_share"] == 0.75 and dense["intended_share"] == 0.5


def test_feedback_is_idempotent_and_ctr_stays_a_proportion():
    """The same click twice (and a click on every item) must not push clicks over lists: the report once
    failed for good with 'math domain error' after a duplicate click."""
    experiment = Experiment()
    experiment.record_request("dense", 10.0, ok=True)
    experiment.record_served("r1", "dense", "v1", ["a", "b"])
    assert experiment.record_feedback("r1", "a", "click")[1] is True
    assert experiment.record_feedback("r1", "a", "click")[1] is False
    assert experiment.record_feedback("r1", "b", "click")[1] is True
    assert experiment.record_feedback("r1", "a", "purchase")[1] is True
    dense = experiment.report({"dense": 1.0})["arms"]["dense"]
    assert dense["ctr"] == 1.0 and dense["clicked_lists"] == 1 and dense["feedback"] == {"click": 2, "purchase": 1}
    assert 0 <= dense["ctr_ci95"][0] <= dense["ctr_ci95"][1] <= 1
    with pytest.raises(UnknownListError):
        experiment.record_feedback("nope", "a", "click")
    with pytest.raises(NotInListError):
        experiment.record_feedback("r1", "zzz", "click")


def test_wilson_interval_refuses_impossible_proportions_and_served_lists_are_bounded():
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)
    experiment = Experiment(remember=3)
    for i in range(5):
        experiment.record_served(f"r{i}", "dense", "v", ["a"])
    assert list(experiment.served) == ["r2", "r3", "r4"]
