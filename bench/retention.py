"""The retention curve: one dense model pruned to several sizes, NDCG@10 against non-embedding parameters.

PruneRec (arXiv 2507.07064) reports quality kept against parameters removed; this measures that curve for a
prunerec artifact. For every target share of non-embedding parameters removed (default 50, 75, 90, 95.5 and
98%), ``prunerec prune --target T`` (a uniform plan: every kept ratio derived from the one target; the stages
attn, mlp, depth, each distilled from the dense model with the pruning profile's settings) compresses the
same dense artifact; the last stage's artifact and the dense one are evaluated on the same seeded test users
(history excluded, full catalog, 20 beams, the catalog head, the pure LLM: no assistant), with MostPop on those
users and, when asked, RecBole SASRec. Resumable: finished stages and evaluations are reused.

    python -m bench.retention runs/bench-cpu/0-dense --profile cpu --users 300     # hours on 2 CPU cores
    python -m bench.retention runs/dense --profile gpu --sasrec-epochs 50           # every user, one GPU
    python -m bench.retention runs/dense --profile gpu --users 0 --distill-minutes 0.5   # sized to a short lease

``--plan default`` prunes one point instead, with the plan ``prunerec prune`` uses when no target is given
(``pruning.plan.DEFAULT_RATIOS``), so a lease can set the default plan beside the uniform plan of the same size
(``--compare`` pairs two reports' single points whatever their plans).

``--every-stage`` also evaluates each point's earlier stages (attn, mlp), to see which cut loses the quality.
Every model's per-user ranks are kept (``ranks``), so each retention has a paired bootstrap interval
(``retention_ci95``) and ``--compare DIR_A DIR_B`` pairs two reports on the same users model by model.

Writes ``report.json`` (``points``: target, removed, non_embedding, NDCG@10, HR@10, retention; ``stages``, the
same for each stage, with ``--every-stage``), ``report.md``
and ``retention.png`` (NDCG@10 against non-embedding parameters, log scale, with the dense point and the
SASRec and MostPop lines) to ``bench/results/<profile>/retention``. All three are rewritten after every
evaluation (``protocol.complete`` false until the end; ``in_progress``: the point being pruned, its stages
evaluated as each is written under ``--every-stage``), so a run cut short, a GPU lease that ends, keeps what it
finished; run again, it resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmrec.artifact import read_manifest
from recdata.prep import PreparedData

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = [0.5, 0.75, 0.9, 0.955, 0.98]


@dataclass
class RetentionConfig:
    """One retention-curve run."""

    teacher: str
    """The dense fine-tuned artifact every point is pruned from (and distilled from)."""
    profile: str = "cpu"
    """Pruning profile of every point (calibration and distillation settings): cpu or gpu."""
    targets: list[float] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Shares of non-embedding parameters to remove, one pruning run each. Empty: the dense model and MostPop
    only (``--dense-only``: ``bench/gpu_arms.sh`` evaluates the dense model once, and each arm reuses it)."""
    plan: Literal["uniform", "default"] = "uniform"
    """uniform: a point per target, each the uniform plan removing that share (``prunerec prune --target``);
    default: one point, the plan ``prunerec prune`` uses without a target (its keep ratios), targets unused."""
    stages: list[str] = field(default_factory=lambda: ["attn", "mlp", "depth"])
    """Stages of every pruning run."""
    users: int | None = 300
    """Seeded test users of every evaluation (None = all)."""
    seed: int = 0
    sasrec_epochs: int = 0
    """Most epochs of the RecBole SASRec line (0: no SASRec line)."""
    every_stage: bool = False
    """Evaluate every stage's artifact of every point, not only the last (which stage loses the quality)."""
    distill_preset: str | None = None
    """Distillation preset over the profile (``prunerec prune --distill-preset``), under the overrides."""
    prune_overrides: dict[str, Any] = field(default_factory=dict)
    """PruneConfig values over the profile (dotted paths, e.g. {'distill.max_steps': 4})."""
    device: str | None = None
    work: str | None = None
    """Pruning runs and evaluations [runs/retention-<profile>]."""
    output: str | None = None
    """Report directory [bench/results/<profile>/retention]."""


