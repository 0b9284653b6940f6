"""Preparation: filtering, titles, chronological sequences, splits and samples.

Protocol (DESIGN.md §3):

- optional rating threshold, then iterative k-core on users and items;
- per-user sequences sorted by time, ties kept in file order (a stable sort, as RecBole does);
- ``loo`` split (default): the last item of each user is test, the one before valid, the rest train;
  identical to RecBole ``eval_args: {split: {LS: valid_and_test}, order: TO, mode: full}``;
- ``temporal`` split (D3): global timestamp quantiles 80/10/10; an interaction is a sample of the
  part its timestamp falls in, with every earlier interaction of the user as history.

A sample is a pair (user index, position in that user's sequence): its history is
``sequence[:position]`` and its target ``sequence[position]``. Storing pairs instead of histories keeps
memory linear in the number of interactions.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from recdata.catalog import Catalog
from recdata.sources import RawData

logger = logging.getLogger(__name__)

SplitName = Literal["train", "valid", "test"]


@dataclass
class PrepConfig:
    """How raw interactions become sequences and samples."""

    rating_threshold: float | None = None
    """Keep interactions with rating >= this value; None keeps all."""
    user_core: int = 0
    """Iterative k-core: users with fewer interactions are dropped (0 = off). Users need >= 3 for LOO."""
    item_core: int = 0
    """Iterative k-core: items with fewer interactions are dropped (0 = off)."""
    split: Literal["loo", "temporal"] = "loo"
    """'loo' leave-one-out by time (RecBole LS valid_and_test, TO) or 'temporal' global 80/10/10."""
    temporal_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train/valid/test shares of the global timeline for the temporal split."""
    append_year_field: str | None = "release_year"
    """Item column appended to titles as ' (YEAR)' when the title does not already end with it."""


def clean_title(title: str) -> str:
    """Unescape HTML entities, collapse whitespace, strip."""
    return re.sub(r"\s+", " ", html.unescape(str(title))).strip()


def disambiguate_titles(titles: list[str]) -> list[str]:
    """Make titles unique by suffixing repeats with ' #2', ' #3', ... in catalog order."""
    seen: dict[str, int] = {}
    taken = set(titles)
    out = []
    for title in titles:
        count = seen.get(title, 0) + 1
        seen[title] = count
        if count == 1:
            out.append(title)
            continue
        candidate = f"{title} #{count}"
        while candidate in taken:
            count += 1
            candidate = f"{title} #{count}"
        taken.add(candidate)
        out.append(candidate)
    return out


def k_core(frame: pd.DataFrame, user_core: int, item_core: int) -> pd.DataFrame:
    """Iteratively drop users and items under their minimum interaction counts until stable."""
    if user_core <= 1 and item_core <= 1:
        return frame
    while True:
        before = len(frame)
        if item_core > 1:
            counts = frame["item_id"].map(frame["item_id"].value_counts())
            frame = frame[counts >= item_core]
        if user_core > 1:
            counts = frame["user_id"].map(frame["user_id"].value_counts())
            frame = frame[counts >= user_core]
        if len(frame) == before:
            return frame


@dataclass
class PreparedData:
    """Sequences over a catalog plus the sample index of each split."""

    name: str
    catalog: Catalog
    users: list[str]
    sequences: list[np.ndarray]
    """Per user, catalog indices in chronological order (int64)."""
    splits: dict[str, np.ndarray]
    """Split name -> (n, 2) int64 array of (user index, position)."""
    train_lengths: np.ndarray
    """Per user, how many leading interactions belong to the training part (int64)."""
    config: PrepConfig = field(default_factory=PrepConfig)
    fingerprint: str = ""

    def history(self, user: int, position: int) -> np.ndarray:
        return self.sequences[user][:position]

    def target(self, user: int, position: int) -> int:
        return int(self.sequences[user][position])

    def train_popularity(self) -> np.ndarray:
        """Interaction counts per catalog item over the training part only (what MostPop may see)."""
        counts = np.zeros(len(self.catalog), dtype=np.int64)
        for seq, length in zip(self.sequences, self.train_lengths, strict=True):
            np.add.at(counts, seq[:length], 1)
        return counts

    def summary(self) -> dict[str, object]:
        return {
            "dataset": self.name,
            "users": len(self.users),
            "items": len(self.catalog),
            "interactions": int(sum(len(s) for s in self.sequences)),
            "split": self.config.split,
            **{f"{name}_samples": len(index) for name, index in self.splits.items()},
            "fingerprint": self.fingerprint,
        }

    # ---- persistence (`prunerec data` writes this; other commands may read it) ----

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.catalog.save(directory / "catalog.parquet")
        rows = [(self.users[u], int(i), p) for u, seq in enumerate(self.sequences) for p, i in enumerate(seq)]
        pd.DataFrame(rows, columns=["user_id", "item_index", "position"]).to_parquet(
            directory / "sequences.parquet", index=False
        )
        np.savez(directory / "splits.npz", train_lengths=self.train_lengths, **self.splits)
        meta = {"name": self.name, "config": asdict(self.config), "fingerprint": self.fingerprint}
        (directory / "prepared.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> PreparedData:
        directory = Path(directory)
        meta_path = directory / "prepared.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not a prepared dataset (no prepared.json); run `prunerec data`")
        meta = json.loads(meta_path.read_text())
        catalog = Catalog.load(directory / "catalog.parquet")
        frame = pd.read_parquet(directory / "sequences.parquet").sort_values(["user_id", "position"], kind="stable")
        users, sequences = [], []
        for user, group in frame.groupby("user_id", sort=False):
            users.append(str(user))
            sequences.append(group["item_index"].to_numpy(dtype=np.int64))
        with np.load(directory / "splits.npz") as npz:
            splits = {k: npz[k] for k in npz.files if k != "train_lengths"}
            train_lengths = npz["train_lengths"]
        config = PrepConfig(**{**meta["config"], "temporal_ratios": tuple(meta["config"]["temporal_ratios"])})
        return cls(meta["name"], catalog, users, sequences, splits, train_lengths, config, meta["fingerprint"])


