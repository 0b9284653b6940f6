"""bench.retention, the CPU smoke form: a tiny dense model pruned to two targets, each evaluated on every
test user; the curve falls in parameters as the targets rise, the report and the plot are written, a re-run
reuses everything, and bad targets are refused."""

from __future__ import annotations

import json

import pytest
from helpers import TINY_PRUNE

from bench.retention import RetentionConfig, curve, run_retention
from llmrec.artifact import read_manifest


class LeaseEnded(Exception):
    pass


def test_retention_curve_prunes_evaluates_and_plots(tmp_path, tiny_dense, prepared, monkeypatch):
    import pruning.prune

    config = RetentionConfig(teacher=str(tiny_dense), profile="cpu", targets=[0.75, 0.5], users=None, prune_overrides=TINY_PRUNE,
                             distill_preset="prunerec", every_stage=True, work=str(tmp_path / "work"), output=str(tmp_path / "out"))
    real_prune = pruning.prune.run

    def cut_short(prune_config, data, on_stage=None):  # the run ends after the second point's 2-mlp stage
        def stage_then_end(path):
            on_stage(path)
            if prune_config.target == 0.75 and path.name == "2-mlp":
                raise LeaseEnded
        return real_prune(prune_config, data, on_stage=stage_then_end)

    monkeypatch.setattr(pruning.prune, "run", cut_short)
    with pytest.raises(LeaseEnded):
        run_retention(config, prepared)
    kept = json.loads((tmp_path / "out" / "report.json").read_text())  # what the cut-short run had finished
    assert kept["protocol"]["complete"] is False and [p["target"] for p in kept["points"]] == [0.5]
    assert kept["in_progress"]["target"] == 0.75 and [s["stage"] for s in kept["in_progress"]["stages"]] == ["1-attn", "2-mlp"]
    assert "| target 0.75, after 2-mlp (unfinished) |" in (tmp_path / "out" / "report.md").read_text()
    monkeypatch.setattr(pruning.prune, "run", real_prune)

    report = run_retention(config, prepared)  # resumed: the finished stages and evaluations reused
    assert report["protocol"]["complete"] is True and "in_progress" not in report
    assert report["points"][0] == kept["points"][0]
    assert report["points"][1]["stages"][:2] == kept["in_progress"]["stages"]
    points = report["points"]
    assert [p["target"] for p in points] == [0.5, 0.75]  # sorted
    assert points[0]["non_embedding"] > points[1]["non_embedding"]  # more removed, fewer parameters
    for point in points:
        assert point["removed"] >= point["target"] - 0.05 and 0.0 <= point["ndcg@10"] <= 1.0
        assert point["retention"] == pytest.approx(point["ndcg@10"] / report["dense"]["ndcg@10"]) if report["dense"]["ndcg@10"] else True
    assert report["protocol"]["users"] == len(prepared.splits["test"]) and report["sasrec"] is None
    users = len(prepared.splits["test"])  # per-user ranks kept for paired comparisons (--compare), one per test user
    assert len(report["dense"]["ranks"]) == len(report["mostpop"]["ranks"]) == users
    for point in points:
        assert len(point["ranks"]) == users and all(-1 <= r < 20 for r in point["ranks"])
        hits = sum(0 <= r < 10 for r in point["ranks"])
        assert point["hr@10"] == pytest.approx(hits / users)  # the ranks are the evaluation's
        if point["retention_ci95"] is not None:
            low, high = point["retention_ci95"]
            assert low <= point["retention"] <= high
    assert '"ranks": [' in (tmp_path / "out" / "report.json").read_text()  # on one line, not one per rank
    assert 0.0 <= report["mostpop"]["ndcg@10"] <= 1.0
    for point in points:  # every stage evaluated: sizes falling stage by stage, the last one the point itself
        stages = point["stages"]
        assert [s["stage"] for s in stages] == ["1-attn", "2-mlp", "3-depth"]
        assert stages[0]["non_embedding"] > stages[1]["non_embedding"] > stages[2]["non_embedding"] == point["non_embedding"]
        assert stages[-1]["ndcg@10"] == point["ndcg@10"] and all(0.0 <= s["ndcg@10"] <= 1.0 for s in stages)
    assert "| target 0.75, after 1-attn |" in (tmp_path / "out" / "report.md").read_text()
    distilled = read_manifest(points[0]["artifact"])["stage_config"]["distill"]
    assert (distilled["epochs"], distilled["patience"]) == (3.0, 1) and distilled["max_steps"] == 2  # the preset, under the overrides
    for name in ("report.json", "report.md", "retention.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| target 0.75 |" in (tmp_path / "out" / "report.md").read_text()
    xs, ys = curve(report)  # the plotted line runs from the smallest model to the dense one
    assert xs == [points[1]["non_embedding"], points[0]["non_embedding"], report["dense"]["non_embedding"]]
    assert ys == [points[1]["ndcg@10"], points[0]["ndcg@10"], report["dense"]["ndcg@10"]]
    again = run_retention(config, prepared)  # resumable: the same artifacts and evaluations
    assert again["points"] == points
    assert json.loads((tmp_path / "out" / "report.json").read_text())["points"] == points


def test_retention_refuses_bad_targets_and_profiles(tmp_path, prepared):
    with pytest.raises(ValueError, match="between 0 and 1"):
        run_retention(RetentionConfig(teacher=str(tmp_path), targets=[1.2]), prepared)
    with pytest.raises(ValueError, match="unknown pruning profile"):
        run_retention(RetentionConfig(teacher=str(tmp_path), profile="tpu"), prepared)
    with pytest.raises(ValueError, match="unknown distillation preset"):
        run_retention(RetentionConfig(teacher=str(tmp_path), distill_preset="fast"), prepared)


def test_the_default_plan_is_one_point_of_the_size_prunerec_prune_gives_without_a_target(tmp_path, tiny_dense, prepared):
    """--plan default: the plan `prunerec prune` uses without --target (its keep ratios), one point named for it,
    its share removed standing in for a target; another plan kind is named in the protocol (no merge mixes them)."""
    from transformers import AutoConfig

    from pruning.plan import DEFAULT_RATIOS, has_attention_bias, plan_from_ratios
    from pruning.surgery import shape_of_config

    config = RetentionConfig(teacher=str(tiny_dense), profile="cpu", targets=[], plan="default", users=None,
                             prune_overrides=TINY_PRUNE, work=str(tmp_path / "work"), output=str(tmp_path / "out"))
    report = run_retention(config, prepared)
    (point,) = report["points"]
    model_config = AutoConfig.from_pretrained(tiny_dense)
    expected = plan_from_ratios(shape_of_config(model_config), DEFAULT_RATIOS, has_attention_bias(model_config))
    assert point["plan"] == "default" and point["target"] == pytest.approx(expected.removed_fraction, abs=1e-4)
    assert point["non_embedding"] == expected.target_params["non_embedding"]  # the default ratios' shape, not a uniform one
    assert "default plan" in report["protocol"]["plan"] and "default-plan" in point["artifact"]
    assert "| default plan |" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ValueError, match="give no targets"):
        run_retention(RetentionConfig(teacher=str(tiny_dense), targets=[0.9], plan="default"), prepared)
    with pytest.raises(ValueError, match="unknown plan"):
        run_retention(RetentionConfig(teacher=str(tiny_dense), plan="greedy"), prepared)  # type: ignore[arg-type]