def run_retention(config: RetentionConfig, data: PreparedData) -> dict[str, Any]:
    """Prune to every target, evaluate, write the report; returns it."""
    from bench.run import evaluate_cached
    from llmrec.configs import merge
    from pruning.distill import with_preset
    from pruning.prune import PROFILES, PruneConfig
    from pruning.prune import run as prune

    if config.profile not in PROFILES:
        raise ValueError(f"unknown pruning profile {config.profile!r}; choose one of {sorted(PROFILES)}")
    with_preset(None, config.distill_preset)  # an unknown preset is refused before any work
    if config.plan not in PLAN_KINDS:
        raise ValueError(f"unknown plan {config.plan!r}; choose one of {sorted(PLAN_KINDS)}")
    if any(not 0.0 < t < 1.0 for t in config.targets):
        raise ValueError(f"targets must lie strictly between 0 and 1, got {config.targets}")
    if config.plan == "default" and config.targets:
        raise ValueError("the default plan is one point of its own size: give no targets with it")
    work = Path(config.work or f"runs/retention-{config.profile}")
    output = Path(config.output or f"bench/results/{config.profile}/retention")
    started = time.perf_counter()
    dense_eval = evaluate_cached(Path(config.teacher), data, config.users, config.seed, "catalog",
                                 work / "eval" / "dense.json", config.device)
    dense = {"non_embedding": read_manifest(config.teacher)["params"]["non_embedding"],
             "ndcg@10": dense_eval["metrics"]["ndcg@10"], "hr@10": dense_eval["metrics"]["hr@10"],
             "ranks": _ranks(work / "eval" / "dense.json")}
    mostpop = {**dense_eval["mostpop"], "ranks": _ranks(work / "eval" / "dense.json", "mostpop_rank")}
    points: list[dict[str, Any]] = []
    partial: dict[str, Any] | None = None  # the point being pruned, its stages evaluated so far (--every-stage)

    def write(sasrec: dict[str, Any] | None = None, complete: bool = False) -> dict[str, Any]:
        """The report as it stands, rewritten after every evaluation: a run cut short (a GPU lease that ends)
        keeps every figure it finished."""
        report = {
            "protocol": {"teacher": config.teacher, "profile": config.profile, "users": dense_eval["protocol"]["users"],
                         "seed": config.seed, "plan": PLAN_KINDS[config.plan],
                         "stages": config.stages,
                         "ranking": "full catalog, 20 beams, history excluded, catalog head, no assistant",
                         "minutes": round((time.perf_counter() - started) / 60, 1), "complete": complete,
                         "config": asdict(config)},
            "dense": dense,
            "mostpop": mostpop,
            "sasrec": sasrec,
            "points": points,
        }
        if partial is not None:
            report["in_progress"] = partial
        write_report(report, output)
        return report

    write()
    runs: list[tuple[str, float | None]] = [(f"target-{target:g}", target) for target in sorted(config.targets)]
    if config.plan == "default":
        runs = [("default-plan", None)]
    for name, target in runs:
        prune_config = merge(PruneConfig, with_preset(PROFILES[config.profile], config.distill_preset),
                             {"device": config.device, **config.prune_overrides},
                             output=str(work / name), teacher=config.teacher, target=target, stages=list(config.stages),
                             evaluate=False)
        plan_fields: dict[str, Any] = {"target": target}
        if target is None:  # the default plan: the share it removes stands in for a target (the table's order)
            plan_fields = {"target": round(_default_plan_removed(prune_config), 4), "plan": "default"}
        partial = {**plan_fields, "stages": []}

        def evaluate_stage(path: Path, name: str = name, partial: dict[str, Any] = partial) -> None:
            """A stage evaluated as soon as it is written (--every-stage), the report rewritten."""
            evaluation_path = work / "eval" / f"{name}-{path.name}.json"
            stage_evaluation = evaluate_cached(path, data, config.users, config.seed, "catalog", evaluation_path,
                                               config.device)
            partial["stages"].append({"stage": path.name, **_quality(path, stage_evaluation, _ranks(evaluation_path), dense)})
            write()

        logger.info("retention: pruning to %.1f%% removed (%s)", 100 * plan_fields["target"], point_label(plan_fields))
        artifacts = prune(prune_config, data, on_stage=evaluate_stage if config.every_stage else None)
        final = artifacts[-1]
        evaluation_path = work / "eval" / f"{name}-{final.name}.json"  # --every-stage's file too
        evaluation = evaluate_cached(final, data, config.users, config.seed, "catalog", evaluation_path, config.device)
        point = {**plan_fields, "artifact": str(final),
                 **_quality(final, evaluation, _ranks(evaluation_path), dense)}
        if config.every_stage:  # the stages as evaluated when written; the last one is the point itself
            point["stages"] = [*partial["stages"][:-1], {"stage": final.name, **{key: point[key] for key in _QUALITY}}]
        points.append(point)
        partial = None
        write()
    sasrec = None
    if config.sasrec_epochs:
        from bench import sasrec as sasrec_bench
        from pruning.evaluate import sample_users

        sasrec_config = sasrec_bench.SASRecConfig(output=str(work / "sasrec"), epochs=config.sasrec_epochs,
                                                  device=config.device or "cpu")
        pairs = sample_users(data.splits["test"], config.users, config.seed)
        sasrec = sasrec_bench.run(sasrec_config, data, users=pairs)["metrics"]
    return write(sasrec, complete=True)


