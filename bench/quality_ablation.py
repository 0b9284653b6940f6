"""The quality ablation: one lever of the dense LLM recommender at a time, beside SASRec and MostPop.

Every variant is fine-tuned from the same base model with the benchmark profile's training settings plus
its lever, and evaluated on the same seeded test users (history excluded, full catalog, the catalog head):

- ``baseline``: the training profile as it is;
- ``history-50``: 50 titles of history (SASRec's length) under the prompt-length guard;
- ``ndcg-selection``: early stopping and best weights on validation NDCG@10 instead of the loss;
- ``item-tokens``: a learned collaborative token after each history title (:mod:`llmrec.item_tokens`);
- ``sasrec-tokens``: SASRec's item embeddings through a learned projection as those tokens (LLaRA's hybrid);
- ``exact``: the baseline model, every catalog title scored exactly instead of 20-beam search;
- ``assisted``: the baseline model decoding with D3's SASRec assistant (:mod:`pruning.assist`: trained on the
  training part, its weight chosen on validation users), scores log P_LLM + w × log P_SASRec;
- ``best``: the training levers that beat the baseline, together (and exact ranking and the assistant, each
  if it did).

SASRec (RecBole, CE loss, early stopping) and MostPop are scored on the same users, and the assistant alone
(prunerec's SASRec behind ``assisted``). Resumable: a variant whose artifact exists is not trained again, an
artifact with an assistant keeps it.

    python -m bench.quality_ablation --profile gpu                   # every test user, on a GPU
    python -m bench.quality_ablation --profile cpu --users 100       # minutes per variant on a CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmrec.configs import merge
from recdata.prep import PreparedData

logger = logging.getLogger(__name__)

TRAINING_LEVERS: dict[str, dict[str, Any]] = {
    "history-50": {"max_history": 50},
    "ndcg-selection": {"select_metric": "ndcg@10"},
    "item-tokens": {"item_tokens": "learned"},
    "sasrec-tokens": {"item_tokens": "sasrec"},
}
"""Variant -> the TrainConfig values of its lever (over the profile)."""


@dataclass
class AblationConfig:
    """One ablation run."""

    profile: str = "cpu"
    """Training profile of every variant (cpu, gpu, tiny)."""
    model: str = "smollm2-135m"
    """Base model (alias, HF directory or artifact)."""
    users: int | None = 300
    """Seeded test users (None = all)."""
    seed: int = 0
    device: str | None = None
    """Where evaluation and SASRec run (training follows the training profile's device choice)."""
    sasrec_epochs: int = 50
    """Most SASRec epochs (early stopping usually ends sooner)."""
    exact_users: int | None = None
    """Users of the exact-ranking row (None = the same as users; exact costs minutes per user on a CPU)."""
    variants: list[str] = field(default_factory=lambda: ["baseline", *TRAINING_LEVERS, "exact", "assisted", "best"])
    work: str | None = None
    """Artifacts and evaluations [runs/ablation-<profile>]."""
    output: str | None = None
    """Report directory [bench/results/<profile>/quality_ablation]."""
    train_overrides: dict[str, Any] = field(default_factory=dict)
    """TrainConfig values applied to every variant (e.g. a step budget for a smoke run)."""


def run_ablation(config: AblationConfig, data: PreparedData) -> dict[str, Any]:
    """Train and evaluate the variants; write report.json and report.md; return the report."""
    from bench import sasrec
    from bench.run import evaluate_cached
    from pruning.assist import PROFILES as ASSIST_PROFILES
    from pruning.assist import AssistConfig
    from pruning.assist import run as assist
    from pruning.evaluate import sample_users
    from pruning.train import PROFILES, TrainConfig
    from pruning.train import run as train

    work = Path(config.work or f"runs/ablation-{config.profile}")
    output = Path(config.output or f"bench/results/{config.profile}/quality_ablation")
    if config.profile not in PROFILES:
        raise ValueError(f"unknown profile {config.profile!r}; choose one of {sorted(PROFILES)}")
    rows: dict[str, dict[str, Any]] = {}

    def trained(name: str, lever: dict[str, Any]) -> Path:
        path = work / name
        if not (path / "prunerec.json").is_file():
            started = time.monotonic()
            train(merge(TrainConfig, PROFILES[config.profile], {**config.train_overrides, **lever}, output=str(path),
                        model=config.model, seed=config.seed, profile=config.profile), data)
            logger.info("%s trained in %.1f min", name, (time.monotonic() - started) / 60)
        return path

    def score(name: str, path: Path, lever: dict[str, Any], search: str = "beam", users: int | None = None,
              assist: bool = False) -> None:
        result = evaluate_cached(path, data, users if users is not None else config.users, config.seed, "catalog",
                                 work / "eval" / f"{name}.json", config.device, search, assist)
        manifest = json.loads((path / "prunerec.json").read_text())
        rows[name] = {"lever": lever, "search": search, "users": result["protocol"]["users"],
                      "metrics": result["metrics"], "decode_seconds_per_user": result["seconds_per_user"],
                      "training_minutes": manifest["training"]["minutes"], "artifact": str(path)}
        if assist:
            rows[name]["assist_weight"] = manifest["assistant"]["weight"]

    def with_assistant(path: Path, source: Path | None = None) -> Path:
        """The artifact with its SASRec assistant (trained, or ``source``'s reused with its own weight sweep)."""
        if not json.loads((path / "prunerec.json").read_text()).get("assistant"):
            assist(merge(AssistConfig, ASSIST_PROFILES[config.profile], {"device": config.device},
                         artifact=str(path), source=str(source) if source else None, seed=config.seed), data)
        return path

    baseline = trained("baseline", {})
    score("baseline", baseline, {})
    mostpop = json.loads((work / "eval" / "baseline.json").read_text())["mostpop"]
    for name, lever in TRAINING_LEVERS.items():
        if name in config.variants:
            score(name, trained(name, lever), lever)
    if "exact" in config.variants:
        exact_users = config.exact_users if config.exact_users is not None else config.users
        score("exact", baseline, {"search": "exact"}, "exact", exact_users)
        if exact_users != config.users:  # the beam row on the exact row's users, for a like-for-like pair
            score("baseline@exact-users", baseline, {}, "beam", exact_users)
    if "assisted" in config.variants:
        score("assisted", with_assistant(baseline), {"assist": True}, assist=True)
        from pruning.assist import assistant_metrics

        pairs = sample_users(data.splits["test"], config.users, config.seed)
        rows["assistant alone"] = {"lever": {"llm": False}, "users": len(pairs),
                                   "metrics": assistant_metrics(baseline, data, pairs)}
    if "best" in config.variants:
        base = rows["baseline"]["metrics"]["ndcg@10"]
        helped = [n for n in TRAINING_LEVERS if n in rows and rows[n]["metrics"]["ndcg@10"] > base]
        # exact ranking joins only when it was measured on the same users as the rest (a handful of exact
        # users on a CPU is one hit either way, not a decision)
        exact_helped = ("exact" in rows and "baseline@exact-users" not in rows
                        and rows["exact"]["metrics"]["ndcg@10"] > rows["baseline"]["metrics"]["ndcg@10"])
        assist_helped = "assisted" in rows and rows["assisted"]["metrics"]["ndcg@10"] > base
        # levers setting the same field (the two kinds of item tokens): the better variant's value wins
        helped.sort(key=lambda n: rows[n]["metrics"]["ndcg@10"])
        lever = {k: v for n in helped for k, v in TRAINING_LEVERS[n].items()}
        helped = [n for n in helped if all(lever[k] == v for k, v in TRAINING_LEVERS[n].items())]
        # one lever alone is that variant's model: not trained twice
        path = (work / helped[0] if len(helped) == 1 else trained("best", lever)) if helped else baseline
        if assist_helped:
            with_assistant(path, source=baseline)
        score("best", path, {**lever, **({"search": "exact"} if exact_helped else {}), **({"assist": True} if assist_helped else {})},
              "exact" if exact_helped else "beam", config.exact_users if exact_helped else None, assist_helped)
        rows["best"]["combines"] = helped + (["exact"] if exact_helped else []) + (["assisted"] if assist_helped else [])

    pairs = sample_users(data.splits["test"], config.users, config.seed)
    sasrec_config = sasrec.SASRecConfig(output=str(work / "sasrec"), epochs=config.sasrec_epochs, device=config.device or "cpu")
    cached = work / "sasrec" / "result.json"
    key = {"config": asdict(sasrec_config), "users": config.users, "seed": config.seed}
    if cached.is_file() and json.loads(cached.read_text()).get("key") == key:
        sasrec_result = json.loads(cached.read_text())["result"]
    else:
        sasrec_result = sasrec.run(sasrec_config, data, users=pairs)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"key": key, "result": sasrec_result}, default=str))
    rows["sasrec"] = {"metrics": sasrec_result["metrics"], "users": len(pairs), "epochs_run": sasrec_result["epochs_run"]}
    rows["mostpop"] = {"metrics": mostpop, "users": len(pairs)}

    sasrec_ndcg = rows["sasrec"]["metrics"]["ndcg@10"]
    for row in rows.values():
        row["ndcg@10_vs_sasrec"] = row["metrics"]["ndcg@10"] / sasrec_ndcg if sasrec_ndcg else float("nan")
    report = {"protocol": {"profile": config.profile, "users": len(pairs), "seed": config.seed, "dataset": data.name,
                           "ranking": "full catalog, history excluded, catalog head", "config": asdict(config)},
              "variants": rows}
    write(report, output)
    return report


