"""The benchmark's parts: per-user NDCG, the paired test, the report files, and `prunerec compare` end to end
(two tiny artifacts, evaluation on the same users and latency through the real HTTP service)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_llama
from typer.testing import CliRunner

from bench.report import paired_test, per_user_ndcg, ratios, write_report
from cli.main import app
from llmrec.artifact import write_artifact
from recdata.prompts import compact_template


def test_per_user_ndcg_and_paired_test():
    assert per_user_ndcg([0, 1, 9, 10, -1, None]).tolist() == pytest.approx([1.0, 1 / np.log2(3), 1 / np.log2(11), 0, 0, 0])
    a = np.array([0.0, 0.5, 0.0, 1.0] * 25)
    same = paired_test(a, a.copy())
    assert same["mean_difference"] == 0 and same["wilcoxon_p"] == 1.0
    better = paired_test(a, np.clip(a + 0.3, 0, 1))
    assert better["mean_difference"] > 0 and better["wilcoxon_p"] < 0.01 and better["ci95"][0] > 0
    assert better["users_better_b"] > better["users_better_a"]
    with pytest.raises(ValueError):
        paired_test(a, a[:10])


def _entry(non_embedding, ndcg, p50=None, rps=None):
    entry = {"artifact": "x", "params": {"total": non_embedding + 10, "embedding": 10, "non_embedding": non_embedding},
             "metrics": {"ndcg@10": ndcg, "hr@10": 2 * ndcg}}
    if p50:
        entry["serving"] = {"c1": {"latency_ms": {"p50": p50, "p99": 2 * p50}, "throughput_rps": 1000 / p50},
                            "c16": {"latency_ms": {"p50": p50, "p99": 2 * p50}, "throughput_rps": rps}}
    return entry


def test_report_has_the_promised_shape_and_files(tmp_path):
    report = {"protocol": {"profile": "test"}, "models": {
        "dense": _entry(1000, 0.05, 400.0, 1.0), "pruned": _entry(40, 0.04, 40.0, 12.0),
        "sasrec": _entry(100, 0.06), "mostpop": {"artifact": None, "params": {"total": 0, "embedding": 0, "non_embedding": 0},
                                                 "metrics": {"ndcg@10": 0.03, "hr@10": 0.06}}}}
    written = write_report(report, tmp_path)
    assert [p.name for p in written] == ["report.json", "report.md", "ndcg_vs_params.png", "latency_vs_params.png"]
    assert all(p.stat().st_size > 0 for p in written)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert {"dense", "pruned", "sasrec", "mostpop"} <= set(saved["models"])
    assert saved["models"]["pruned"]["latency_ms"] == {"p50": 40.0, "p99": 80.0}
    assert saved["models"]["pruned"]["throughput_rps"] == 12.0
    assert saved["ratios"] == pytest.approx({"retention_ndcg@10": 0.8, "non_embedding_pruned_fraction": 0.96,
                                             "speedup_p50": 10.0, "throughput_gain": 12.0,
                                             "dense_ndcg@10_vs_sasrec": 0.05 / 0.06})
    text = (tmp_path / "report.md").read_text()
    assert "| pruned |" in text and "retention_ndcg@10: 0.800" in text
    assert "## Serving at every concurrency level" in text and "| pruned | 16 | 40.0 | 80.0 | 12.0 |" in text
    assert ratios({"dense": report["models"]["dense"]}) == {}


def test_compare_command_end_to_end(tmp_path, tokenizer, prepared):
    prepared.save(tmp_path / "data")
    manifest = {"template": compact_template().to_dict(), "max_history": 10}
    a = write_artifact(tmp_path / "a", tiny_llama(len(tokenizer), seed=0), tokenizer, prepared.catalog, manifest)
    b = write_artifact(tmp_path / "b", tiny_llama(len(tokenizer), seed=1), tokenizer, prepared.catalog, manifest)
    result = CliRunner().invoke(app, ["compare", str(a), str(b), "-o", str(tmp_path / "cmp"), "--data", str(tmp_path / "data"),
                                      "--users", "0", "--latency-requests", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert report["paired_test"]["users"] == len(prepared.splits["test"])
    for name in ("A", "B"):
        served = report["models"][name]["serving"]
        assert served["c1"]["requests"] == 3 and served["c16"]["throughput_rps"] > 0
        assert served["peak_rss_bytes"] is None or served["peak_rss_bytes"] > 10_000_000
    assert set(report["ratios"]) == {"retention_ndcg@10", "non_embedding_pruned_fraction", "speedup_p50", "throughput_gain"}
    assert (tmp_path / "cmp" / "latency_vs_params.png").is_file()
    assert "Paired test on per-user NDCG@10" in result.output


def test_cached_evaluation_is_redone_for_a_rebuilt_artifact(tmp_path, tokenizer, prepared):
    """The benchmark caches evaluations by artifact path; an artifact rebuilt at that path (a stage recomputed
    because its configuration changed) must be evaluated again, not reported from the old build's file."""
    from bench.run import evaluate_cached

    manifest = {"template": compact_template().to_dict(), "max_history": 10}
    artifact = write_artifact(tmp_path / "a", tiny_llama(len(tokenizer), seed=0), tokenizer, prepared.catalog, manifest)
    output = tmp_path / "eval" / "a.json"
    first = evaluate_cached(artifact, prepared, 5, 0, "catalog", output, None)
    output.write_text(json.dumps({**first, "marker": "cached"}))  # tells a reuse from a recomputation
    assert evaluate_cached(artifact, prepared, 5, 0, "catalog", output, None)["marker"] == "cached"
    write_artifact(tmp_path / "a", tiny_llama(len(tokenizer), seed=1), tokenizer, prepared.catalog, manifest)
    again = evaluate_cached(artifact, prepared, 5, 0, "catalog", output, None)
    assert "marker" not in again and again["artifact_identity"] != first["artifact_identity"]
    assert json.loads(output.read_text())["artifact_identity"] == again["artifact_identity"]
    # another protocol on the same build is evaluated again too
    assert evaluate_cached(artifact, prepared, 6, 0, "catalog", output, None)["config"]["users"] == 6


