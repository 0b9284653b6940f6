"""The offline commands: ``train``, ``peft-search``, ``prune``, ``pipeline``, ``evaluate``, ``assist``.

Each maps to one stage's ``run(config, inputs)``; its options are derived from the stage's config
(:mod:`cli.options`), and :func:`llmrec.configs.merge` is the one place where a profile meets the options
given. Imported only when one of these commands runs (see :class:`cli.main.LazyCommands`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli.common import DataOpt, fail, load_data
from cli.options import options_of, with_options
from llmrec.configs import merge
from pruning import assist as assist_stage
from pruning import prune as prune_stage
from pruning import train as train_stage
from pruning.assist import AssistConfig
from pruning.evaluate import EvalConfig
from pruning.peft_search import PeftSearchConfig
from pruning.prune import PruneConfig
from pruning.train import TrainConfig

app = typer.Typer(add_completion=False)

TRAIN_OPTIONS = options_of(TrainConfig, exclude=["output", "profile", "lora_targets"], profiles=train_stage.PROFILES)

PEFT_OPTIONS = options_of(PeftSearchConfig, exclude=["output", "assignment"])

# One --seed seeds calibration, distillation and TRSP alike; the old option names stay as aliases.
PRUNE_RENAMES = {f"ratios.{name}": f"keep-{name.replace('_', '-')}" for name in
                 ("kv_groups", "heads_per_group", "hidden", "mlp", "layers")}
PRUNE_ALIASES: dict[str, str | tuple[str, ...]] = {
    "distill.max_steps": "--distill-steps", "distill.max_minutes": "--distill-minutes", "distill.alpha": "--alpha",
    "distill.temperature": "--temperature", "trsp.steps_per_round": "--trsp-round-steps",
}
PRUNE_OPTIONS = options_of(PruneConfig, exclude=["output", "teacher", "calibration.seed", "distill.seed", "trsp.seed"],
                           names=PRUNE_RENAMES, aliases=PRUNE_ALIASES, profiles=prune_stage.PROFILES)
PIPELINE_OPTIONS = options_of(PruneConfig, include=["stages", "target", "gradual", "eval_users", "depth_method", "device"],
                              profiles=prune_stage.PROFILES)

ASSIST_OPTIONS = options_of(AssistConfig, exclude=["artifact"], profiles=assist_stage.PROFILES)

EVAL_OPTIONS = options_of(EvalConfig, exclude=["artifact"],
                          names={"exclude_history": "--exclude-history/--include-history"})


def _profile(profiles: dict[str, dict[str, Any]], name: str | None) -> dict[str, Any] | None:
    if name is None:
        return None
    if name not in profiles:
        fail(f"unknown profile {name!r}; choose one of {sorted(profiles)}")
    return profiles[name]


def _lora_targets(value: str, given: dict[str, Any]) -> None:
    """``--lora-targets``: comma-separated module names, or a PrunePEFT search result (whose rank and alpha
    apply unless given)."""
    from pruning.peft_search import read_search

    path = Path(value)
    if not path.is_file():
        given["lora_targets"] = [t.strip() for t in value.split(",") if t.strip()]
        return
    try:
        searched = read_search(path)
    except (ValueError, json.JSONDecodeError) as exc:
        fail(f"--lora-targets {path}: {exc}")
    given["lora_targets"] = list(searched["target_modules"])
    given.setdefault("lora_r", int(searched["rank"]) if "rank" in searched else None)
    given.setdefault("lora_alpha", int(searched["alpha"]) if "alpha" in searched else None)


@app.command()
@with_options(TRAIN_OPTIONS)
def train(
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact directory to write.")],
    data: DataOpt = None,
    profile: Annotated[Optional[str], typer.Option(help=f"Preset: {', '.join(train_stage.PROFILES)} (cpu: minutes on 2 cores; gpu: the full run; tiny: a smoke test). Options given override it.")] = None,
    lora_targets: Annotated[Optional[str], typer.Option(help="Comma-separated module names for LoRA, or a JSON file with target_modules (from peft-search; its rank and alpha apply unless given).")] = None,
    **options: Any,
) -> None:
    """Fine-tune an LLM as a generative next-item recommender and write an artifact."""
    from llmrec.model import ModelNotFoundError

    given = TRAIN_OPTIONS.given(options)
    if lora_targets:
        _lora_targets(lora_targets, given)
    try:
        config = merge(TrainConfig, _profile(train_stage.PROFILES, profile), given, output=str(output),
                       profile=profile or "custom")
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    prepared = load_data(data)
    try:
        path = train_stage.run(config, prepared)
    except (ModelNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"artifact written to {path}")


@app.command("peft-search")
@with_options(PEFT_OPTIONS)
def peft_search(
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON file to write; pass it to `prunerec train --method lora --lora-targets`.")],
    data: DataOpt = None,
    assignment: Annotated[Optional[Path], typer.Option(help="JSON file mapping '<attn|mlp>/<shallow|middle|deep>' to lists of criteria (magnitude, zeros, threshold, activation, gradient, taylor).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [cpu].")] = None,
    **options: Any,
) -> None:
    """PrunePEFT (arXiv 2506.07587): choose LoRA placement by iteratively pruning candidate adapters to a budget."""
    from llmrec.model import ModelNotFoundError
    from pruning.peft_search import search

    try:
        given = PEFT_OPTIONS.given(options)
        if assignment:
            given["assignment"] = json.loads(assignment.read_text())
        config = merge(PeftSearchConfig, None, given, output=str(output))
        record = search(config, load_data(data), device=device)
    except (ModelNotFoundError, ValueError, TypeError, FileNotFoundError, json.JSONDecodeError) as exc:
        fail(str(exc))
    typer.echo(
        f"{len(record['target_modules'])} of {record['all_candidates']} adapters kept, "
        f"{record['trainable_params']:,} trainable parameters (budget {record['budget_params']:,}); per cell: "
        f"{record['kept_per_cell']}\nwritten to {output}; train with: prunerec train --method lora --lora-targets {output} ..."
    )


def prune_config(output: Path, teacher: Path, profile: str | None, given: dict[str, Any], seed: int,
                 distill_preset: str | None = None) -> PruneConfig:
    """The one merge of the compression run's configuration (used by prune and pipeline): defaults, the
    profile, the distillation preset, then the options given."""
    from pruning.distill import with_preset

    seeds = {"calibration.seed": seed, "distill.seed": seed, "trsp.seed": seed}
    try:
        return merge(PruneConfig, with_preset(_profile(prune_stage.PROFILES, profile), distill_preset), given,
                     output=str(output), teacher=str(teacher), **seeds)
    except (ValueError, TypeError) as exc:
        fail(str(exc))


def _run_prune(config: PruneConfig, data: Path | None) -> None:
    """Run the stages and print the per-stage table; configuration problems exit with code 2."""
    prepared = load_data(data)
    try:
        paths = prune_stage.run(config, prepared)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(prune_stage.format_summary(prune_stage.summarize(config.teacher, paths)))


SeedOpt = Annotated[int, typer.Option(help="Seed of calibration, distillation and TRSP sampling (and of fine-tuning in pipeline).")]
PresetOpt = Annotated[Optional[str], typer.Option(help="Distillation preset over the profile: 'prunerec' (PruneRec's released recipe: 0.2·CE + 0.8·KL at T = 1, lr 3e-4, up to 3 epochs over every training example, patience 1; the profile's time cap stays). Options given override it.")]


@app.command()
@with_options(PRUNE_OPTIONS)
def prune(
    teacher: Annotated[Path, typer.Argument(help="Dense fine-tuned artifact (input of the first stage and distillation teacher).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory; stage artifacts go to <output>/<n>-<stage>.")],
    data: DataOpt = None,
    profile: Annotated[Optional[str], typer.Option(help=f"Preset: {', '.join(prune_stage.PROFILES)} (cpu: minutes on 2 cores). Options given override it.")] = None,
    seed: SeedOpt = 0,
    distill_preset: PresetOpt = None,
    **options: Any,
) -> None:
    """Compress an artifact with the PruneRec stages, each recovered by distillation (resumable)."""
    _run_prune(prune_config(output, teacher, profile, PRUNE_OPTIONS.given(options), seed, distill_preset), data)


@app.command()
@with_options(PIPELINE_OPTIONS)
def pipeline(
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory: 0-dense, then one artifact per stage.")],
    data: DataOpt = None,
    model: Annotated[str, typer.Option(help="Base model: 'smollm2-135m' (embedded) or a local HF directory.")] = "smollm2-135m",
    profile: Annotated[str, typer.Option(help="Preset for fine-tuning and compression: cpu, gpu or tiny (fine-tuning only; compression then uses cpu).")] = "cpu",
    seed: SeedOpt = 0,
    distill_preset: PresetOpt = None,
    **options: Any,
) -> None:
    """Fine-tune, then attn -> mlp -> depth with distillation, evaluating every stage; resumable."""
    from llmrec.artifact import is_artifact

    prune_profile = profile if profile in prune_stage.PROFILES else "cpu"
    config = prune_config(output, output / "0-dense", prune_profile, PIPELINE_OPTIONS.given(options), seed,
                          distill_preset)
    dense = output / "0-dense"
    if not is_artifact(dense):
        try:
            train_config = merge(TrainConfig, _profile(train_stage.PROFILES, profile), None, output=str(dense),
                                 model=model, seed=seed, profile=profile)
            train_stage.run(train_config, load_data(data))
        except ValueError as exc:
            fail(str(exc))
    _run_prune(config, data)


@app.command()
@with_options(EVAL_OPTIONS)
def evaluate(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    data: DataOpt = None,
    **options: Any,
) -> None:
    """HR/NDCG/MRR@{1,5,10,20} over the full catalog, with MostPop on the same users."""
    from pruning.evaluate import format_table, run

    try:
        config = merge(EvalConfig, None, EVAL_OPTIONS.given(options), artifact=str(artifact))
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    prepared = load_data(data)
    try:
        result = run(config, prepared)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(format_table(result, name=artifact.name))


@app.command()
@with_options(ASSIST_OPTIONS)
def assist(
    artifact: Annotated[Path, typer.Argument(help="LLM artifact that gets the assistant (written into <artifact>/assistant).")],
    data: DataOpt = None,
    profile: Annotated[Optional[str], typer.Option(help=f"Preset: {', '.join(assist_stage.PROFILES)} (cpu: a 50-user weight sweep on 2 cores). Options given override it.")] = None,
    **options: Any,
) -> None:
    """D3's assisted decoding: train a SASRec beside an artifact and choose its weight in the beam scores."""
    try:
        config = merge(AssistConfig, _profile(assist_stage.PROFILES, profile), ASSIST_OPTIONS.given(options),
                       artifact=str(artifact))
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    prepared = load_data(data)
    try:
        assist_stage.run(config, prepared)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    from llmrec.artifact import read_manifest

    entry = read_manifest(artifact)["assistant"]
    sweep = ", ".join(f"w={w}: {v:.4f}" for w, v in entry["valid_ndcg@10_by_weight"].items()) or "not swept"
    alone = entry.get("assistant_valid_ndcg@10_sweep_users")
    typer.echo(f"assistant written to {artifact}/assistant; weight {entry['weight']} "
               f"(valid NDCG@10 of the assisted LLM: {sweep}; the assistant alone: "
               + (f"{alone:.4f} on the same users, " if alone is not None else "")
               + f"{entry['assistant_valid_ndcg@10']:.4f} on every validation user)")
