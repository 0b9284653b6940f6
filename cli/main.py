"""The ``prunerec`` command line: one subcommand per pipeline stage (typer).

    prunerec data       prepare interactions into sequences and splits
    prunerec train      fine-tune an LLM as a generative recommender
    prunerec evaluate   HR/NDCG/MRR over the full catalog, MostPop beside
    prunerec recommend  top-k for a history from an artifact
    prunerec prune      PruneRec compression of an artifact (attn, mlp, depth + distillation)
    prunerec pipeline   fine-tune -> prune -> evaluate every stage
    prunerec serve      the HTTP service with A/B arms
"""

from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="prunerec: fine-tune, compress and serve LLM-based sequential recommenders.",
    pretty_exceptions_enable=False,
)
logger = logging.getLogger("prunerec")


class Source(str, Enum):
    ml100k = "ml100k"
    recbole = "recbole"
    table = "table"
    amazon = "amazon"


class Split(str, Enum):
    loo = "loo"
    temporal = "temporal"


class Method(str, Enum):
    full = "full"
    lora = "lora"


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


DataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="Prepared dataset directory (from `prunerec data`); default: ml-100k, LOO split."),
]


def _load_data(data: Path | None):
    from recdata.errors import DataFormatError
    from recdata.prep import PreparedData, prepare
    from recdata.sources import read_ml100k

    try:
        if data is None:
            return prepare(read_ml100k())
        return PreparedData.load(data)
    except (DataFormatError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@app.command()
def data(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the prepared dataset to.")],
    source: Annotated[Source, typer.Option(help="Input format; ml100k is embedded in the recbole wheel.")] = Source.ml100k,
    interactions: Annotated[Optional[Path], typer.Option(help="Interactions file (.inter, .csv/.tsv/.parquet, reviews .jsonl).")] = None,
    items: Annotated[Optional[Path], typer.Option(help="Items file (.item, .csv/.tsv/.parquet, metadata .jsonl).")] = None,
    column: Annotated[
        Optional[list[str]],
        typer.Option(help="Column mapping for --source table, OURS=THEIRS; ours: user_id, item_id, timestamp, rating, title."),
    ] = None,
    title_field: Annotated[Optional[str], typer.Option(help="Title field of a RecBole .item file.")] = None,
    rating_threshold: Annotated[Optional[float], typer.Option(help="Keep interactions with rating >= this.")] = None,
    user_core: Annotated[int, typer.Option(help="Iterative k-core: minimum interactions per user (0 = off).")] = 0,
    item_core: Annotated[int, typer.Option(help="Iterative k-core: minimum interactions per item (0 = off).")] = 0,
    split: Annotated[Split, typer.Option(help="loo: leave-one-out by time (RecBole LS, TO); temporal: global 80/10/10.")] = Split.loo,
) -> None:
    """Prepare interactions: filter, chronological sequences, catalog, split."""
    from recdata.errors import DataFormatError
    from recdata.prep import PrepConfig, prepare
    from recdata.sources import read_amazon, read_ml100k, read_recbole, read_table

    try:
        if source is Source.ml100k:
            raw = read_ml100k()
        else:
            if interactions is None or items is None:
                _fail(f"--source {source.value} needs --interactions and --items")
            assert interactions is not None and items is not None
            if source is Source.recbole:
                raw = read_recbole(interactions, items, title_field=title_field)
            elif source is Source.table:
                mapping = {}
                for pair in column or []:
                    if "=" not in pair:
                        _fail(f"--column expects OURS=THEIRS, got {pair!r}")
                    ours, theirs = pair.split("=", 1)
                    mapping[ours.strip()] = theirs.strip()
                raw = read_table(interactions, items, mapping)
            else:
                raw = read_amazon(interactions, items)
        config = PrepConfig(rating_threshold=rating_threshold, user_core=user_core, item_core=item_core, split=split.value)
        prepared = prepare(raw, config)
    except (DataFormatError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    prepared.save(output)
    typer.echo(json.dumps(prepared.summary(), indent=2))


@app.command()
def train(
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact directory to write.")],
    data: DataOpt = None,
    model: Annotated[str, typer.Option(help="Base model: 'smollm2-135m' (embedded) or a local HF directory.")] = "smollm2-135m",
    profile: Annotated[Optional[str], typer.Option(help="Preset: cpu (minutes on 2 cores), gpu (full run), tiny (smoke). Explicit options override it.")] = None,
    template: Annotated[Optional[str], typer.Option(help="Prompt template: compact (packable) or d3 (BIGRec/D3).")] = None,
    max_history: Annotated[Optional[int], typer.Option(help="Items of history per prompt [10].")] = None,
    method: Annotated[Optional[Method], typer.Option(help="full fine-tuning or lora [full].")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank [8].")] = None,
    lora_alpha: Annotated[Optional[int], typer.Option(help="LoRA alpha [16].")] = None,
    lora_targets: Annotated[Optional[str], typer.Option(help="Comma-separated module names for LoRA, or a JSON file with target_modules (from peft-search).")] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help="Pack user windows (compact template) [auto].")] = None,
    max_train_examples: Annotated[Optional[int], typer.Option(help="Seeded subset of training examples.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the training examples [1].")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimiser steps.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after this much training time.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Micro-batch size per process [8].")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps [1].")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate [1e-4].")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Steps between validation evaluations and checkpoints [50].")] = None,
    valid_examples: Annotated[Optional[int], typer.Option(help="Validation users for the loss [200].")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Evaluations without improvement before stopping (0 = off) [3].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed [0].")] = None,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Checkpoint directory [<output>.ckpt].")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from an existing checkpoint.")] = True,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep the checkpoint directory after success.")] = False,
) -> None:
    """Fine-tune an LLM as a generative next-item recommender and write an artifact."""
    from dataclasses import asdict

    from llmrec.model import ModelNotFoundError
    from pruning.train import TrainConfig, apply_profile, run

    config = TrainConfig(output=str(output), model=model)
    if profile:
        try:
            config = apply_profile(config, profile)
        except ValueError as exc:
            _fail(str(exc))
    overrides = {
        "template": template, "max_history": max_history, "method": method.value if method else None,
        "lora_r": lora_r, "lora_alpha": lora_alpha, "packing": packing, "max_train_examples": max_train_examples,
        "epochs": epochs, "max_steps": max_steps, "max_minutes": max_minutes, "batch_size": batch_size,
        "grad_accum": grad_accum, "lr": lr, "eval_every": eval_every, "valid_examples": valid_examples,
        "patience": patience, "seed": seed, "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
    }
    values = {**asdict(config), **{k: v for k, v in overrides.items() if v is not None}}
    values.update(resume=resume, keep_checkpoints=keep_checkpoints)
    if lora_targets:
        path = Path(lora_targets)
        if path.is_file():
            from pruning.peft_search import read_search

            try:
                searched = read_search(path)
            except (ValueError, json.JSONDecodeError) as exc:
                _fail(f"--lora-targets {path}: {exc}")
            values["lora_targets"] = list(searched["target_modules"])
            # the rank and alpha the search scored at, unless given explicitly
            values["lora_r"] = lora_r if lora_r is not None else int(searched.get("rank", values["lora_r"]))
            values["lora_alpha"] = lora_alpha if lora_alpha is not None else int(searched.get("alpha", values["lora_alpha"]))
        else:
            values["lora_targets"] = [t.strip() for t in lora_targets.split(",") if t.strip()]
    config = TrainConfig(**values)
    prepared = _load_data(data)
    try:
        path = run(config, prepared)
    except (ModelNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"artifact written to {path}")