def markdown(report: dict[str, Any]) -> str:
    protocol = report["protocol"]
    lines = [f"# Quality ablation ({protocol['profile']} profile, {protocol['users']} seeded test users)", "",
             "| variant | lever | users | NDCG@10 | HR@10 | NDCG@10 / SASRec | training min | s/user decoding |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in report["variants"].items():
        m = row["metrics"]
        lever = ", ".join(f"{k}={v}" for k, v in row.get("lever", {}).items()) or "-"
        lines.append(f"| {name} | {lever} | {row.get('users', '')} | {m['ndcg@10']:.4f} | {m['hr@10']:.4f} | "
                     f"{row['ndcg@10_vs_sasrec']:.3f} | {row.get('training_minutes', '')} | "
                     f"{row.get('decode_seconds_per_user', '')} |")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], output: Path) -> list[Path]:
    """report.json, report.md and ndcg.png (NDCG@10 per variant with the SASRec and MostPop lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (output / "report.md").write_text(markdown(report))
    variants = {n: r for n, r in report["variants"].items() if n not in ("sasrec", "mostpop")}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(variants)), 3.5))
    ax.bar(list(variants), [r["metrics"]["ndcg@10"] for r in variants.values()], color="tab:blue")
    for name, style in (("sasrec", "--"), ("mostpop", ":")):
        ax.axhline(report["variants"][name]["metrics"]["ndcg@10"], linestyle=style, color="black", label=name)
    ax.set_ylabel("NDCG@10")
    ax.legend()
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(output / "ndcg.png", dpi=120)
    plt.close(fig)
    return [output / "report.json", output / "report.md", output / "ndcg.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--users", type=int, default=300, help="seeded test users (0 = all)")
    parser.add_argument("--exact-users", type=int, default=None, help="users of the exact row [--users]")
    parser.add_argument("--device", default=None)
    parser.add_argument("--sasrec-epochs", type=int, default=50)
    parser.add_argument("--select-users", type=int, default=None,
                        help="validation users of the ndcg-selection variant's checks [the training default, 200]")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants to run [all: " + ",".join(AblationConfig().variants) + "]")
    parser.add_argument("--data", type=Path, default=None, help="prepared dataset [ml-100k]")
    parser.add_argument("--work", default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from recdata.prep import prepare
    from recdata.sources import read_ml100k

    known = AblationConfig().variants
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else known
    unknown = sorted(set(variants) - set(known))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {known}")
    data = PreparedData.load(args.data) if args.data else prepare(read_ml100k())
    config = AblationConfig(profile=args.profile, model=args.model, users=args.users or None, device=args.device,
                            sasrec_epochs=args.sasrec_epochs, exact_users=args.exact_users, work=args.work,
                            output=args.output, variants=variants,
                            train_overrides={"select_users": args.select_users} if args.select_users else {})
    report = run_ablation(config, data)
    print(markdown(report))


if __name__ == "__main__":
    main()
