"""Reconstruction against the plain cut: one dense model pruned twice, everything else equal.

PruneRec (arXiv 2507.07064, §3) cuts and then distils; :mod:`pruning.reconstruct` refits the weights that
read each cut (and, after the depth cut, the kept layers' ``down_proj``) by least squares before distilling.
This measures what that buys: the same dense artifact, plan, calibration set, distillation examples and
budget (the pruning profile's), once with ``reconstruct = False`` (the paper's plain cut) and once with it.
Per stage: the validation CE right after the cut (the first point of the stage's distillation record, on the
profile's validation users) and after distillation (best); for the last stage, the recommendation loss on every
validation user (``bench.valid_loss``'s measure) and the pure LLM on the test users (catalog head, history
excluded), with the dense model's figures and MostPop on the same users. Resumable under
``runs/reconstruction-<profile>`` (``plain``, ``reconstruct``).

    python -m bench.reconstruction runs/bench-cpu/0-dense --profile cpu --calibration-samples 16   # ~40 min, 2 cores
    python -m bench.reconstruction runs/dense --profile gpu                                          # one GPU

Writes ``report.json`` and ``report.md`` to ``bench/results/<profile>/reconstruction``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmrec.artifact import read_manifest
from recdata.prep import PreparedData

logger = logging.getLogger(__name__)

ARMS = {"plain": False, "reconstruct": True}
"""Run name -> PruneConfig.reconstruct."""


@dataclass
class ReconstructionConfig:
    """One reconstruction ablation."""

    teacher: str
    """The dense fine-tuned artifact both arms are pruned and distilled from."""
    profile: str = "cpu"
    """Pruning profile of both arms (calibration, distillation)."""
    stages: list[str] = field(default_factory=lambda: ["attn", "mlp", "depth"])
    users: int | None = None
    """Seeded test users of the last stages' evaluation (None = all)."""
    seed: int = 0
    prune_overrides: dict[str, Any] = field(default_factory=dict)
    """PruneConfig values over the profile (dotted paths, e.g. {'calibration.samples': 16})."""
    device: str | None = None
    work: str | None = None
    """Pruning runs and evaluations [runs/reconstruction-<profile>]."""
    output: str | None = None
    """Report directory [bench/results/<profile>/reconstruction]."""


def validation_ce(artifact: Path, data: PreparedData, device: str | None) -> float:
    """Mean CE of the next item's title (and end token) over one example per validation user."""
    from llmrec.recommender import Recommender
    from pruning.calibration import batches, mean_ce
    from pruning.examples import split_examples

    recommender = Recommender.from_artifact(str(artifact), device=device or "cpu")
    examples = split_examples(data, recommender.encoder, "valid")
    return mean_ce(recommender.model, batches(examples, recommender.pad_id, 32))


def cached_validation_ce(artifact: Path, data: PreparedData, device: str | None, path: Path) -> float:
    """:func:`validation_ce`, reused from ``path`` while the artifact's build is the same."""
    from llmrec.artifact import artifact_identity

    identity = artifact_identity(artifact)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("artifact_identity") == identity:
            return float(stored["mean_ce"])
    loss = validation_ce(artifact, data, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"mean_ce": loss, "users": len(data.splits["valid"]), "artifact_identity": identity}))
    return loss


def stage_row(path: Path) -> dict[str, Any]:
    """A stage's parameters and its distillation record: validation CE after the cut and after distilling."""
    manifest = read_manifest(path)
    distilled = manifest["distillation"]
    history = distilled.get("valid_history") or []
    return {"stage": path.name, "non_embedding": manifest["params"]["non_embedding"],
            "valid_ce_after_cut": history[0]["valid_loss"] if history else None,
            "valid_ce_distilled": distilled.get("best_valid_loss"), "steps": distilled.get("steps"),
            "reconstructed": manifest["pruning"].get("reconstructed", False)}