@app.command("peft-search")
def peft_search(
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON file to write; pass it to `prunerec train --method lora --lora-targets`.")],
    data: DataOpt = None,
    model: Annotated[str, typer.Option(help="Base model the LoRA will be trained on: 'smollm2-135m' or a local HF directory.")] = "smollm2-135m",
    template: Annotated[str, typer.Option(help="Prompt template (as in train).")] = "compact",
    max_history: Annotated[int, typer.Option(help="Items of history per prompt.")] = 10,
    rank: Annotated[int, typer.Option(help="LoRA rank of every candidate adapter.")] = 8,
    alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    projections: Annotated[str, typer.Option(help="Comma-separated candidate projections in every layer.")] = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    budget: Annotated[float, typer.Option(help="Trainable-parameter budget as a share of all candidates' LoRA parameters.")] = 0.25,
    budget_params: Annotated[Optional[int], typer.Option(help="Trainable-parameter budget in parameters (overrides --budget), e.g. a plain LoRA's count to match.")] = None,
    drop_fraction: Annotated[float, typer.Option(help="Share of the live adapters dropped per round.")] = 0.3,
    steps_per_round: Annotated[int, typer.Option(help="Training steps before each round's scoring.")] = 6,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option(help="LoRA learning rate during the search.")] = 1e-3,
    examples: Annotated[int, typer.Option(help="Seeded subset of training examples the search trains on.")] = 256,
    assignment: Annotated[Optional[Path], typer.Option(help="JSON file mapping '<attn|mlp>/<shallow|middle|deep>' to lists of criteria (magnitude, zeros, threshold, activation, gradient, taylor).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (LoRA init, example sampling, batch order).")] = 0,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [cpu].")] = None,
) -> None:
    """PrunePEFT (arXiv 2506.07587): choose LoRA placement by iteratively pruning candidate adapters to a budget."""
    from llmrec.model import ModelNotFoundError
    from pruning.peft_search import PeftSearchConfig, search

    try:
        extra = {"assignment": json.loads(assignment.read_text())} if assignment else {}
        config = PeftSearchConfig(
            output=str(output), model=model, template=template, max_history=max_history, rank=rank, alpha=alpha,
            projections=[p.strip() for p in projections.split(",") if p.strip()], budget=budget,
            budget_params=budget_params, drop_fraction=drop_fraction, steps_per_round=steps_per_round,
            batch_size=batch_size, lr=lr, examples=examples, seed=seed, **extra,
        )
        record = search(config, _load_data(data), device=device)
    except (ModelNotFoundError, ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        _fail(str(exc))
    typer.echo(
        f"{len(record['target_modules'])} of {record['all_candidates']} adapters kept, "
        f"{record['trainable_params']:,} trainable parameters (budget {record['budget_params']:,}); per cell: "
        f"{record['kept_per_cell']}\nwritten to {output}; train with: prunerec train --method lora --lora-targets {output} ..."
    )


@app.command()
def bench(
    profile: Annotated[str, typer.Option(help="cpu (<= 60 min on 2 cores, 300 seeded users, SASRec capped at 5 epochs) or gpu (one GPU, every user).")] = "cpu",
    output: Annotated[Optional[Path], typer.Option(help="Report directory [bench/results/<profile>].")] = None,
    work: Annotated[Optional[Path], typer.Option(help="Artifacts and evaluations; a re-run resumes [runs/bench-<profile>].")] = None,
    users: Annotated[Optional[int], typer.Option(help="Seeded test users for every quality number [profile].")] = None,
    sasrec_epochs: Annotated[Optional[int], typer.Option(help="Most SASRec epochs [profile].")] = None,
    latency_requests: Annotated[Optional[int], typer.Option(help="Requests per concurrency level and arm [profile].")] = None,
    head: Annotated[str, typer.Option(help="Head mode of the served arms (full or catalog).")] = "catalog",
    peft: Annotated[Optional[bool], typer.Option("--peft/--no-peft", help="Also train plain LoRA (q,v) and PrunePEFT's LoRA at the same trainable-parameter count [gpu: on, cpu: off].")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda for compression, evaluation, SASRec and serving [profile: gpu = cuda; cpu = auto].")] = None,
    load_seconds: Annotated[Optional[float], typer.Option(help="Seconds of the load check (64 clients, deadlines, dense + pruned at 50/50); 0 skips it [cpu 45, gpu 30].")] = None,
) -> None:
    """Dense, every stage, TRSP, SASRec and MostPop on the same users; served latency; overload; report.json/md and plots."""
    from bench.run import bench_config, run_bench

    try:
        config = bench_config(profile, output=str(output) if output else None, work=str(work) if work else None,
                              users=users, sasrec_epochs=sasrec_epochs, latency_requests=latency_requests, head=head, peft=peft,
                              load_seconds=load_seconds,
                              device=device)
        written = run_bench(config, _load_data(None))
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo((written[1]).read_text())
    typer.echo("written: " + ", ".join(str(p) for p in written))


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="Artifact A (the reference).")],
    b: Annotated[Path, typer.Argument(help="Artifact B.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Report directory.")] = Path("bench/results/compare"),
    data: DataOpt = None,
    users: Annotated[Optional[int], typer.Option(help="Seeded test users [300; 0 = all].")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the user sample.")] = 0,
    head: Annotated[str, typer.Option(help="Head mode for quality and serving (full or catalog).")] = "catalog",
    latency_requests: Annotated[int, typer.Option(help="Requests per concurrency level and arm.")] = 24,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Also measure latency through the HTTP service.")] = True,
) -> None:
    """Offline A/B: the bench tables and plots for two artifacts, plus a paired test on per-user NDCG@10."""
    from bench.report import markdown
    from bench.run import compare as run_compare

    try:
        report = run_compare(str(a), str(b), _load_data(data), output, users=users or None, seed=seed, head=head,
                             latency_requests=latency_requests, serve=serve)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(markdown(report))