def test_the_command_lines_distillation_options_reach_every_points_prune_config():
    from bench.retention import command_line, prune_overrides

    given = command_line().parse_args(["dense", "--distill-steps", "64", "--distill-lr-decay", "linear",
                                       "--distill-vocab", "catalog", "--no-reconstruct", "--distill-compile",
                                       "--distill-batch-size", "16", "--distill-lr", "6e-4", "--distill-epochs", "3",
                                       "--distill-hidden-weight", "0.5"])
    assert prune_overrides(given) == {"distill.max_steps": 64, "distill.lr_decay": "linear", "distill.vocab": "catalog",
                                      "distill.compile": True, "reconstruct": False, "distill.batch_size": 16,
                                      "distill.lr": 6e-4, "distill.epochs": 3.0, "distill.hidden_weight": 0.5}
    shared = command_line().parse_args(["dense", "--distill-teacher-outputs", "work/teacher-outputs",
                                        "--distill-prefill-batch-size", "4"])
    assert prune_overrides(shared) == {"distill.teacher_outputs": "work/teacher-outputs", "distill.prefill_batch_size": 4}
    assert prune_overrides(command_line().parse_args(["dense"])) == {}  # nothing given: the profile's own
    seeded = prune_overrides(command_line().parse_args(["dense", "--prune-seed", "2"]))
    assert seeded == {"calibration.seed": 2, "distill.seed": 2, "trsp.seed": 2}


