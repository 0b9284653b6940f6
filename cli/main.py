"""The ``prunerec`` command line: one subcommand per pipeline stage (typer; DESIGN.md §2).

    prunerec data         prepare interactions into sequences and splits
    prunerec train        fine-tune an LLM as a generative recommender
    prunerec peft-search  PrunePEFT: where LoRA goes
    prunerec prune        PruneRec compression of an artifact (attn, mlp, depth + distillation)
    prunerec pipeline     fine-tune -> prune -> evaluate every stage
    prunerec evaluate     HR/NDCG/MRR over the full catalog, MostPop beside
    prunerec bench        the whole benchmark; prunerec compare: two artifacts side by side
    prunerec recommend    top-k for a history from an artifact
    prunerec serve        the HTTP service with A/B arms

The offline commands live in :mod:`cli.offline` and :mod:`cli.benchmark` and are imported only when one of
them runs (:class:`LazyCommands`), so that ``prunerec serve`` loads ``app``, ``llmrec`` and ``recdata`` and
never ``pruning``, ``bench`` or peft, and the serving images need not carry them. Options of the stage
commands are derived from the stage configs (:mod:`cli.options`).
"""

from __future__ import annotations

import importlib
import json
import logging
import socket
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from app.settings import Settings
from cli.common import DataOpt, fail, load_data
from cli.options import options_of, with_options
from recdata.prep import PrepConfig

logger = logging.getLogger("prunerec")

LAZY_COMMANDS = {
    "train": "cli.offline", "peft-search": "cli.offline", "prune": "cli.offline", "pipeline": "cli.offline",
    "evaluate": "cli.offline", "assist": "cli.offline", "bench": "cli.benchmark", "compare": "cli.benchmark",
}
"""Command name -> the module whose typer app defines it."""


class LazyCommands(TyperGroup):
    """The root group: the commands above are imported on first use (also through ``group.commands[name]``).
    Where their packages are missing (a serving image carries app/llmrec/recdata/cli only) they are listed as
    unavailable instead of failing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _CommandTable(self.commands)

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        try:
            return self.commands[cmd_name]
        except KeyError:
            return None


class _CommandTable(dict):
    """The group's name -> command table; a lazy command is imported when first looked up."""

    def __missing__(self, name: str) -> Any:
        if name not in LAZY_COMMANDS:
            raise KeyError(name)
        try:
            module = importlib.import_module(LAZY_COMMANDS[name])
        except ModuleNotFoundError as exc:
            return _unavailable(name, exc.name or "a package")  # not cached: it may be installed later
        group = typer.main.get_command(module.app)
        commands = getattr(group, "commands", None)
        command = commands[name] if commands is not None else group
        self[name] = command
        return command


def _unavailable(name: str, missing: str) -> Any:
    """A stand-in command that says why the real one cannot run here."""
    stub = typer.Typer(add_completion=False)

    @stub.command(name, help=f"(not available here: {missing} is not installed)")
    def unavailable() -> None:
        fail(f"`prunerec {name}` needs the {missing} package, which this installation lacks")

    return typer.main.get_command(stub)


app = typer.Typer(
    cls=LazyCommands,
    add_completion=False,
    no_args_is_help=True,
    help="prunerec: fine-tune, compress and serve LLM-based sequential recommenders.",
    pretty_exceptions_enable=False,
)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Source(str, Enum):
    ml100k = "ml100k"
    recbole = "recbole"
    table = "table"
    amazon = "amazon"


PREP_OPTIONS = options_of(PrepConfig)


