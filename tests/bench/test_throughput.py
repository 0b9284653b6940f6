"""`python -m bench.throughput`: every variant runs through the engine and reports non-padding tokens/s."""

from __future__ import annotations

import json
import sys

import pytest
import torch
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
    assert report["device"] == "cpu" and report["precision"] == "fp32" and report["gpu_total_mb"] is None
    runs = {run["name"]: run for run in report["runs"]}
    assert set(runs) == {"finetune d3", "finetune d3 packed", "finetune compact", "finetune compact packed",
                         "finetune compact catalog", "finetune compact catalog packed",
                         "distill d3 packed", "distill compact", "distill compact packed", "distill compact catalog",
                         "distill compact catalog packed"}
    assert 0 < report["catalog_tokens"] < len(tokenizer)
    assert all(run["tokens_per_s"] > 0 and run["steps"] == 2 for run in runs.values())
    # packing: several examples per row, so more real tokens per step at the same rows per step
    assert runs["finetune d3 packed"]["tokens_per_step"] > 1.5 * runs["finetune d3"]["tokens_per_step"]
    # the compact windows packed as the gpu profiles train on them: several windows a row, no padding to speak of
    for loop in ("finetune", "distill"):
        assert runs[f"{loop} compact packed"]["tokens_per_step"] > 1.5 * runs[f"{loop} compact"]["tokens_per_step"]
        assert runs[f"{loop} compact packed"]["mean_row_tokens"] > 1.5 * runs[f"{loop} compact"]["mean_row_tokens"]
    for shape in ("compact", "compact packed"):  # the catalog loss: the same rows, another head
        assert runs[f"finetune {shape.replace('compact', 'compact catalog')}"]["tokens_per_step"] == runs[f"finetune {shape}"]["tokens_per_step"]
    assert set(report["recommended"]) == set(runs)  # one batch size measured: that one
    assert all(choice["batch_rows"] == 4 and choice["gain"] == 1.0 for choice in report["recommended"].values())
    assert all(0 <= run["padding_share"] < 1 for run in runs.values())
    # the process's first run made twice, the first discarded (it pays the device's one-time costs)
    assert report["discarded_first_run"]["name"] == report["runs"][0]["name"] == "finetune d3"
    assert report["discarded_first_run"]["steps"] == 2


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


def _run(name, rows, tokens_per_s, compiled=False, oom=False):
    if oom:
        return {"name": name, "batch_rows": rows, "compiled": compiled, "oom": True}
    return {"name": name, "batch_rows": rows, "compiled": compiled, "tokens_per_s": tokens_per_s}


def test_recommend_takes_a_larger_batch_only_for_enough_more_tokens_a_second_and_stops_at_memory():
    runs = [
        # host-bound: the step time hardly grows with the rows, so tokens/s grows with them
        _run("finetune compact packed", 2, 16_000), _run("finetune compact packed", 8, 60_000),
        _run("finetune compact packed", 16, 100_000), _run("finetune compact packed", 32, 0, oom=True),
        _run("finetune compact packed", 64, 900_000),  # past an out-of-memory batch: never taken
        _run("finetune compact packed compiled", 16, 400_000, compiled=True),  # compiling is a separate choice
        # device-bound: 8 rows are barely faster, 16 not enough over the batch taken (2)
        _run("distill compact packed", 2, 50_000), _run("distill compact packed", 8, 55_000),
        _run("distill compact packed", 16, 61_000),
        _run("distill compact catalog packed", 2, 0, oom=True),
    ]
    chosen = throughput.recommend(runs)
    assert chosen["finetune compact packed"] == {"batch_rows": 16, "tokens_per_s": 100_000, "gain": 6.25,
                                                 "measured": [2, 8, 16, 32, 64]}
    assert chosen["distill compact packed"]["batch_rows"] == 2 and chosen["distill compact packed"]["gain"] == 1.0
    assert "distill compact catalog packed" not in chosen  # nothing fitted
    assert "finetune compact packed compiled" not in chosen
    # a lower bar takes the 16 rows of distillation (61k >= 1.2 x 50k)
    assert throughput.recommend(runs, min_gain=1.2)["distill compact packed"]["batch_rows"] == 16


