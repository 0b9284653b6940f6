"""`python -m bench.throughput`: every variant runs through the engine and reports non-padding tokens/s."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import save_model_dir, tiny_llama

from bench import throughput


def test_throughput_reports_every_variant_with_its_batch_shape(tmp_path, tokenizer, monkeypatch):
    model_dir = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    output = tmp_path / "throughput.json"
    monkeypatch.setattr(sys, "argv", ["throughput", "--model", str(model_dir), "--device", "cpu", "--steps", "2",
                                      "--warmup", "1", "--examples", "24", "--batch-size", "4", "--pack-tokens", "2048",
                                      "--output", str(output)])
    throughput.main()
    report = json.loads(output.read_text())
    assert report["device"] == "cpu" and report["precision"] == "fp32"
    runs = {run["name"]: run for run in report["runs"]}
    assert set(runs) == {"finetune d3", "finetune d3 packed", "finetune compact", "distill d3 packed", "distill compact",
                         "distill compact catalog"}
    assert 0 < report["catalog_tokens"] < len(tokenizer)
    assert all(run["tokens_per_s"] > 0 and run["steps"] == 2 for run in runs.values())
    # packing: several examples per row, so more real tokens per step at the same rows per step
    assert runs["finetune d3 packed"]["tokens_per_step"] > 1.5 * runs["finetune d3"]["tokens_per_step"]
    assert all(0 <= run["padding_share"] < 1 for run in runs.values())


def test_throughput_runs_the_variants_named_on_the_student_given(tmp_path, tokenizer, monkeypatch):
    model_dir = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    student_dir = save_model_dir(tmp_path / "student", tiny_llama(len(tokenizer), layers=1), tokenizer)
    output = tmp_path / "throughput.json"
    monkeypatch.setattr(sys, "argv", ["throughput", "--model", str(model_dir), "--student", str(student_dir),
                                      "--variants", "distill compact,distill compact catalog", "--device", "cpu",
                                      "--steps", "1", "--warmup", "0", "--examples", "16", "--batch-size", "4",
                                      "--output", str(output)])
    throughput.main()
    report = json.loads(output.read_text())
    assert [run["name"] for run in report["runs"]] == ["distill compact", "distill compact catalog"]
    assert report["student"] == str(student_dir)
    monkeypatch.setattr(sys, "argv", ["throughput", "--model", str(model_dir), "--variants", "distill everything"])
    with pytest.raises(SystemExit):
        throughput.main()


def test_profile_steps_add_an_operator_table_without_counting_in_the_timed_figures(tmp_path, tokenizer, monkeypatch):
    model_dir = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    output = tmp_path / "throughput.json"
    arguments = ["throughput", "--model", str(model_dir), "--variants", "finetune compact", "--device", "cpu",
                 "--steps", "2", "--warmup", "1", "--examples", "24", "--batch-size", "4", "--output", str(output)]
    monkeypatch.setattr(sys, "argv", [*arguments, "--profile-steps", "2"])
    throughput.main()
    run = json.loads(output.read_text())["runs"][0]
    assert run["steps"] == 2 and run["profile"]["steps"] == 2
    top = run["profile"]["top"]
    assert top and any(entry["op"].startswith("aten::") for entry in top)
    assert all(entry["self_ms"] >= 0 and entry["calls"] >= 1 for entry in top)
    assert run["profile"]["device_busy_share"] is None  # a GPU figure
    # the timed figures are the timed steps' alone: the same tokens per step as a run without profiling
    monkeypatch.setattr(sys, "argv", arguments)
    throughput.main()
    plain = json.loads(output.read_text())["runs"][0]
    assert "profile" not in plain and plain["tokens_per_step"] == run["tokens_per_step"]


def test_batch_sizes_and_compiled_layers_run_side_by_side(tmp_path, tokenizer, monkeypatch):
    model_dir = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    output = tmp_path / "throughput.json"
    arguments = ["throughput", "--model", str(model_dir), "--variants", "finetune compact", "--device", "cpu",
                 "--steps", "2", "--warmup", "1", "--examples", "48", "--output", str(output)]
    monkeypatch.setattr(sys, "argv", [*arguments, "--batch-size", "2,6", "--compile"])
    throughput.main()
    report = json.loads(output.read_text())
    assert report["protocol"]["batch_rows"] == [2, 6] and report["protocol"]["compiled"] is True
    runs = report["runs"]
    assert [(r["name"], r["batch_rows"], r["compiled"]) for r in runs] == [
        ("finetune compact", 2, False), ("finetune compact compiled", 2, True),
        ("finetune compact", 6, False), ("finetune compact compiled", 6, True)]
    # every variant warms up long enough for a compiled one's recompile, so both time the same batches
    assert [r["warmup_steps"] for r in runs] == [3, 3, 3, 3]
    assert all(r["steps"] == 2 and r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 for r in runs)
    # the same seeded batches whether compiled or not; more rows, more tokens a step
    assert runs[0]["tokens_per_step"] == runs[1]["tokens_per_step"] < runs[2]["tokens_per_step"]
    for bad in ("0", "two"):
        monkeypatch.setattr(sys, "argv", [*arguments, "--batch-size", bad])
        with pytest.raises(SystemExit):
            throughput.main()