ARMS = {  # README "One GPU lease": the arms of bench/gpu_arms.sh, as retention overrides
    "base": ({}, ["1-attn", "2-mlp", "3-depth"]),
    "catalog": ({"distill.vocab": "catalog"}, ["1-attn", "2-mlp", "3-depth"]),
    "hidden": ({"distill.hidden_weight": 1.0}, ["1-attn", "2-mlp", "3-depth"]),
    "gradual": ({"gradual": 2}, ["1-attn", "2-attn", "3-mlp", "4-mlp", "5-depth", "6-depth"]),
    "default": ({"plan": "default"}, ["1-attn", "2-mlp", "3-depth"]),  # a RetentionConfig field, not an override
    # (the next lease's lr and long arms change a number base runs with: tests/bench/test_gpu_scripts.py checks
    # that their options reach the command line)
}


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_the_leases_retention_arms_run_under_the_gpu_profile_on_the_cpu(tmp_path, tiny_dense, prepared, arm):
    """README "One GPU lease": the gpu pruning profile (256 calibration samples, packed rows of 2048 tokens) with
    the lease's distillation batch, rate, epochs, minutes and every stage evaluated, each arm's change on top, on
    a tiny model here, so a wrong combination fails in CI and not in a 15-minute lease. Only the step count is
    capped (seconds); a gradual arm's budget is split over its cuts (one step each)."""
    changed, stages = ARMS[arm]
    plan = changed.get("plan", "uniform")
    changed = {key: value for key, value in changed.items() if key != "plan"}
    overrides = {"distill.batch_size": 16, "distill.lr": 8.5e-4, "distill.epochs": 3.0, "distill.max_minutes": 1.0,
                 "distill.examples": 20000, "distill.max_steps": 2, **changed}
    config = RetentionConfig(teacher=str(tiny_dense), profile="gpu", targets=[0.955] if plan == "uniform" else [],
                             plan=plan, users=None, every_stage=True, prune_overrides=overrides, device="cpu",
                             work=str(tmp_path / "work"), output=str(tmp_path / "out"))
    report = run_retention(config, prepared)
    assert report["protocol"]["complete"] is True and report["protocol"]["users"] == len(prepared.splits["test"])
    (point,) = report["points"]
    assert [s["stage"] for s in point["stages"]] == stages and point["removed"] > 0.9
    manifest = read_manifest(point["artifact"])
    distilled = manifest["stage_config"]["distill"]
    cuts = changed.get("gradual", 1)  # a gradual stage's budget is split over its cuts
    assert (distilled["batch_size"], distilled["lr"], distilled["pack_tokens"]) == (16, changed.get("distill.lr", 8.5e-4), 2048)
    assert distilled["max_minutes"] == pytest.approx(changed.get("distill.max_minutes", 1.0) / cuts)
    assert point.get("plan", "uniform") == plan and manifest["stage_config"]["plan"]["ratios"]["mlp"] == (
        0.25 if plan == "default" else pytest.approx(manifest["stage_config"]["plan"]["ratios"]["hidden"]))
    assert distilled["epochs"] == pytest.approx(3.0 / cuts)
    assert distilled["vocab"] == changed.get("distill.vocab", "full")
    assert distilled["hidden_weight"] == changed.get("distill.hidden_weight", 0.0)
    assert manifest["stage_config"]["calibration"]["samples"] == 256
    steps = 2 // cuts
    assert all(stage["distill_steps"] == steps and stage["distill_stop"] for stage in point["stages"])  # what each got
    assert f"| {steps} (" in (tmp_path / "out" / "report.md").read_text()


def _report(targets, complete=True, **settings):
    config = {"teacher": "dense", "profile": "gpu", "targets": targets, "stages": ["attn", "mlp", "depth"], "users": None,
              "seed": 0, "sasrec_epochs": 0, "every_stage": True, "distill_preset": None, "prune_overrides": {},
              "device": None, "work": None, "output": None, **settings}
    protocol = {"teacher": "dense", "profile": "gpu", "users": 943, "seed": 0, "plan": "uniform", "stages": config["stages"],
                "ranking": "catalog head", "minutes": 3.0 + len(targets), "complete": complete, "config": config}
    points = [{"target": t, "artifact": f"t{t}", "non_embedding": int(1e6 * (1 - t)), "removed": t, "ndcg@10": 0.05 * (1 - t / 2),
               "hr@10": 0.1, "retention": 1 - t / 2, "distill_steps": 40, "distill_stop": "epochs"} for t in targets]
    return {"protocol": protocol, "dense": {"non_embedding": 1_000_000, "ndcg@10": 0.05, "hr@10": 0.1},
            "mostpop": {"ndcg@10": 0.045, "hr@10": 0.086}, "sasrec": None, "points": points}