@app.command("vocab-check")
def vocab_check(
    artifact: Annotated[Path, typer.Argument(help="A vocabulary-pruned artifact (its last stage is vocab).")],
    data: DataOpt = None,
) -> None:
    """Report the catalog titles of a dataset that the artifact's pruned vocabulary cannot tokenise (exit 1)."""
    from llmrec.vocabulary import VocabularyCoverageError, check_artifact_catalog

    prepared = _load_data(data)
    try:
        problems = check_artifact_catalog(artifact, prepared.catalog.titles)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if not problems:
        typer.echo(f"all {len(prepared.catalog)} titles are inside the artifact's vocabulary")
        return
    for problem in problems:
        typer.echo(f"{problem['title']}: needs pruned tokens {problem['missing_tokens'] or '(a pruned BPE intermediate)'}")
    typer.secho(str(VocabularyCoverageError(problems)), fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _prune_config(
    output: Path, teacher: Path, stages: str, profile: str | None, target: float | None, ratios: dict[str, float | None],
    calibration_samples: int | None, distill_examples: int | None, distill_steps: int | None,
    distill_minutes: float | None, distill_lr: float | None, alpha: float | None, temperature: float | None,
    evaluate: bool, eval_users: int | None, seed: int, depth_method: str = "greedy", trsp: dict[str, Any] | None = None,
    device: str | None = None,
):
    from dataclasses import replace

    from pruning.plan import DEFAULT_RATIOS
    from pruning.prune import PruneConfig, apply_profile

    config = PruneConfig(output=str(output), teacher=str(teacher), stages=[s.strip() for s in stages.split(",") if s.strip()])
    if profile:
        try:
            config = apply_profile(config, profile)
        except ValueError as exc:
            _fail(str(exc))
    given = {k: v for k, v in ratios.items() if v is not None}
    try:
        config.ratios = replace(DEFAULT_RATIOS, **given)
    except ValueError as exc:
        _fail(str(exc))
    config.target = target
    if calibration_samples is not None:
        config.calibration.samples = calibration_samples
    config.calibration.seed = seed
    updates: dict[str, Any] = {"examples": distill_examples, "max_steps": distill_steps, "max_minutes": distill_minutes,
               "lr": distill_lr, "alpha": alpha, "temperature": temperature}
    config.distill = replace(config.distill, seed=seed, **{k: v for k, v in updates.items() if v is not None})
    config.evaluate = evaluate
    if eval_users is not None:
        config.eval_users = eval_users
    if depth_method not in ("greedy", "trsp", "elder"):
        _fail(f"--depth-method must be greedy, trsp or elder, not {depth_method!r}")
    config.depth_method = depth_method  # type: ignore[assignment]
    config.trsp = replace(config.trsp, seed=seed, **{k: v for k, v in (trsp or {}).items() if v is not None})
    config.device = device
    return config


def _run_prune(config, prepared) -> None:
    """Run the stages and print the per-stage table; configuration problems exit with code 2."""
    from pruning.prune import format_summary, run, summarize

    try:
        paths = run(config, prepared)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(format_summary(summarize(config.teacher, paths)))


StagesOpt = Annotated[str, typer.Option(help="Comma-separated stages in order: attn (heads + residual width), mlp, depth, vocab (embedding/LM head/tokenizer cut to the template + catalog titles).")]
TargetOpt = Annotated[Optional[float], typer.Option(help="Share of non-embedding parameters to remove (e.g. 0.95); derives a uniform plan and overrides the keep ratios.")]
KvOpt = Annotated[Optional[float], typer.Option(help="Keep ratio of KV groups per layer [1/3].")]
HpgOpt = Annotated[Optional[float], typer.Option(help="Keep ratio of query heads in each kept group [1.0].")]
HiddenOpt = Annotated[Optional[float], typer.Option(help="Keep ratio of the residual width [0.5].")]
MlpOpt = Annotated[Optional[float], typer.Option(help="Keep ratio of the MLP width [0.25].")]
LayersOpt = Annotated[Optional[float], typer.Option(help="Keep ratio of decoder layers [1/3].")]
CalOpt = Annotated[Optional[int], typer.Option(help="Calibration samples drawn from the training prompts [128; cpu profile 32].")]
DexOpt = Annotated[Optional[int], typer.Option(help="Training examples to distil on [512].")]
DstepsOpt = Annotated[Optional[int], typer.Option(help="Distillation steps per stage (cap).")]
DminOpt = Annotated[Optional[float], typer.Option(help="Distillation minutes per stage (cap).")]
DlrOpt = Annotated[Optional[float], typer.Option(help="Distillation learning rate [3e-4].")]
AlphaOpt = Annotated[Optional[float], typer.Option(help="Weight of the hard-label CE in the distillation loss [0.5].")]
TempOpt = Annotated[Optional[float], typer.Option(help="Distillation temperature T [2.0].")]
EvalOpt = Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="Evaluate the teacher and every stage on the test split.")]
EvalUsersOpt = Annotated[Optional[int], typer.Option(help="Seeded sample of test users for per-stage evaluation [100; gpu profile: all].")]
PruneProfileOpt = Annotated[Optional[str], typer.Option(help="Preset: cpu (minutes on 2 cores) or gpu. Explicit options override it.")]
DepthMethodOpt = Annotated[str, typer.Option(help="Depth stage: greedy (PruneRec, calibration loss), trsp (gated selection + identity regularisation, arXiv 2505.18232) or elder (trsp with lambda1 = 0). Non-greedy results go to <n>-depth-<method>.")]
Lambda1Opt = Annotated[Optional[float], typer.Option(help="TRSP: L1 weight on the live gates in the selection stage [0.05].")]
Lambda2Opt = Annotated[Optional[float], typer.Option(help="TRSP: weight of the identity penalty on the chosen layers [1.0].")]
RoundStepsOpt = Annotated[Optional[int], typer.Option(help="TRSP: gate-training steps per selection round [8].")]
StageTwoOpt = Annotated[Optional[int], typer.Option(help="TRSP: most weight-training steps of the identity stage [200; cpu 100].")]
StageTwoMinOpt = Annotated[Optional[float], typer.Option(help="TRSP: time budget of the identity stage in minutes [none; cpu 4].")]
RecoveryOpt = Annotated[bool, typer.Option("--trsp-recovery/--no-trsp-recovery", help="TRSP/ELDeR: distil after removing the layers, like the other stages.")]
PruneDeviceOpt = Annotated[Optional[str], typer.Option(help="cpu or cuda: where scoring and distillation run [auto: cuda when available].")]