def test_an_artifacts_own_evaluation_of_the_same_protocol_is_reused(tmp_path, tokenizer, prepared):
    """A stage evaluated by `prunerec prune` (into <artifact>/eval/test.json) is not decoded again by `prunerec
    compare` or the benchmark when the protocol is the same; another protocol, or an assisted comparison, is."""
    from bench.run import evaluate_cached
    from pruning.evaluate import EvalConfig
    from pruning.evaluate import run as evaluate

    manifest = {"template": compact_template().to_dict(), "max_history": 10}
    artifact = write_artifact(tmp_path / "a", tiny_llama(len(tokenizer), seed=0), tokenizer, prepared.catalog, manifest)
    evaluate(EvalConfig(artifact=str(artifact), users=0, head="catalog"), prepared)
    own = artifact / "eval" / "test.json"
    own.write_text(json.dumps({**json.loads(own.read_text()), "marker": "own"}))  # tells a reuse from a recomputation
    reused = evaluate_cached(artifact, prepared, None, 0, "catalog", tmp_path / "cmp" / "A.json", None)
    assert reused["marker"] == "own" and reused["artifact_identity"]
    assert (tmp_path / "cmp" / "A.ranks.csv").read_text() == own.with_suffix(".ranks.csv").read_text()
    assert "marker" not in evaluate_cached(artifact, prepared, None, 0, "full", tmp_path / "cmp" / "B.json", None)
    assert "marker" not in evaluate_cached(artifact, prepared, 5, 0, "catalog", tmp_path / "cmp" / "C.json", None)
    assert "marker" not in evaluate_cached(artifact, prepared, None, 0, "catalog", tmp_path / "cmp" / "D.json", None,
                                           assist=None)