@app.command()
@with_options(PREP_OPTIONS)
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
    **options: Any,
) -> None:
    """Prepare interactions: filter, chronological sequences, catalog, split."""
    from llmrec.configs import merge
    from recdata.errors import DataFormatError
    from recdata.prep import prepare
    from recdata.sources import read_amazon, read_ml100k, read_recbole, read_table

    try:
        config = merge(PrepConfig, None, PREP_OPTIONS.given(options))
        if source is Source.ml100k:
            raw = read_ml100k()
        else:
            if interactions is None or items is None:
                fail(f"--source {source.value} needs --interactions and --items")
            if source is Source.recbole:
                raw = read_recbole(interactions, items, title_field=title_field)
            elif source is Source.table:
                mapping = {}
                for pair in column or []:
                    if "=" not in pair:
                        fail(f"--column expects OURS=THEIRS, got {pair!r}")
                    ours, theirs = pair.split("=", 1)
                    mapping[ours.strip()] = theirs.strip()
                raw = read_table(interactions, items, mapping)
            else:
                raw = read_amazon(interactions, items)
        prepared = prepare(raw, config)
    except (DataFormatError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    prepared.save(output)
    typer.echo(json.dumps(prepared.summary(), indent=2))


@app.command()
def recommend(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    history: Annotated[list[str], typer.Option("--history", help="A past item, id or exact title; repeat, oldest first.")],
    k: Annotated[int, typer.Option(help="Items to return.")] = 5,
    num_beams: Annotated[int, typer.Option(help="Beams (>= k).")] = 20,
    exclude_history: Annotated[bool, typer.Option("--exclude-history/--include-history", help="Never recommend a history item.")] = True,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [auto].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    assist: Annotated[Optional[bool], typer.Option("--assist/--no-assist", help="Mix in the artifact's SASRec assistant (D3) [when it carries one].")] = None,
) -> None:
    """Top-k next items for one history."""
    from llmrec.recommender import Recommender
    from recdata.catalog import UnknownItemsError

    try:
        recommender = Recommender.from_artifact(artifact, device=device)
        indices = recommender.catalog.resolve(history)
        ranked = recommender.recommend([indices], k=k, num_beams=num_beams, exclude=[indices] if exclude_history else None,
                                       assist=assist)[0]
    except (FileNotFoundError, UnknownItemsError, ValueError) as exc:
        fail(str(exc))
    rows = [
        {"rank": r + 1, "item_id": recommender.catalog.item_ids[i], "title": recommender.catalog.titles[i], "score": round(s, 4)}
        for r, (i, s) in enumerate(ranked)
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            typer.echo(f"{row['rank']:>3}  {row['item_id']:>8}  {row['score']:>9.4f}  {row['title']}")


SERVE_OPTIONS = options_of(Settings, exclude=["models", "weights"])


@app.command()
@with_options(SERVE_OPTIONS)
def serve(
    models: Annotated[list[str], typer.Option("--models", help="An arm as NAME=ARTIFACT_DIR; repeat for several arms (or set PRUNEREC_MODELS).")] = [],  # noqa: B006
    weights: Annotated[list[str], typer.Option("--weights", help="Traffic weight as NAME=W; repeat (default: equal).")] = [],  # noqa: B006
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port, logged).")] = 8000,
    **options: Any,
) -> None:
    """Serve top-k recommendations over HTTP from one or more artifacts, with A/B assignment.

    Every setting can also come from the environment as PRUNEREC_<NAME> (options given here win). The port
    is bound first (a taken port fails at once); the models then load in the background while /healthz
    answers and /readyz says 503 until every arm is in. If loading fails, the server exits with 1.
    """
    import uvicorn
    from pydantic import ValidationError

    from app.main import create_app

    def pairs(values: list[str], what: str) -> dict[str, str]:
        out = {}
        for value in values:
            if "=" not in value:
                fail(f"{what} expects NAME=VALUE, got {value!r}")
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
            fail("--weights values must be numbers")
    overrides.update(SERVE_OPTIONS.given(options))
    try:
        settings = Settings(**overrides)
    except (ValidationError, ValueError) as exc:
        fail(str(exc))
    if not settings.models:
        fail("no arms: pass --models NAME=ARTIFACT_DIR (or set PRUNEREC_MODELS)")
    for name, path in settings.models.items():
        if not Path(path, "prunerec.json").is_file():
            fail(f"arm {name}: {path} is not a prunerec artifact")
    try:
        sock = listening_socket(host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
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


@app.command("vocab-check")
def vocab_check(
    artifact: Annotated[Path, typer.Argument(help="A vocabulary-pruned artifact (its last stage is vocab).")],
    data: DataOpt = None,
) -> None:
    """Report the catalog titles of a dataset that the artifact's pruned vocabulary cannot tokenise (exit 1)."""
    from llmrec.vocabulary import VocabularyCoverageError, check_artifact_catalog

    prepared = load_data(data)
    try:
        problems = check_artifact_catalog(artifact, prepared.catalog.titles)
    except FileNotFoundError as exc:
        fail(str(exc))
    if not problems:
        typer.echo(f"all {len(prepared.catalog)} titles are inside the artifact's vocabulary")
        return
    for problem in problems:
        typer.echo(f"{problem['title']}: needs pruned tokens {problem['missing_tokens'] or '(a pruned BPE intermediate)'}")
    typer.secho(str(VocabularyCoverageError(problems)), fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def listening_socket(host: str, port: int) -> socket.socket:
    """The service's socket, bound (a taken port fails here, before any model loads)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio disables Nagle's algorithm only on sockets that say they are TCP, and the
    # accepted connections inherit this one's; with Nagle on, a kept-alive connection's response (headers and
    # body written apart) waited for the client's delayed ACK: ~40 ms added to every request after the first
    # (measured: /healthz 44 ms on a reused connection, 1 ms on a new one)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def run_cli() -> None:  # console-script entry point
    app(prog_name="prunerec")


if __name__ == "__main__":
    run_cli()
