"""What every ``prunerec`` command shares: the one-line error exit and the dataset option."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer


def fail(message: str) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with code 2 (a usage or configuration error)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


DataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="Prepared dataset directory (from `prunerec data`); default: ml-100k, LOO split."),
]


def load_data(data: Path | None):
    """The prepared dataset at ``data``, or ml-100k with the default preparation; bad input exits with 2."""
    from recdata.errors import DataFormatError
    from recdata.prep import PreparedData, prepare
    from recdata.sources import read_ml100k

    try:
        if data is None:
            return prepare(read_ml100k())
        return PreparedData.load(data)
    except (DataFormatError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