def test_bench_runs_every_part_on_a_tiny_model(tmp_path, tokenizer, prepared):
    from helpers import save_model_dir

    from bench.run import bench_config, run_bench

    base = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer), layers=3), tokenizer)
    config = bench_config("cpu", model=str(base), output=str(tmp_path / "report"), work=str(tmp_path / "work"),
                          users=None, sasrec_epochs=1, latency_requests=2, concurrency=[1], peft=True, load_seconds=4.0)
    written = run_bench(config, prepared)
    report = json.loads(written[0].read_text())
    assert {"dense", "1-attn", "2-mlp", "pruned", "pruned+vocab", "trsp", "sasrec", "mostpop", "lora", "lora-prunepeft",
            "dense+assist", "pruned+assist", "assistant"} <= set(report["models"])
    assert 0 <= report["models"]["assistant"]["metrics"]["ndcg@10"] <= 1  # the assistant alone, same users
    # the assisted rows: the same artifacts, scored with the SASRec assistant each carries (its weight chosen
    # on validation for that LLM; the pruned one reuses the dense one's trained assistant)
    dense_card = json.loads((tmp_path / "work" / "0-dense" / "prunerec.json").read_text())
    pruned_card = json.loads((Path(report["models"]["pruned"]["artifact"]) / "prunerec.json").read_text())
    assert pruned_card["assistant"]["training"] == {"reused": str(tmp_path / "work" / "0-dense")}
    # the served pruned + vocab arm carries the pruned arm's assistant and weight, as the other arms carry theirs
    vocab_card = json.loads((Path(report["models"]["pruned+vocab"]["artifact"]) / "prunerec.json").read_text())
    assert vocab_card["assistant"]["weight"] == pruned_card["assistant"]["weight"]
    carried_from = Path(vocab_card["assistant"]["training"]["carried_from"])
    assert carried_from.resolve() == Path(report["models"]["pruned"]["artifact"]).resolve()
    for name, card in (("dense", dense_card), ("pruned", pruned_card)):
        assert report["models"][f"{name}+assist"]["assisted"] == (card["assistant"]["weight"] or None)
        assert report["models"][f"{name}+assist"]["artifact"] == report["models"][name]["artifact"]
    assert report["models"]["pruned"]["params"]["non_embedding"] < report["models"]["dense"]["params"]["non_embedding"]
    assert report["models"]["pruned+vocab"]["params"]["embedding"] < report["models"]["pruned"]["params"]["embedding"]
    assert report["models"]["pruned+vocab"]["macs_per_token"] < report["models"]["dense"]["macs_per_token"]
    for name in ("dense", "pruned", "pruned+vocab"):
        assert report["models"][name]["latency_ms"]["p50"] > 0 and report["models"][name]["artifact"].endswith(name if name == "dense" else "")
    assert report["protocol"]["users"] == len(prepared.splits["test"]) and report["protocol"]["sample_check"] is None
    assert {"ndcg@10", "hit@10"} <= set(report["models"]["sasrec"]["recbole_test_unmasked"])
    assert "RecBole's own evaluator" in (tmp_path / "report" / "report.md").read_text()
    assert set(report["ratios"]) == {"retention_ndcg@10", "non_embedding_pruned_fraction", "speedup_p50", "throughput_gain",
                                     "flops_ratio",
                                     "dense_ndcg@10_vs_sasrec", "dense_assisted_ndcg@10_vs_sasrec",
                                     "pruned_assisted_ndcg@10_vs_sasrec", "assisted_retention_ndcg@10",
                                     "dense_lean_vs_generate_users_per_s", "pruned_lean_vs_generate_users_per_s"}
    # multiply-adds per served request: the pruned model does fewer; their ratio is the speedups' ceiling
    dense_flops, pruned_flops = (report["models"][n]["flops_per_request"] for n in ("dense", "pruned"))
    assert dense_flops > pruned_flops > 0
    assert report["ratios"]["flops_ratio"] == pytest.approx(dense_flops / pruned_flops)
    assert "GFLOP/request" in (tmp_path / "report" / "report.md").read_text()
    # the decoder comparison: our lean step, our stock step and HF generate on the same users, dense and pruned
    for name in ("dense", "pruned"):
        decoders = report["decoders"][name]
        assert set(decoders["users_per_s"]) == {"ours_lean", "ours_lean_wide", "ours_stock", "hf_generate"}
        assert decoders["lean_vs_stock"]["identical_lists"] == 1.0
        assert report["ratios"][f"{name}_lean_vs_generate_users_per_s"] == decoders["lean_speedup_vs_generate"]
    assert "## Decoders" in (tmp_path / "report" / "report.md").read_text()
    assert "without narrowing" in (tmp_path / "report" / "report.md").read_text()
    assert report["ratios"]["dense_ndcg@10_vs_sasrec"] == pytest.approx(
        report["models"]["dense"]["metrics"]["ndcg@10"] / report["models"]["sasrec"]["metrics"]["ndcg@10"])
    phases = report["protocol"]["phase_minutes"]
    assert {"fine-tune", "evaluate", "assistant", "sasrec", "peft", "serve", "decoders", "load check"} <= set(phases)
    load = report["load"]  # overload with deadlines: every request answered in time or shed, none late
    assert load["requests"] > 0 and load["answered_200"] > 0 and load["late_200"] == 0 and load["client_timeouts"] == 0
    assert sum(load["by_status"].values()) == load["requests"] and load["arms"] == ["dense", "pruned"]
    assert "## Overload (load check)" in (tmp_path / "report" / "report.md").read_text()
    assert sum(phases.values()) <= report["protocol"]["minutes"] + 0.1 and report["protocol"]["resumed"] is False
    # resumable: a second run reuses every artifact and evaluation, and says that it resumed
    again = json.loads(run_bench(config, prepared)[0].read_text())
    assert again["models"]["pruned"]["metrics"] == report["models"]["pruned"]["metrics"]
    assert again["protocol"]["resumed"] is True