PLAN_KINDS = {"uniform": "uniform plan per target (prunerec prune --target)",
              "default": "the default plan (prunerec prune without --target: pruning.plan.DEFAULT_RATIOS)"}
"""Plan kinds of a report (``protocol.plan``); reports of two kinds never merge into one curve."""


def _default_plan_removed(prune_config: Any) -> float:
    """Share of the teacher's non-embedding parameters the default plan removes (read from its config)."""
    from transformers import AutoConfig

    from pruning.prune import make_plan

    return make_plan(AutoConfig.from_pretrained(prune_config.teacher), prune_config).removed_fraction


def point_label(point: dict[str, Any]) -> str:
    """A point's name in tables and comparisons: its target, or "default plan" (its share removed is its row's)."""
    if point.get("plan") == "default":
        return "default plan"
    return f"target {point['target']:g}"


_QUALITY = ("non_embedding", "removed", "ndcg@10", "hr@10", "retention", "retention_ci95", "distill_steps",
            "distill_stop", "distill_peak_gpu_mb", "ranks")


def _ranks(evaluation_path: Path, column: str = "rank") -> list[int]:
    """Per-user 0-based rank of the next item (−1: not in the list), in the evaluated users' order, from the
    ranks file :mod:`pruning.evaluate` writes beside its JSON (``column`` mostpop_rank: MostPop's)."""
    import pandas as pd

    return pd.read_csv(evaluation_path.with_suffix(".ranks.csv"))[column].astype(int).tolist()