def _fingerprint(catalog: Catalog, users: list[str], sequences: list[np.ndarray], config: PrepConfig) -> str:
    digest = hashlib.sha256(catalog.fingerprint().encode())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    for user, seq in zip(users, sequences, strict=True):
        digest.update(user.encode())
        digest.update(seq.tobytes())
    return digest.hexdigest()[:16]


def prepare(raw: RawData, config: PrepConfig | None = None) -> PreparedData:
    """Filter, build the catalog and chronological sequences, and index the split's samples."""
    config = config or PrepConfig()
    frame = raw.interactions.copy()
    frame["row"] = np.arange(len(frame))
    if config.rating_threshold is not None:
        frame = frame[frame["rating"] >= config.rating_threshold]

    items = raw.items.copy()
    items["title"] = items["title"].map(clean_title)
    year_field = config.append_year_field
    if year_field and year_field in items.columns:
        years = items[year_field].astype(str).str.strip()
        needs_year = years.str.fullmatch(r"\d{4}") & ~items["title"].str.endswith(")")
        items.loc[needs_year, "title"] = items.loc[needs_year, "title"] + " (" + years[needs_year] + ")"
    items = items[items["title"] != ""].drop_duplicates("item_id", keep="first")
    unknown = ~frame["item_id"].isin(items["item_id"])
    if unknown.any():
        logger.warning("dropping %d interactions whose item has no title", int(unknown.sum()))
        frame = frame[~unknown]

    frame = k_core(frame, config.user_core, config.item_core)
    if frame.empty:
        raise ValueError("no interactions left after filtering; lower the rating threshold or k-core")

    # Catalog: items that occur, in order of first appearance in the items table.
    used = set(frame["item_id"])
    items = items[items["item_id"].isin(used)].reset_index(drop=True)
    items["title"] = disambiguate_titles(items["title"].tolist())
    catalog = Catalog(items["item_id"].tolist(), items["title"].tolist())
    frame = frame.assign(item_index=frame["item_id"].map(dict(zip(catalog.item_ids, range(len(catalog)), strict=False))))

    # Stable chronological order per user; file order breaks timestamp ties (RecBole's behaviour).
    frame = frame.sort_values(["user_id", "timestamp", "row"], kind="stable")
    users: list[str] = []
    sequences: list[np.ndarray] = []
    stamps: list[np.ndarray] = []
    for user, group in frame.groupby("user_id", sort=False):
        users.append(str(user))
        sequences.append(group["item_index"].to_numpy(dtype=np.int64))
        stamps.append(group["timestamp"].to_numpy(dtype=np.float64))

    if config.split == "loo":
        splits, train_lengths = _split_loo(sequences)
    elif config.split == "temporal":
        splits, train_lengths = _split_temporal(stamps, config.temporal_ratios)
    else:
        raise ValueError(f"unknown split {config.split!r}; use 'loo' or 'temporal'")
    data = PreparedData(raw.name, catalog, users, sequences, splits, train_lengths, config)
    data.fingerprint = _fingerprint(catalog, users, sequences, config)
    logger.info("prepared %s", data.summary())
    return data


def _as_pairs(rows: list[tuple[int, int]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _split_loo(sequences: list[np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    train: list[tuple[int, int]] = []
    valid: list[tuple[int, int]] = []
    test: list[tuple[int, int]] = []
    lengths = np.zeros(len(sequences), dtype=np.int64)
    for user, seq in enumerate(sequences):
        n = len(seq)
        if n < 3:
            # RecBole's LS split gives such a user no valid/test item; they only add training data.
            lengths[user] = n
            train.extend((user, p) for p in range(1, n))
            continue
        lengths[user] = n - 2
        train.extend((user, p) for p in range(1, n - 2))
        valid.append((user, n - 2))
        test.append((user, n - 1))
    return {"train": _as_pairs(train), "valid": _as_pairs(valid), "test": _as_pairs(test)}, lengths


def _split_temporal(
    stamps: list[np.ndarray], ratios: tuple[float, float, float]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    if abs(sum(ratios) - 1.0) > 1e-6 or any(r < 0 for r in ratios):
        raise ValueError(f"temporal ratios must be non-negative and sum to 1, got {ratios}")
    everything = np.sort(np.concatenate(stamps))
    cut_valid = everything[min(int(len(everything) * ratios[0]), len(everything) - 1)]
    cut_test = everything[min(int(len(everything) * (ratios[0] + ratios[1])), len(everything) - 1)]
    parts: dict[str, list[tuple[int, int]]] = {"train": [], "valid": [], "test": []}
    lengths = np.asarray([int(np.searchsorted(times, cut_valid, side="left")) for times in stamps], dtype=np.int64)
    for user, times in enumerate(stamps):
        for position in range(1, len(times)):  # the first item has no history
            t = times[position]
            name = "train" if t < cut_valid else ("valid" if t < cut_test else "test")
            parts[name].append((user, position))
    return {k: _as_pairs(v) for k, v in parts.items()}, lengths