def test_gpu_profile_without_cuda_fails_at_once_with_a_way_out(monkeypatch):
    import torch

    from bench.run import bench_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cpu"):
        bench_config("gpu")
    assert bench_config("gpu", device="cpu").device == "cpu" and bench_config("gpu", device="cpu").users is None
    assert bench_config("cpu").device is None


def test_gpu_profile_settings_run_end_to_end_on_the_cpu(tmp_path, tokenizer, prepared):
    """No GPU here: run the gpu profile's own training / compression / evaluation settings (d3 template, whole
    epochs, every user, PrunePEFT) on a tiny model with --device cpu, so a wrong preset fails here and not
    half an hour into a lent GPU."""
    from helpers import save_model_dir

    from bench.run import bench_config, run_bench

    base = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer), layers=3), tokenizer)
    config = bench_config("gpu", device="cpu", model=str(base), output=str(tmp_path / "report"),
                          work=str(tmp_path / "work"), sasrec_epochs=1, latency_requests=2, concurrency=[1], load_seconds=0)
    report = json.loads(run_bench(config, prepared)[0].read_text())
    assert report["protocol"]["profile"] == "gpu" and report["protocol"]["users"] == len(prepared.splits["test"])
    assert {"dense", "pruned", "trsp", "sasrec", "mostpop", "lora", "lora-prunepeft"} <= set(report["models"])
    compression = report["protocol"]["compression"]
    assert compression["calibration"]["samples"] == 256 and compression["distill_per_stage"]["examples"] == 20000
    dense_card = json.loads((tmp_path / "work" / "0-dense" / "prunerec.json").read_text())
    # the compact template's windows packed into rows of 2048 tokens (issue "Fast on a GPU")
    assert dense_card["template"]["name"] == "compact" and dense_card["stage_config"]["pack_tokens"] == 2048
    assert dense_card["training"]["rows"] < dense_card["training"]["examples"]
    assert compression["distill_per_stage"]["pack_tokens"] == 2048
    assert 0 < report["ratios"]["non_embedding_pruned_fraction"] < 1 and report["load"] is None


def test_sample_check_sets_the_sample_beside_every_user(prepared):
    from bench.run import sample_check
    from pruning.evaluate import mostpop_metrics, sample_users

    every = prepared.splits["test"]
    whole = sample_check(prepared, every)
    assert whole["mostpop_ndcg@10_sample"] == whole["mostpop_ndcg@10_all_users"] and whole["all_users"] == len(every)
    few = sample_users(every, 5, seed=1)
    assert len(few) == 5 and len(sample_users(every, 0, seed=1)) == len(every)  # 0: every user, as None
    with pytest.raises(ValueError, match="positive"):
        sample_users(every, -3, seed=1)
    check = sample_check(prepared, few)
    assert check["mostpop_ndcg@10_all_users"] == whole["mostpop_ndcg@10_all_users"]
    assert check["mostpop_ndcg@10_sample"] == mostpop_metrics(prepared, few, True, [10], 20)[0]["ndcg@10"]