def retention_interval(dense_ranks: list[int], ranks: list[int], resamples: int = 2000, seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of the retention (mean NDCG@10 of ``ranks`` over the dense model's), users
    resampled together for both (paired: the same users each time). None where a resample's dense NDCG is 0."""
    import numpy as np

    from bench.report import per_user_ndcg

    dense, pruned = per_user_ndcg(dense_ranks), per_user_ndcg(ranks)
    if dense.shape != pruned.shape or dense.size == 0:
        raise ValueError("the retention interval needs the same non-empty users for both models")
    users = np.random.default_rng(seed).integers(0, dense.size, size=(resamples, dense.size))
    dense_means = dense[users].mean(1)  # (resamples,)
    if np.any(dense_means == 0):
        return None
    ratios = pruned[users].mean(1) / dense_means
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def _quality(artifact: Path, evaluation: dict[str, Any], ranks: list[int], dense: dict[str, Any]) -> dict[str, Any]:
    """An evaluated artifact's size and quality against the dense model's (the report's ``dense`` entry), the
    fields of :data:`_QUALITY`."""
    manifest = read_manifest(artifact)
    params = manifest["params"]["non_embedding"]
    ndcg, dense_ndcg = evaluation["metrics"]["ndcg@10"], dense["ndcg@10"]
    distilled = manifest.get("distillation") or {}  # what the stage's recovery got (a run capped in minutes varies)
    return {"non_embedding": params, "removed": 1 - params / dense["non_embedding"], "ndcg@10": ndcg,
            "hr@10": evaluation["metrics"]["hr@10"], "retention": ndcg / dense_ndcg if dense_ndcg else None,
            "retention_ci95": retention_interval(dense["ranks"], ranks), "distill_steps": distilled.get("steps"),
            "distill_stop": distilled.get("stop_reason"),
            "distill_peak_gpu_mb": distilled.get("peak_gpu_mb"),  # on CUDA: sizes the batch of arms sharing a card
            "ranks": ranks}


def markdown(report: dict[str, Any]) -> str:
    """The curve as a table."""
    dense = report["dense"]
    unfinished = "" if report["protocol"].get("complete", True) else ", unfinished: the run has not ended"
    lines = [f"# Retention curve ({report['protocol']['profile']}, {report['protocol']['users']} users{unfinished})", "",
             "| model | non-embedding params | removed | NDCG@10 | HR@10 | retention [95% CI] | distillation steps (stop) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| dense | {dense['non_embedding']:,} | 0% | {dense['ndcg@10']:.4f} | {dense['hr@10']:.4f} | 1.000 | |"]
    for point in report["points"]:
        for row in point.get("stages", [])[:-1]:  # a point's earlier stages, when every stage was evaluated
            lines.append(_row(f"{point_label(point)}, after {row['stage']}", row))
        lines.append(_row(point_label(point), point))
    if report.get("in_progress"):  # a point whose pruning has not finished (yet, or ever: a cut-short run)
        for row in report["in_progress"]["stages"]:
            lines.append(_row(f"{point_label(report['in_progress'])}, after {row['stage']} (unfinished)", row))
    lines.append(f"| MostPop | | | {report['mostpop']['ndcg@10']:.4f} | {report['mostpop']['hr@10']:.4f} | | |")
    if report.get("sasrec"):
        source = report["sasrec"].get("source")
        name = f"SASRec (RecBole, {report['sasrec'].get('epochs')} epochs; from {source})" if source else "SASRec (RecBole)"
        lines.append(f"| {name} | | | {report['sasrec']['ndcg@10']:.4f} | {report['sasrec']['hr@10']:.4f} | | |")
    return "\n".join(lines) + "\n"


def _row(label: str, quality: dict[str, Any]) -> str:
    retention = f"{quality['retention']:.3f}" if quality["retention"] is not None else "–"
    if quality.get("retention_ci95"):  # reports since 2026-11-27 (per-user ranks)
        retention += " [{:.2f}, {:.2f}]".format(*quality["retention_ci95"])
    steps = quality.get("distill_steps")
    distilled = "" if steps is None else f"{steps} ({quality.get('distill_stop')})"
    return (f"| {label} | {quality['non_embedding']:,} | {100 * quality['removed']:.1f}% | {quality['ndcg@10']:.4f} | "
            f"{quality['hr@10']:.4f} | {retention} | {distilled} |")


def curve(report: dict[str, Any]) -> tuple[list[int], list[float]]:
    """The plotted line: (non-embedding parameters, NDCG@10) of every point and the dense model, smallest first
    (the points come in target order, largest model first, and the dense one last)."""
    pairs = sorted([(p["non_embedding"], p["ndcg@10"]) for p in report["points"]]
                   + [(report["dense"]["non_embedding"], report["dense"]["ndcg@10"])])
    return [x for x, _ in pairs], [y for _, y in pairs]


def plot(report: dict[str, Any], path: Path) -> None:
    """NDCG@10 against non-embedding parameters (log x), the dense point, SASRec and MostPop as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4))
    xs, ys = curve(report)
    ax.plot(xs, ys, marker="o", label="prunerec (pruned … dense)")
    for point in report["points"]:
        ax.annotate(f"{100 * point['removed']:.1f}%", (point["non_embedding"], point["ndcg@10"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.axhline(report["mostpop"]["ndcg@10"], color="grey", linestyle=":", label="MostPop")
    if report.get("sasrec"):
        epochs = report["sasrec"].get("epochs")
        borrowed = f" ({epochs} epochs, another run)" if report["sasrec"].get("source") else ""
        ax.axhline(report["sasrec"]["ndcg@10"], color="black", linestyle="--", label=f"SASRec{borrowed}")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("NDCG@10")
    ax.annotate("dense", (report["dense"]["non_embedding"], report["dense"]["ndcg@10"]), fontsize=7,
                textcoords="offset points", xytext=(-10, 6))
    ax.legend(fontsize=8, loc="lower right")  # the curve rises to the right: that corner stays clear of it
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


_SAME_IN_A_CURVE = ("teacher", "profile", "users", "seed", "plan", "stages", "ranking")
"""Protocol fields every merged report must share (one dense model, one evaluation, one plan kind)."""
_SAME_SETTINGS = ("distill_preset", "prune_overrides")
"""RetentionConfig fields every merged report must share besides the protocol's: one configuration's points,
whatever their targets."""


def _results_depend_on(key: str, value: Any) -> Any:
    """A setting as far as the figures depend on it: prune overrides without the distillation's operational
    fields (checkpoints, compiled layers, where the teacher's outputs were computed: pruning.distill)."""
    if key != "prune_overrides" or not isinstance(value, dict):
        return value
    from pruning.distill import OPERATIONAL_FIELDS

    return {path: v for path, v in value.items() if path.removeprefix("distill.") not in OPERATIONAL_FIELDS}


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One curve from reports that pruned the same dense model to different targets with the same settings
    (``bench/gpu_arms.sh`` runs such reports at once, a target an arm): their points together, in target order.
    Refuses reports of another dense model, users, protocol or distillation settings, and a target in two."""
    if not reports:
        raise ValueError("no reports to merge")
    first = reports[0]
    for report in reports[1:]:
        for key in _SAME_IN_A_CURVE:
            if report["protocol"][key] != first["protocol"][key]:
                raise ValueError(f"reports differ in {key}: {first['protocol'][key]!r} and {report['protocol'][key]!r}")
        for key in _SAME_SETTINGS:
            mine, theirs = (_results_depend_on(key, r["protocol"]["config"][key]) for r in (first, report))
            if mine != theirs:
                raise ValueError(f"reports differ in their settings' {key}: {mine!r} and {theirs!r}; a curve is one "
                                 "configuration's points")
        if report["dense"] != first["dense"]:
            raise ValueError("reports differ in the dense model's evaluation")
    points = sorted((point for report in reports for point in report["points"]), key=lambda point: point["target"])
    targets = [point["target"] for point in points]
    if len(set(targets)) < len(targets):
        raise ValueError(f"a target in two reports: {sorted(t for t in set(targets) if targets.count(t) > 1)}")
    protocol = {**first["protocol"], "complete": all(r["protocol"].get("complete", True) for r in reports),
                "minutes": max(r["protocol"]["minutes"] for r in reports),  # run at once: the longest
                "merged": len(reports), "config": {**first["protocol"]["config"], "targets": targets}}
    merged = {**first, "protocol": protocol, "points": points,
              "sasrec": next((r["sasrec"] for r in reports if r.get("sasrec")), None)}
    unfinished = [r["in_progress"] for r in reports if r.get("in_progress")]
    merged.pop("in_progress", None)
    if unfinished:  # a cut-short report's unfinished point: the first one's (the table shows one)
        merged["in_progress"] = unfinished[0]
    return merged


def sasrec_from(report: dict[str, Any], source: dict[str, Any], name: str) -> dict[str, Any]:
    """The SASRec line of a curve whose own run left it out (a GPU lease has no minutes for it), from
    ``bench.sasrec_masking``'s report of the same protocol: its SASRec scored on every test user with the past
    excluded. Refused unless the source's MostPop on every test user (same split and masking) is the curve's to
    1e-6, the check that both ranked the same users the same way (a curve on a sample of users fails it)."""
    if "sasrec_masked" not in source or "mostpop_masked" not in source:
        raise ValueError(f"{name}: not a bench.sasrec_masking report (no sasrec_masked / mostpop_masked)")
    mine, theirs = report["mostpop"]["ndcg@10"], source["mostpop_masked"]["ndcg@10"]
    if abs(mine - theirs) > 1e-6:
        raise ValueError(f"{name}: MostPop NDCG@10 {theirs:.6f} there against {mine:.6f} here: other users or protocol")
    return {"ndcg@10": source["sasrec_masked"]["ndcg@10"], "hr@10": source["sasrec_masked"]["hr@10"],
            "epochs": source.get("sasrec_epochs_run"), "source": name,
            "note": "another run's SASRec on the same users and protocol (its MostPop equals this curve's)"}


def compare_reports(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Two configurations' reports on the same test users (``bench/gpu_arms.sh``'s arms), model by model: the
    dense models, each target's final point (whatever stages led there: gradual against three stages) and each
    earlier stage evaluated in both, with :func:`bench.report.paired_test` of their per-user NDCG@10 (B − A).
    Refuses reports of other users and reports written before per-user ranks were kept (2026-11-27)."""
    from bench.report import paired_test, per_user_ndcg

    for key in ("users", "seed"):
        if a["protocol"][key] != b["protocol"][key]:
            raise ValueError(f"reports differ in {key}: {a['protocol'][key]!r} and {b['protocol'][key]!r}")

    def models(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
        found = {"dense": report["dense"]}
        for point in report["points"]:
            for stage in point.get("stages", [])[:-1]:
                found[f"{point_label(point)}, after {stage['stage']}"] = stage
            found[point_label(point)] = point
        return found

    in_a, in_b = models(a), models(b)
    if len(a["points"]) == len(b["points"]) == 1:  # one point each under other names (another plan): pair them
        only_a, only_b = point_label(a["points"][0]), point_label(b["points"][0])
        if only_a != only_b:
            in_a[f"{only_a} | {only_b}"], in_b[f"{only_a} | {only_b}"] = a["points"][0], b["points"][0]
    rows = []
    for label in [name for name in in_a if name in in_b]:
        if "ranks" not in in_a[label] or "ranks" not in in_b[label]:
            raise ValueError(f"{label}: a report without per-user ranks (written before 2026-11-27); nothing to pair")
        test = paired_test(per_user_ndcg(in_a[label]["ranks"]), per_user_ndcg(in_b[label]["ranks"]))
        rows.append({"model": label, **test})
    if not rows:
        raise ValueError("the reports share no model to compare")
    return rows


def compare_markdown(rows: list[dict[str, Any]], names: tuple[str, str]) -> str:
    a, b = names
    lines = [f"| model | NDCG@10 {a} | NDCG@10 {b} | {b} − {a} [95% CI] | users better ({a} / {b}) | Wilcoxon p | t-test p |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        low, high = row["ci95"]
        lines.append(f"| {row['model']} | {row['mean_a']:.4f} | {row['mean_b']:.4f} | {row['mean_difference']:+.4f} "
                     f"[{low:+.4f}, {high:+.4f}] | {row['users_better_a']} / {row['users_better_b']} | "
                     f"{row['wilcoxon_p']:.2f} | {row['ttest_p']:.2f} |")
    return "\n".join(lines) + "\n"


def _dumps(report: dict[str, Any]) -> str:
    """Indented JSON with every list of integers (the per-user ranks) on one line."""
    return re.sub(r"\[\s+(-?\d+(?:,\s+-?\d+)*)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]",
                  json.dumps(report, indent=2))


def write_report(report: dict[str, Any], output: Path) -> None:
    """report.json, report.md and retention.png in ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(_dumps(report))
    (output / "report.md").write_text(markdown(report))
    plot(report, output / "retention.png")


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", nargs="?", help="the dense fine-tuned artifact")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="REPORT_DIR",
                        help="prune nothing: one curve from these reports' points (the same dense model and settings, "
                             "other targets: bench/gpu_arms.sh's target arms), written to --output")
    parser.add_argument("--sasrec-from", type=Path, default=None, metavar="SASREC_MASKING_JSON",
                        help="with --merge: the SASRec line from python -m bench.sasrec_masking's report (every test "
                             "user, past excluded), where the curve's run had none; refused unless its MostPop is the curve's")
    parser.add_argument("--compare", nargs=2, type=Path, default=None, metavar=("REPORT_DIR_A", "REPORT_DIR_B"),
                        help="measure nothing: pair two reports on the same users (arms of one lease), model by model, "
                             "per-user NDCG@10 (B − A) with a bootstrap interval and Wilcoxon/t p-values")
    parser.add_argument("--profile", default="cpu", help="pruning profile: cpu or gpu")
    parser.add_argument("--targets", default=None,
                        help="comma-separated shares of non-embedding parameters to remove "
                             f"[{','.join(f'{t:g}' for t in DEFAULT_TARGETS)}]")
    parser.add_argument("--plan", choices=sorted(PLAN_KINDS), default="uniform",
                        help="uniform: a point per target, each its uniform plan; default: one point, the plan prunerec "
                             "prune uses without --target (no --targets then)")
    parser.add_argument("--dense-only", action="store_true",
                        help="evaluate the dense model (and MostPop) only, no target: its evaluation in WORK/eval is "
                             "what other runs on the same users reuse (copied into their WORK/eval)")
    parser.add_argument("--users", type=int, default=300, help="seeded test users (0 = all)")
    parser.add_argument("--sasrec-epochs", type=int, default=0, help="most RecBole SASRec epochs (0: no SASRec line)")
    parser.add_argument("--distill-minutes", type=float, default=None,
                        help="most minutes of distillation per stage (sizes the run to a GPU lease; [the profile's])")
    parser.add_argument("--distill-steps", type=int, default=None, help="most distillation steps per stage")
    parser.add_argument("--distill-epochs", type=float, default=None,
                        help="most passes over the distillation examples per stage ([the profile's])")
    parser.add_argument("--distill-examples", type=int, default=None,
                        help="seeded subset of training examples to distil on ([the profile's])")
    parser.add_argument("--distill-preset", default=None, help="distillation preset over the profile (prunerec)")
    parser.add_argument("--distill-batch-size", type=int, default=None,
                        help="rows a distillation step (packed rows under the gpu profile; [the profile's])")
    parser.add_argument("--distill-lr", type=float, default=None, help="distillation learning rate ([the profile's])")
    parser.add_argument("--distill-hidden-weight", type=float, default=None,
                        help="weight of the hidden-state term (prunerec prune --distill-hidden-weight; [0: logits only])")
    parser.add_argument("--every-stage", action="store_true",
                        help="evaluate every stage of every point, not only the last (which stage loses the quality)")
    parser.add_argument("--distill-vocab", choices=["full", "catalog"], default=None,
                        help="the loss over the whole vocabulary or the catalog's tokens (prunerec prune --distill-vocab)")
    parser.add_argument("--distill-lr-decay", choices=["constant", "linear", "cosine"], default=None,
                        help="the distillation rate after its warm-up (prunerec prune --distill-lr-decay): a decay runs "
                             "to each stage's planned steps, so pair it with --distill-steps, not --distill-minutes")
    parser.add_argument("--gradual", type=int, default=None, help="cuts per width/depth stage (prunerec prune --gradual)")
    parser.add_argument("--distill-compile", action="store_true", default=None,
                        help="the students' layers compiled while distilling (prunerec prune --distill-compile; for a GPU)")
    parser.add_argument("--distill-teacher-outputs", default=None, metavar="DIR",
                        help="teacher outputs computed once before the first stage and shared through DIR with every "
                             "run of the same teacher, examples and settings (prunerec prune --distill-teacher-outputs; "
                             "bench/gpu_arms.sh's arms)")
    parser.add_argument("--distill-prefill-batch-size", type=int, default=None,
                        help="examples a teacher forward pass when prefilling (prunerec prune --distill-prefill-batch-size)")
    parser.add_argument("--no-reconstruct", action="store_true",
                        help="the paper's plain cut: no least-squares refit after each cut (prunerec prune --no-reconstruct)")
    parser.add_argument("--prune-seed", type=int, default=None,
                        help="seed of every point's calibration sample, distillation windows and batch order (prunerec "
                             "prune --seed; [0]): runs differing only in it measure what the training's randomness "
                             "moves; the test users stay --users' seeded sample")
    parser.add_argument("--device", default=None)
    parser.add_argument("--data", type=Path, default=None, help="prepared dataset [ml-100k]")
    parser.add_argument("--work", default=None)
    parser.add_argument("--output", default=None)
    return parser


OPTION_PATHS = {"distill_minutes": "distill.max_minutes", "distill_steps": "distill.max_steps",
                "distill_epochs": "distill.epochs",
                "distill_examples": "distill.examples", "distill_vocab": "distill.vocab",
                "distill_lr_decay": "distill.lr_decay", "gradual": "gradual", "distill_compile": "distill.compile",
                "distill_batch_size": "distill.batch_size", "distill_lr": "distill.lr",
                "distill_hidden_weight": "distill.hidden_weight", "distill_teacher_outputs": "distill.teacher_outputs",
                "distill_prefill_batch_size": "distill.prefill_batch_size"}
"""Command-line options given straight to every point's PruneConfig (dotted paths)."""


def prune_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The PruneConfig values the command line sets over the profile (what was not given is left out)."""
    overrides: dict[str, Any] = {path: getattr(args, name) for name, path in OPTION_PATHS.items()
                                 if getattr(args, name) is not None}
    if args.no_reconstruct:
        overrides["reconstruct"] = False
    if args.prune_seed is not None:  # one seed for every sampling of the run, as prunerec prune --seed gives it
        overrides.update({f"{part}.seed": args.prune_seed for part in ("calibration", "distill", "trsp")})
    return overrides


def main() -> None:
    parser = command_line()
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.compare:
        try:
            rows = compare_reports(*[json.loads((path / "report.json").read_text()) for path in args.compare])
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        table = compare_markdown(rows, (args.compare[0].name, args.compare[1].name))
        if args.output:
            Path(args.output).mkdir(parents=True, exist_ok=True)
            (Path(args.output) / "compare.json").write_text(json.dumps(rows, indent=2))
            (Path(args.output) / "compare.md").write_text(table)
        print(table)
        return
    if args.merge:
        if args.output is None:
            parser.error("--merge needs --output, the merged report's directory")
        try:
            merged = merge_reports([json.loads((path / "report.json").read_text()) for path in args.merge])
            if args.sasrec_from is not None:
                merged["sasrec"] = sasrec_from(merged, json.loads(args.sasrec_from.read_text()), str(args.sasrec_from))
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        write_report(merged, Path(args.output))
        print(markdown(merged))
        return
    if args.teacher is None:
        parser.error("give the dense artifact (or --merge REPORT_DIR ...)")
    from recdata.prep import prepare
    from recdata.sources import read_ml100k

    if args.plan == "default" and (args.targets is not None or args.dense_only):
        parser.error("--plan default is one point of its own size: no --targets, no --dense-only")
    given = args.targets if args.targets is not None else ",".join(f"{t:g}" for t in DEFAULT_TARGETS)
    try:
        targets = [] if args.dense_only or args.plan == "default" else [float(t) for t in given.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--targets must be numbers, got {args.targets!r}")
    if not targets and not args.dense_only and args.plan == "uniform":
        parser.error("--targets is empty (the dense model alone: --dense-only)")
    data = PreparedData.load(args.data) if args.data else prepare(read_ml100k())
    overrides = prune_overrides(args)
    config = RetentionConfig(teacher=args.teacher, profile=args.profile, targets=targets, plan=args.plan,
                             users=args.users or None,
                             sasrec_epochs=args.sasrec_epochs, every_stage=args.every_stage, distill_preset=args.distill_preset,
                             prune_overrides=overrides, device=args.device, work=args.work, output=args.output)
    try:
        report = run_retention(config, data)
    except ValueError as exc:
        parser.error(str(exc))
    print(markdown(report))


if __name__ == "__main__":
    main()