def test_reports_of_one_configuration_merge_into_one_curve(tmp_path, monkeypatch, capsys):
    import sys

    from bench import retention

    for name, targets in (("t50", [0.5]), ("t90", [0.9, 0.75]), ("base", [0.955])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(_report(targets)))
    monkeypatch.setattr(sys, "argv", ["retention", "--merge", str(tmp_path / "t90"), str(tmp_path / "base"),
                                      str(tmp_path / "t50"), "--output", str(tmp_path / "curve")])
    retention.main()
    merged = json.loads((tmp_path / "curve" / "report.json").read_text())
    assert [p["target"] for p in merged["points"]] == [0.5, 0.75, 0.9, 0.955]
    assert merged["protocol"]["merged"] == 3 and merged["protocol"]["minutes"] == 5.0 and merged["protocol"]["complete"]
    assert (tmp_path / "curve" / "retention.png").stat().st_size > 0 and "| target 0.75 |" in capsys.readouterr().out
    xs, _ = curve(merged)
    assert xs == sorted(xs) and len(xs) == 5  # four points and the dense model

    unfinished = _report([0.98], complete=False)
    unfinished["in_progress"] = {"target": 0.98, "stages": []}
    merged = retention.merge_reports([_report([0.5]), unfinished])
    assert merged["protocol"]["complete"] is False and merged["in_progress"]["target"] == 0.98


def test_a_merged_curve_takes_its_sasrec_line_only_from_a_report_of_the_same_users(tmp_path, monkeypatch, capsys):
    import sys

    from bench import retention

    (tmp_path / "t50").mkdir()
    (tmp_path / "t50" / "report.json").write_text(json.dumps(_report([0.5])))  # MostPop 0.045 on its users
    same = {"sasrec_epochs_run": 5, "sasrec_masked": {"ndcg@10": 0.0996, "hr@10": 0.187},
            "mostpop_masked": {"ndcg@10": 0.045, "hr@10": 0.086}}
    (tmp_path / "sasrec.json").write_text(json.dumps(same))
    monkeypatch.setattr(sys, "argv", ["retention", "--merge", str(tmp_path / "t50"), "--sasrec-from",
                                      str(tmp_path / "sasrec.json"), "--output", str(tmp_path / "curve")])
    retention.main()
    merged = json.loads((tmp_path / "curve" / "report.json").read_text())
    assert merged["sasrec"]["ndcg@10"] == 0.0996 and merged["sasrec"]["source"].endswith("sasrec.json")
    assert "| SASRec (RecBole, 5 epochs; from " in capsys.readouterr().out
    other_users = {**same, "mostpop_masked": {"ndcg@10": 0.0586, "hr@10": 0.107}}  # a sample's MostPop
    with pytest.raises(ValueError, match="other users or protocol"):
        retention.sasrec_from(merged, other_users, "sample.json")
    with pytest.raises(ValueError, match=r"not a bench\.sasrec_masking report"):
        retention.sasrec_from(merged, {"metrics": {}}, "result.json")


@pytest.mark.parametrize("other, complaint", [
    (_report([0.9], prune_overrides={"distill.vocab": "catalog"}), "prune_overrides"),  # another configuration
    (_report([0.5]), "a target in two reports"),
    ({**_report([0.9]), "dense": {"non_embedding": 1_000_000, "ndcg@10": 0.06, "hr@10": 0.1}}, "dense model"),
])
def test_a_merge_refuses_reports_that_are_not_one_curve(other, complaint):
    from bench.retention import merge_reports

    with pytest.raises(ValueError, match=complaint):
        merge_reports([_report([0.5]), other])
    with pytest.raises(ValueError, match="no reports"):
        merge_reports([])


def test_a_merge_ignores_how_the_teachers_outputs_were_computed():
    """Where the teacher's outputs were computed (prefilled, shared through a directory) changes no figure: points
    that differ only in it merge into one curve; a setting that changes figures still refuses."""
    from bench.retention import merge_reports

    plain = _report([0.5])
    prefilled = _report([0.9], prune_overrides={"distill.teacher_outputs": "/tmp/w/teacher-outputs",
                                                "distill.prefill_batch_size": 8})
    assert [p["target"] for p in merge_reports([plain, prefilled])["points"]] == [0.5, 0.9]
    with pytest.raises(ValueError, match="prune_overrides"):
        merge_reports([plain, _report([0.9], prune_overrides={"distill.teacher_outputs": "/x", "distill.lr": 1e-3})])