def test_a_rebuilt_arm_has_every_arm_served_again(tmp_path, tokenizer, prepared):
    """Serving figures are cached per arm; the ratios compare arms, so a rebuilt pruned artifact must not be
    compared with a dense figure served in an earlier run."""
    from bench.run import bench_config, serving_keys

    manifest = {"template": compact_template().to_dict(), "max_history": 10}
    arms = {name: write_artifact(tmp_path / name, tiny_llama(len(tokenizer), seed=seed), tokenizer, prepared.catalog, manifest)
            for seed, name in enumerate(("dense", "pruned"))}
    config = bench_config("cpu")
    before = serving_keys(arms, config, 24, 64)
    assert serving_keys(arms, config, 24, 64) == before  # nothing rebuilt: every cached figure stands
    write_artifact(tmp_path / "pruned", tiny_llama(len(tokenizer), seed=2), tokenizer, prepared.catalog, manifest)
    after = serving_keys(arms, config, 24, 64)
    assert after["dense"]["identity"] == before["dense"]["identity"]  # dense itself did not change ...
    assert after["dense"] != before["dense"] and after["pruned"] != before["pruned"]  # ... yet both are served again


def test_serving_keys_record_the_services_batching(tmp_path, tokenizer, prepared, monkeypatch):
    """The service's batching settings (read from the environment, as the served arms' service reads them) are
    part of every arm's key: figures served with other batching are served again."""
    from bench.run import bench_config, serving_keys

    manifest = {"template": compact_template().to_dict(), "max_history": 10}
    arms = {"dense": write_artifact(tmp_path / "dense", tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, manifest)}
    config = bench_config("cpu")
    monkeypatch.delenv("PRUNEREC_MAX_WAIT_MS", raising=False)
    before = serving_keys(arms, config, 24, 64)["dense"]
    assert before["batching"]["max_wait_ms"] == 5.0
    monkeypatch.setenv("PRUNEREC_MAX_WAIT_MS", "9")
    after = serving_keys(arms, config, 24, 64)["dense"]
    assert after["batching"]["max_wait_ms"] == 9.0 and after != before


def test_the_load_checks_key_records_the_services_batching_and_the_arms_builds(tmp_path, tokenizer, prepared, monkeypatch):
    """A cached load check is run again under other batching settings or after an arm is rebuilt."""
    from bench.harness import LoadCheck
    from bench.run import bench_config, load_key

    manifest = {"template": compact_template().to_dict(), "max_history": 10}
    arms = {name: str(write_artifact(tmp_path / name, tiny_llama(len(tokenizer), seed=seed), tokenizer, prepared.catalog,
                                     manifest)) for seed, name in enumerate(("dense", "pruned"))}
    config, check = bench_config("cpu"), LoadCheck(seconds=1.0)
    monkeypatch.delenv("PRUNEREC_SOLO_AFTER", raising=False)
    before = load_key(arms, check, config)
    assert load_key(arms, check, config) == before
    monkeypatch.setenv("PRUNEREC_SOLO_AFTER", str(before["batching"]["solo_after"] + 1))
    assert load_key(arms, check, config)["batching"] != before["batching"]
    monkeypatch.delenv("PRUNEREC_SOLO_AFTER")
    write_artifact(tmp_path / "pruned", tiny_llama(len(tokenizer), seed=2), tokenizer, prepared.catalog, manifest)
    assert load_key(arms, check, config)["identities"]["pruned"] != before["identities"]["pruned"]


def test_a_run_under_another_head_keeps_the_default_heads_evaluations(tmp_path):
    from bench.run import evaluation_path

    assert evaluation_path(tmp_path, "dense", "catalog") == tmp_path / "eval" / "dense.json"  # the caches runs made so far
    paths = {evaluation_path(tmp_path, name, head) for name in ("dense", "pruned+assist") for head in ("catalog", "trie", "full")}
    assert len(paths) == 6 and evaluation_path(tmp_path, "pruned+assist", "trie").name == "pruned+assist@trie.json"