@app.command()
def prune(
    teacher: Annotated[Path, typer.Argument(help="Dense fine-tuned artifact (input of the first stage and distillation teacher).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory; stage artifacts go to <output>/<n>-<stage>.")],
    data: DataOpt = None,
    stages: StagesOpt = "attn,mlp,depth",
    profile: PruneProfileOpt = None,
    target: TargetOpt = None,
    keep_kv_groups: KvOpt = None,
    keep_heads_per_group: HpgOpt = None,
    keep_hidden: HiddenOpt = None,
    keep_mlp: MlpOpt = None,
    keep_layers: LayersOpt = None,
    calibration_samples: CalOpt = None,
    distill_examples: DexOpt = None,
    distill_steps: DstepsOpt = None,
    distill_minutes: DminOpt = None,
    distill_lr: DlrOpt = None,
    alpha: AlphaOpt = None,
    temperature: TempOpt = None,
    evaluate: EvalOpt = True,
    eval_users: EvalUsersOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of calibration and distillation sampling.")] = 0,
    depth_method: DepthMethodOpt = "greedy",
    trsp_lambda1: Lambda1Opt = None,
    trsp_lambda2: Lambda2Opt = None,
    trsp_round_steps: RoundStepsOpt = None,
    trsp_stage_two_steps: StageTwoOpt = None,
    trsp_stage_two_minutes: StageTwoMinOpt = None,
    trsp_recovery: RecoveryOpt = True,
    device: PruneDeviceOpt = None,
) -> None:
    """Compress an artifact with the PruneRec stages, each recovered by distillation (resumable)."""
    ratios = {"kv_groups": keep_kv_groups, "heads_per_group": keep_heads_per_group, "hidden": keep_hidden,
              "mlp": keep_mlp, "layers": keep_layers}
    trsp = {"lambda1": trsp_lambda1, "lambda2": trsp_lambda2, "steps_per_round": trsp_round_steps,
            "stage_two_steps": trsp_stage_two_steps, "stage_two_minutes": trsp_stage_two_minutes, "recovery": trsp_recovery}
    config = _prune_config(output, teacher, stages, profile, target, ratios, calibration_samples, distill_examples,
                           distill_steps, distill_minutes, distill_lr, alpha, temperature, evaluate, eval_users, seed,
                           depth_method, trsp, device)
    _run_prune(config, _load_data(data))


