"""The item catalog: a one-to-one map between item ids and display titles.

A generative recommender names items by title, so title → item must be unique: duplicates are
disambiguated during preparation (see :func:`recdata.prep.disambiguate_titles`). The catalog is saved
as ``catalog.parquet`` (columns ``item_id``, ``title``) beside every artifact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd


class UnknownItemsError(KeyError):
    """Raised when ids or titles are not in the catalog; ``missing`` lists them."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        shown = ", ".join(repr(m) for m in self.missing[:20])
        more = f" (and {len(self.missing) - 20} more)" if len(self.missing) > 20 else ""
        super().__init__(f"unknown items: {shown}{more}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class Catalog:
    """Items in a fixed order; an item's position is its *index* everywhere in prunerec."""

    def __init__(self, item_ids: Sequence[str], titles: Sequence[str]) -> None:
        if len(item_ids) != len(titles):
            raise ValueError("item_ids and titles differ in length")
        self.item_ids: list[str] = [str(i) for i in item_ids]
        self.titles: list[str] = [str(t) for t in titles]
        self._by_id = {item: index for index, item in enumerate(self.item_ids)}
        self._by_title = {title: index for index, title in enumerate(self.titles)}
        if len(self._by_id) != len(self.item_ids):
            raise ValueError("catalog item ids are not unique")
        if len(self._by_title) != len(self.titles):
            raise ValueError("catalog titles are not unique; disambiguate them first")

    def __len__(self) -> int:
        return len(self.item_ids)

    def index_of_ids(self, ids: Iterable[str]) -> list[int]:
        ids = [str(i) for i in ids]
        missing = [i for i in ids if i not in self._by_id]
        if missing:
            raise UnknownItemsError(missing)
        return [self._by_id[i] for i in ids]

    def index_of_titles(self, titles: Iterable[str]) -> list[int]:
        titles = list(titles)
        missing = [t for t in titles if t not in self._by_title]
        if missing:
            raise UnknownItemsError(missing)
        return [self._by_title[t] for t in titles]

    def resolve(self, references: Iterable[str]) -> list[int]:
        """Indices for references that are item ids or exact titles (ids take precedence)."""
        out, missing = [], []
        for ref in references:
            ref = str(ref)
            if ref in self._by_id:
                out.append(self._by_id[ref])
            elif ref in self._by_title:
                out.append(self._by_title[ref])
            else:
                missing.append(ref)
        if missing:
            raise UnknownItemsError(missing)
        return out

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for item, title in zip(self.item_ids, self.titles, strict=True):
            digest.update(f"{item}\t{title}\n".encode())
        return digest.hexdigest()[:16]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"item_id": self.item_ids, "title": self.titles})

    def save(self, path: str | Path) -> None:
        self.to_frame().to_parquet(path, index=False)

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        frame = pd.read_parquet(path)
        missing = {"item_id", "title"} - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: catalog lacks columns {sorted(missing)}")
        return cls(frame["item_id"].astype(str).tolist(), frame["title"].astype(str).tolist())