def test_retention_interval_brackets_the_ratio_and_narrows_with_more_users():
    from bench.retention import retention_interval

    dense = [0, 3, -1, 1, -1, 5, 2, -1] * 10
    same = retention_interval(dense, dense)
    assert same == pytest.approx([1.0, 1.0])  # identical models: no spread
    worse = [r if i % 2 else -1 for i, r in enumerate(dense)]  # half the hits lost
    low, high = retention_interval(dense, worse)
    assert low < 0.6 < high and high < 1.0
    wide_low, wide_high = retention_interval(dense[:16], worse[:16])
    assert wide_high - wide_low > high - low  # fewer users, a wider interval
    assert retention_interval([-1] * 8, [0] * 8) is None  # a dense model with no hit: no ratio
    with pytest.raises(ValueError, match="same non-empty users"):
        retention_interval(dense, dense[:-1])


def test_two_arms_reports_compare_model_by_model(tmp_path, monkeypatch, capsys):
    import sys

    from bench import retention

    def arm(final_ranks, stage_names):
        report = _report([0.955])
        report["dense"]["ranks"] = [0, 1, -1, 4, 2, -1] * 20
        point = report["points"][0]
        point["ranks"] = final_ranks
        point["stages"] = [{"stage": name, "ranks": [-1] * 120} for name in stage_names] + [{"stage": "last"}]
        return report

    base = arm([0, 1, -1, 4, 2, -1] * 20, ["1-attn", "2-mlp"])
    better = arm([0, 0, 0, 0, 0, -1] * 20, ["1-attn", "2-attn", "3-mlp"])  # gradual: other stage names
    for name, report in (("base", base), ("gradual", better)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    monkeypatch.setattr(sys, "argv", ["retention", "--compare", str(tmp_path / "base"), str(tmp_path / "gradual"),
                                      "--output", str(tmp_path / "cmp")])
    retention.main()
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [row["model"] for row in rows] == ["dense", "target 0.955, after 1-attn", "target 0.955"]
    dense, _, final = rows
    assert dense["mean_difference"] == 0 and dense["wilcoxon_p"] == 1.0  # one dense model for both arms
    assert final["mean_difference"] > 0 and final["ci95"][0] > 0 and final["wilcoxon_p"] < 0.01
    assert final["users_better_b"] == 80 and final["users_better_a"] == 0
    assert "| target 0.955 |" in capsys.readouterr().out

    default_plan = arm([0, 0, 0, 0, 0, -1] * 20, ["1-attn", "2-mlp"])  # another plan, one point: paired as the final one
    default_plan["points"][0]["plan"] = "default"
    rows = retention.compare_reports(base, default_plan)
    assert [row["model"] for row in rows] == ["dense", "target 0.955 | default plan"]
    assert rows[1]["mean_difference"] > 0 and rows[1]["users_better_b"] == 80

    other_users = {**base, "protocol": {**base["protocol"], "users": 300}}
    with pytest.raises(ValueError, match="differ in users"):
        retention.compare_reports(base, other_users)
    old = _report([0.955])  # before per-user ranks were kept
    with pytest.raises(ValueError, match="without per-user ranks"):
        retention.compare_reports(old, old)


def test_a_dense_only_evaluation_is_reused_by_a_run_that_finds_it_in_its_work(tmp_path, tiny_dense, prepared, monkeypatch):
    """bench/gpu_arms.sh evaluates the dense model once (--dense-only) and copies it into each arm's WORK/eval."""
    import shutil

    import pruning.evaluate

    shared = run_retention(RetentionConfig(teacher=str(tiny_dense), targets=[], users=None, work=str(tmp_path / "shared"),
                                           output=str(tmp_path / "shared")), prepared)
    assert shared["points"] == [] and shared["protocol"]["complete"] is True
    assert len(shared["dense"]["ranks"]) == len(prepared.splits["test"])
    (tmp_path / "arm" / "eval").mkdir(parents=True)
    for path in (tmp_path / "shared" / "eval").glob("dense.*"):
        shutil.copy(path, tmp_path / "arm" / "eval")
    monkeypatch.setattr(pruning.evaluate, "run", lambda *args, **kwargs: pytest.fail("the dense model evaluated again"))
    arm = run_retention(RetentionConfig(teacher=str(tiny_dense), targets=[], users=None, work=str(tmp_path / "arm"),
                                        output=str(tmp_path / "arm-out")), prepared)
    assert arm["dense"] == shared["dense"] and arm["mostpop"] == shared["mostpop"]