@app.command()
def pipeline(
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory: 0-dense, then one artifact per stage.")],
    data: DataOpt = None,
    model: Annotated[str, typer.Option(help="Base model: 'smollm2-135m' (embedded) or a local HF directory.")] = "smollm2-135m",
    profile: Annotated[str, typer.Option(help="Preset for fine-tuning and compression: cpu, gpu or tiny (fine-tuning only; compression then uses cpu).")] = "cpu",
    stages: StagesOpt = "attn,mlp,depth",
    target: TargetOpt = None,
    eval_users: EvalUsersOpt = None,
    seed: Annotated[int, typer.Option(help="Random seed of every stage.")] = 0,
    depth_method: DepthMethodOpt = "greedy",
    device: PruneDeviceOpt = None,
) -> None:
    """Fine-tune, then attn -> mlp -> depth with distillation, evaluating every stage; resumable."""
    from pruning.train import TrainConfig, apply_profile
    from pruning.train import run as train_run

    prepared = _load_data(data)
    dense = output / "0-dense"
    from llmrec.artifact import is_artifact

    if not is_artifact(dense):
        try:
            train_config = apply_profile(TrainConfig(output=str(dense), model=model, seed=seed), profile)
            train_run(train_config, prepared)
        except ValueError as exc:
            _fail(str(exc))
    prune_profile = profile if profile in ("cpu", "gpu") else "cpu"
    config = _prune_config(output, dense, stages, prune_profile, target, {}, None, None, None, None, None, None, None,
                           True, eval_users, seed, depth_method, device=device)
    _run_prune(config, prepared)