def run_ablation(config: ReconstructionConfig, data: PreparedData) -> dict[str, Any]:
    """Prune both arms, evaluate, write the report; returns it."""
    from bench.run import evaluate_cached
    from llmrec.configs import merge
    from pruning.prune import PROFILES, PruneConfig
    from pruning.prune import run as prune

    if config.profile not in PROFILES:
        raise ValueError(f"unknown pruning profile {config.profile!r}; choose one of {sorted(PROFILES)}")
    work = Path(config.work or f"runs/reconstruction-{config.profile}")
    output = Path(config.output or f"bench/results/{config.profile}/reconstruction")
    started = time.perf_counter()
    teacher = Path(config.teacher)
    dense_eval = evaluate_cached(teacher, data, config.users, config.seed, "catalog", work / "eval" / "dense.json",
                                 config.device)
    dense = {"non_embedding": read_manifest(teacher)["params"]["non_embedding"],
             "valid_ce": cached_validation_ce(teacher, data, config.device, work / "eval" / "dense.valid_ce.json"),
             "ndcg@10": dense_eval["metrics"]["ndcg@10"], "hr@10": dense_eval["metrics"]["hr@10"]}
    arms: dict[str, Any] = {}
    for name, reconstruct in ARMS.items():
        prune_config = merge(PruneConfig, PROFILES[config.profile], {"device": config.device, **config.prune_overrides},
                             output=str(work / name), teacher=config.teacher, stages=list(config.stages),
                             evaluate=False, reconstruct=reconstruct)
        logger.info("reconstruction ablation: arm %s", name)
        paths = prune(prune_config, data)
        last = paths[-1]
        evaluation = evaluate_cached(last, data, config.users, config.seed, "catalog", work / "eval" / f"{name}.json",
                                     config.device)
        ndcg = evaluation["metrics"]["ndcg@10"]
        arms[name] = {"stages": [stage_row(p) for p in paths], "artifact": str(last),
                      "valid_ce": cached_validation_ce(last, data, config.device, work / "eval" / f"{name}.valid_ce.json"),
                      "ndcg@10": ndcg, "hr@10": evaluation["metrics"]["hr@10"],
                      "retention": ndcg / dense["ndcg@10"] if dense["ndcg@10"] else None}
    report = {
        "protocol": {"teacher": config.teacher, "profile": config.profile, "users": dense_eval["protocol"]["users"],
                     "valid_users": len(data.splits["valid"]), "seed": config.seed, "stages": config.stages,
                     "ranking": "full catalog, 20 beams, history excluded, catalog head, no assistant",
                     "minutes": round((time.perf_counter() - started) / 60, 1), "config": asdict(config)},
        "dense": dense, "mostpop": dense_eval["mostpop"], "arms": arms,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(report, indent=2))
    (output / "report.md").write_text(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    """Both arms stage by stage, then the last stages against dense and MostPop."""
    protocol = report["protocol"]
    lines = [f"# Reconstruction against the plain cut ({protocol['profile']} profile)", "",
             "| arm | stage | non-embedding params | validation CE after the cut | after distilling (steps) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for name, arm in report["arms"].items():
        for row in arm["stages"]:
            cut = f"{row['valid_ce_after_cut']:.3f}" if row["valid_ce_after_cut"] is not None else "–"
            best = f"{row['valid_ce_distilled']:.3f}" if row["valid_ce_distilled"] is not None else "–"
            lines.append(f"| {name} | {row['stage']} | {row['non_embedding']:,} | {cut} | {best} ({row['steps']}) |")
    dense = report["dense"]
    lines += ["", f"Last stage: CE on all {protocol['valid_users']} validation users; pure LLM on {protocol['users']} "
              "test users (catalog head, history excluded).", "",
              "| model | CE (valid) | NDCG@10 | HR@10 | retention |", "| --- | ---: | ---: | ---: | ---: |",
              f"| dense | {dense['valid_ce']:.3f} | {dense['ndcg@10']:.4f} | {dense['hr@10']:.4f} | 1.000 |"]
    for name, arm in report["arms"].items():
        retention = f"{arm['retention']:.3f}" if arm["retention"] is not None else "–"
        lines.append(f"| {name} | {arm['valid_ce']:.3f} | {arm['ndcg@10']:.4f} | {arm['hr@10']:.4f} | {retention} |")
    lines.append(f"| MostPop | | {report['mostpop']['ndcg@10']:.4f} | {report['mostpop']['hr@10']:.4f} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="the dense fine-tuned artifact")
    parser.add_argument("--profile", default="cpu", help="pruning profile: cpu or gpu")
    parser.add_argument("--stages", default="attn,mlp,depth")
    parser.add_argument("--users", type=int, default=0, help="seeded test users (0 = all)")
    parser.add_argument("--calibration-samples", type=int, default=None, help="calibration samples ([the profile's])")
    parser.add_argument("--distill-steps", type=int, default=None, help="most distillation steps per stage")
    parser.add_argument("--device", default=None)
    parser.add_argument("--data", type=Path, default=None, help="prepared dataset [ml-100k]")
    parser.add_argument("--work", default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from recdata.prep import prepare
    from recdata.sources import read_ml100k

    data = PreparedData.load(args.data) if args.data else prepare(read_ml100k())
    overrides: dict[str, Any] = {}
    if args.calibration_samples is not None:
        overrides["calibration.samples"] = args.calibration_samples
    if args.distill_steps is not None:
        overrides["distill.max_steps"] = args.distill_steps
    config = ReconstructionConfig(teacher=args.teacher, profile=args.profile,
                                  stages=[s for s in args.stages.split(",") if s], users=args.users or None,
                                  prune_overrides=overrides, device=args.device, work=args.work, output=args.output)
    try:
        report = run_ablation(config, data)
    except ValueError as exc:
        parser.error(str(exc))
    print(markdown(report))


if __name__ == "__main__":
    main()
