"""Ranking metrics with one relevant item per user, and the MostPop baseline.

A rank is 0-based (0 = first place); ``None`` or any rank beyond a list means "not retrieved".
HR@k = [rank < k]; NDCG@k = 1 / log2(rank + 2) if rank < k (one relevant item, so IDCG = 1);
MRR = 1 / (rank + 1) within the evaluated list length (MRR@K, K = the number of beams);
coverage@k = distinct items recommended in top-k over all users / catalog size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10, 20)


def ndcg_per_user(ranks: Sequence[int | float | None], k: int) -> np.ndarray:
    """NDCG@k of each user: 1/log2(rank + 2) when the target is in the top k, else 0 (None, NaN or a
    negative rank = not retrieved)."""
    values = np.array([np.inf if r is None or (isinstance(r, float) and np.isnan(r)) or r < 0 else float(r) for r in ranks])
    hit = values < k
    return np.where(hit, 1.0 / np.log2(np.where(hit, values, 0.0) + 2.0), 0.0)


def rank_metrics(ranks: Sequence[int | None], ks: Sequence[int] = DEFAULT_KS, list_length: int | None = None) -> dict[str, float]:
    """Mean HR@k, NDCG@k and MRR over users; ``list_length`` caps MRR (default: max(ks))."""
    if not ranks:
        raise ValueError("no ranks to average")
    cap = list_length if list_length is not None else max(ks)
    values = np.array([np.inf if r is None else float(r) for r in ranks])
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = float((values < k).mean())
        out[f"ndcg@{k}"] = float(ndcg_per_user(ranks, k).mean())
    in_list = values < cap
    out[f"mrr@{cap}"] = float(np.where(in_list, 1.0 / (np.where(in_list, values, 0.0) + 1.0), 0.0).mean())
    return out


def coverage(recommendations: Sequence[Sequence[int]], catalog_size: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Share of the catalog that appears in anyone's top-k."""
    out = {}
    for k in ks:
        distinct = {item for rec in recommendations for item in rec[:k]}
        out[f"coverage@{k}"] = len(distinct) / catalog_size
    return out



def mostpop_ranks(
    popularity: np.ndarray, targets: Sequence[int], excluded: Sequence[Sequence[int]] | None = None, top: int = 20
) -> tuple[list[int | None], list[list[int]]]:
    """Rank of each target under MostPop (ties broken by catalog index), excluding each user's history.

    Returns (ranks, top lists); a rank is None when the target falls outside the first ``top`` items
    (the only part metrics at k <= top read). Excluded items are removed before ranking; if the target
    itself is excluded its rank is None.
    """
    order = np.lexsort((np.arange(len(popularity)), -popularity))  # by count desc, then index asc
    ranks: list[int | None] = []
    lists: list[list[int]] = []
    for user, target in enumerate(targets):
        skip = set(excluded[user]) if excluded is not None else set()
        ranked: list[int] = []
        for item in order:
            if int(item) in skip:
                continue
            ranked.append(int(item))
            if len(ranked) == top:
                break
        lists.append(ranked)
        ranks.append(ranked.index(target) if target in ranked else None)
    return ranks, lists