@app.command()
def evaluate(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    data: DataOpt = None,
    split: Annotated[str, typer.Option(help="test or valid.")] = "test",
    num_beams: Annotated[int, typer.Option(help="Beams = length of the ranked list (>= 20 for reported numbers).")] = 20,
    users: Annotated[Optional[int], typer.Option(help="Seeded sample of users (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the user sample.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Users decoded together.")] = 8,
    exclude_history: Annotated[bool, typer.Option("--exclude-history/--include-history", help="Remove past items from rankings.")] = True,
    output: Annotated[Optional[Path], typer.Option(help="Metrics JSON path [<artifact>/eval/<split>.json].")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [auto].")] = None,
    head: Annotated[str, typer.Option(help="full: exact log-probabilities over the vocabulary; catalog: LM head over the catalog's tokens only (renormalised); catalog-fullnorm: a check equal to full.")] = "catalog",
) -> None:
    """HR/NDCG/MRR@{1,5,10,20} over the full catalog, with MostPop on the same users."""
    from pruning.evaluate import EvalConfig, format_table, run

    if split not in ("test", "valid"):
        _fail("--split must be test or valid")
    prepared = _load_data(data)
    config = EvalConfig(
        artifact=str(artifact), split=split, num_beams=num_beams, users=users, seed=seed, batch_size=batch_size,  # type: ignore[arg-type]
        exclude_history=exclude_history, output=str(output) if output else None, device=device, head=head,
    )
    try:
        result = run(config, prepared)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(format_table(result, name=artifact.name))


@app.command()
def recommend(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    history: Annotated[list[str], typer.Option("--history", help="A past item, id or exact title; repeat, oldest first.")],
    k: Annotated[int, typer.Option(help="Items to return.")] = 5,
    num_beams: Annotated[int, typer.Option(help="Beams (>= k).")] = 20,
    exclude_history: Annotated[bool, typer.Option("--exclude-history/--include-history", help="Never recommend a history item.")] = True,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [auto].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Top-k next items for one history."""
    from llmrec.recommender import Recommender
    from recdata.catalog import UnknownItemsError

    try:
        recommender = Recommender.from_artifact(artifact, device=device)
        indices = recommender.catalog.resolve(history)
        ranked = recommender.recommend([indices], k=k, num_beams=num_beams, exclude=[indices] if exclude_history else None)[0]
    except (FileNotFoundError, UnknownItemsError, ValueError) as exc:
        _fail(str(exc))
    rows = [
        {"rank": r + 1, "item_id": recommender.catalog.item_ids[i], "title": recommender.catalog.titles[i], "score": round(s, 4)}
        for r, (i, s) in enumerate(ranked)
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            typer.echo(f"{row['rank']:>3}  {row['item_id']:>8}  {row['score']:>9.4f}  {row['title']}")


@app.command()
def serve(
    models: Annotated[list[str], typer.Option("--models", help="An arm as NAME=ARTIFACT_DIR; repeat for several arms (or set PRUNEREC_MODELS).")] = [],  # noqa: B006
    weights: Annotated[list[str], typer.Option("--weights", help="Traffic weight as NAME=W; repeat (default: equal).")] = [],  # noqa: B006
    shadow: Annotated[Optional[str], typer.Option(help="Arm that answers a copy of every request off the response path.")] = None,
    salt: Annotated[Optional[str], typer.Option(help="Salt of the sticky A/B assignment hash.")] = None,
    admin_token: Annotated[Optional[str], typer.Option(help="Bearer token for /admin routes (or PRUNEREC_ADMIN_TOKEN).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port, logged).")] = 8000,
    max_batch_size: Annotated[Optional[int], typer.Option(help="Requests decoded together per arm [16].")] = None,
    max_wait_ms: Annotated[Optional[float], typer.Option(help="How long a batch waits for more requests [5].")] = None,
    max_queue: Annotated[Optional[int], typer.Option(help="Requests waiting per arm before new ones get 503 [64].")] = None,
    request_timeout_ms: Annotated[Optional[float], typer.Option(help="Default deadline of a request; past it: 503, never decoded [30000].")] = None,
    model_threads: Annotated[Optional[str], typer.Option(help="shared (one model thread for all arms) or per-arm [shared].")] = None,
    num_beams: Annotated[Optional[int], typer.Option(help="Beams per request [20].")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [auto; bf16 on CUDA].")] = None,
    torch_threads: Annotated[Optional[int], typer.Option(help="CPU threads of each model thread's torch pool [one per core].")] = None,
) -> None:
    """Serve top-k recommendations over HTTP from one or more artifacts, with A/B assignment.

    The port is bound first (a taken port fails at once); the models then load in the background while
    /healthz answers and /readyz says 503 until every arm is in. If loading fails, the server exits with 1.
    """
    import socket

    import uvicorn
    from pydantic import ValidationError

    from app.main import create_app
    from app.settings import Settings

    def pairs(values: list[str], what: str) -> dict[str, str]:
        out = {}
        for value in values:
            if "=" not in value:
                _fail(f"{what} expects NAME=VALUE, got {value!r}")
            name, _, rest = value.partition("=")
            out[name.strip()] = rest.strip()
        return out

    overrides: dict[str, Any] = {}
    if models:
        overrides["models"] = pairs(models, "--models")
    if weights:
        try:
            overrides["weights"] = {k: float(v) for k, v in pairs(weights, "--weights").items()}
        except ValueError:
            _fail("--weights values must be numbers")
    for key, value in {"shadow": shadow, "salt": salt, "admin_token": admin_token, "max_batch_size": max_batch_size,
                       "max_wait_ms": max_wait_ms, "max_queue": max_queue, "request_timeout_ms": request_timeout_ms,
                       "model_threads": model_threads, "num_beams": num_beams, "device": device,
                       "torch_threads": torch_threads}.items():
        if value is not None:
            overrides[key] = value
    try:
        settings = Settings(**overrides)
    except (ValidationError, ValueError) as exc:
        _fail(str(exc))
    if not settings.models:
        _fail("no arms: pass --models NAME=ARTIFACT_DIR (or set PRUNEREC_MODELS)")
    for name, path in settings.models.items():
        if not Path(path, "prunerec.json").is_file():
            _fail(f"arm {name}: {path} is not a prunerec artifact")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    load_failed: list[BaseException] = []

    def stop_server(exc: BaseException) -> None:
        load_failed.append(exc)
        server.should_exit = True

    server = uvicorn.Server(uvicorn.Config(create_app(settings, on_load_failure=stop_server), log_level="info"))
    logger.info("listening on http://%s:%d (models loading)", host, sock.getsockname()[1])
    server.run(sockets=[sock])
    if load_failed:
        typer.secho(f"error: the models failed to load: {load_failed[0]}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def run_cli() -> None:  # console-script entry point
    app(prog_name="prunerec")


if __name__ == "__main__":
    run_cli()