def test_lease_settings_scale_distillations_rate_with_the_square_root_of_the_batch_and_keep_fine_tuning(
        tmp_path, monkeypatch, capsys):
    from pruning.prune import PROFILES as PRUNE_PROFILES
    from pruning.train import PROFILES as TRAIN_PROFILES

    assert TRAIN_PROFILES["gpu"]["batch_size"] == 2 and PRUNE_PROFILES["gpu"]["distill"]["batch_size"] == 2
    report = {"runs": [_run("finetune compact packed", 2, 10_000), _run("finetune compact packed", 8, 40_000),
                       _run("distill compact packed", 2, 10_000), _run("distill compact packed", 8, 11_000),
                       _run("distill compact catalog packed", 2, 10_000), _run("distill compact catalog packed", 8, 30_000)]}
    settings = throughput.lease_settings(report)
    # fine-tuning 4x faster at 8 rows, yet the profile's batch and rate: a larger batch's quality is unmeasured
    # (the 16 rows picked on an H100 gave a weaker dense model, 2026-11-27)
    assert settings == {"train_batch": 2, "train_lr": TRAIN_PROFILES["gpu"]["lr"],
                        "distill_batch": 2, "distill_lr": pytest.approx(3e-4)}
    assert throughput.lease_settings(report, distillation="distill compact catalog packed")["distill_batch"] == 8
    # distillation's rate never grows past the highest seen stable (a 32-row batch: 3e-4 x 4 = 1.2e-3 -> 1e-3)
    wide = {"runs": [_run("distill compact packed", 2, 10_000), _run("distill compact packed", 32, 90_000)]}
    assert throughput.lease_settings(wide)["distill_batch"] == 32
    assert throughput.lease_settings(wide)["distill_lr"] == pytest.approx(throughput.MAX_DISTILL_LR)
    # a sweep without the variants keeps the profile's batch and rate
    assert throughput.lease_settings({"runs": []}) == {"train_batch": 2, "train_lr": TRAIN_PROFILES["gpu"]["lr"],
                                                       "distill_batch": 2, "distill_lr": pytest.approx(3e-4)}
    # the command line the GPU script reads: four values on one line
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(report))
    monkeypatch.setattr(sys, "argv", ["throughput", "--lease-settings", str(path), "--distill-variant",
                                      "distill compact catalog packed"])
    throughput.main()
    batch, lr, distill_batch, distill_lr = capsys.readouterr().out.split()
    assert (int(batch), float(lr), int(distill_batch), float(distill_lr)) == (2, pytest.approx(5e-5), 8, pytest.approx(6e-4))


def test_lease_settings_for_arms_sharing_the_card_keep_each_distillation_within_its_share_of_memory():
    def run(name, rows, tokens_per_s, peak_mb):
        return {**_run(name, rows, tokens_per_s), "peak_gpu_mb": peak_mb}

    runs = [run("finetune compact packed", 2, 10_000, 30_000), run("finetune compact packed", 16, 60_000, 70_000),
            run("distill compact packed", 2, 10_000, 6_000), run("distill compact packed", 8, 30_000, 15_000),
            run("distill compact packed", 16, 50_000, 28_000)]
    report = {"runs": runs, "gpu_total_mb": 80_000}
    assert throughput.lease_settings(report)["distill_batch"] == 16  # alone, the fastest that fits
    # three arms: 0.85 x 80 GB / 3 = 22.7 GB each -> 8 rows (15 GB), not 16 (28 GB)
    three = throughput.lease_settings(report, arms=3)
    assert three["distill_batch"] == 8 and three["distill_lr"] == pytest.approx(3e-4 * 2)
    assert three["train_batch"] == 2  # the profile's, whatever the sweep
    # so many arms that no measured batch fits its share: the profile's own batch
    assert throughput.lease_settings(report, arms=20)["distill_batch"] == 2
    # a sweep without the card's memory (a CPU one): nothing to divide
    assert throughput.lease_settings({"runs": runs}, arms=3)["distill_batch"] == 16
    with pytest.raises(ValueError, match="at least 1"):
        throughput.lease_settings(report, arms=0)


def test_a_batch_that_runs_out_of_device_memory_is_recorded_and_the_sweep_goes_on(tmp_path, tokenizer, monkeypatch):
    model_dir = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    output = tmp_path / "throughput.json"
    real = throughput._measure

    def measure_or_oom(name, model, rows, loss_of, batch_size, *args):
        if batch_size > 4:  # as a GPU would: the loss's tensors do not fit
            def too_big(items):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(name, model, rows, too_big, batch_size, *args)
        return real(name, model, rows, loss_of, batch_size, *args)

    monkeypatch.setattr(throughput, "_measure", measure_or_oom)
    monkeypatch.setattr(sys, "argv", ["throughput", "--model", str(model_dir), "--variants", "finetune compact packed",
                                      "--device", "cpu", "--steps", "1", "--warmup", "0", "--examples", "48",
                                      "--batch-size", "2,8,4", "--output", str(output)])
    throughput.main()
    report = json.loads(output.read_text())
    assert [(r["batch_rows"], r.get("oom", False)) for r in report["runs"]] == [(2, False), (8, True), (4, False)]
    assert "tokens_per_s" not in report["runs"][1]
    assert report["recommended"]["finetune compact packed"]["measured"] == [2, 4, 8]
    assert report["recommended"]["finetune compact packed"]["batch_rows"] in (2, 4)
