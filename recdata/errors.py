"""Errors raised on bad input data, naming the file, line and column at fault."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A data file that cannot be read as promised.

    The message always names the file and, where known, the 1-based line and the column,
    so that a user can open the file at the right place.
    """

    def __init__(
        self, path: str | Path, message: str, line: int | None = None, column: str | None = None
    ) -> None:
        self.path = str(path)
        self.line = line
        self.column = column
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")
