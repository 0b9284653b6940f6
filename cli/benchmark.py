"""The benchmark commands: ``bench`` (the whole comparison, options derived from :class:`bench.run.BenchConfig`)
and ``compare`` (two artifacts, offline A/B). Imported only when one of them runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bench.run import BENCH_PROFILES, BenchConfig
from cli.common import DataOpt, fail, load_data
from cli.options import options_of, with_options

app = typer.Typer(add_completion=False)

BENCH_OPTIONS = options_of(BenchConfig, exclude=["profile"], profiles=BENCH_PROFILES)


@app.command()
@with_options(BENCH_OPTIONS)
def bench(
    profile: Annotated[str, typer.Option(help=f"Preset: {', '.join(BENCH_PROFILES)} (cpu: <= 60 min on 2 cores, seeded users, SASRec capped; gpu: one GPU, every user). Options given override it.")] = "cpu",
    **options: Any,
) -> None:
    """Dense, every stage, TRSP, SASRec and MostPop on the same users; served latency; overload; report.json/md and plots."""
    from bench.run import bench_config, run_bench

    try:
        config = bench_config(profile, **BENCH_OPTIONS.given(options))
        written = run_bench(config, load_data(None))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        fail(str(exc))
    typer.echo(written[1].read_text())
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
    assist: Annotated[Optional[bool], typer.Option("--assist/--no-assist", help="Score both with their SASRec assistants (D3's assisted decoding; each must carry one) or as pure LLMs [pure].")] = False,
) -> None:
    """Offline A/B: the bench tables and plots for two artifacts, plus a paired test on per-user NDCG@10."""
    from bench.report import markdown
    from bench.run import compare as run_compare

    try:
        report = run_compare(str(a), str(b), load_data(data), output, users=users or None, seed=seed, head=head,
                             latency_requests=latency_requests, serve=serve, assist=assist)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    typer.echo(markdown(report))
