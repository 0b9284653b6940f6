"""Two evaluations of the same users compared user by user (another head, search or step; another model).

    python -m bench.paired runs/cpu60/eval/test.json runs/trie/dense.json --output bench/results/cpu/trie_head/dense.json

Each argument is an evaluation JSON that ``prunerec evaluate`` wrote, its per-user ranks beside it
(``NAME.ranks.csv``). The users must be the same (same ids, same targets); the report gives each side's
NDCG@10 and hits, the paired difference of per-user NDCG@10 (B − A) with its 95% bootstrap interval, Wilcoxon and
t-test p-values (:func:`bench.report.paired_test`), how many users' top-10 lists are identical and the mean
overlap of the two top-10 sets (shared items over the longer list), and the two protocols where they differ. Prints JSON.

``--reference R.json`` (the teacher's evaluation of the same users) adds how far each side reproduces R's top-10
lists: per user the overlap of its top-10 set with R's, paired between the two sides like NDCG@10 (B − A, with
its interval). With one hit per user among ~1,700 items, NDCG@10 on ~900 users moves by noise the size of most
distillation changes; the overlap with the teacher's lists is an average over ten items a user, the measure of
what distillation asks a student to copy. It also gives, per rank of R's lists, the share of users whose list
holds R's item there (``kept_by_reference_rank``), where R's hits lie (``reference_hits_by_rank``) and how many of
each side's hits are hits of R too (``hits_shared_with_reference``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.harness import emit_json
from bench.report import NDCG_K as TOP
from bench.report import paired_test, per_user_ndcg


def _ranks(evaluation: Path) -> pd.DataFrame:
    path = evaluation.with_suffix(".ranks.csv")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: compare evaluations written by `prunerec evaluate` (ranks beside the JSON)")
    return pd.read_csv(path, dtype={"user_id": str, "target_item_id": str, "top_item_ids": str})


def _lists(ranks: pd.DataFrame) -> list[list[str]]:
    return [str(x).split()[:TOP] for x in ranks["top_item_ids"].fillna("")]


def _overlaps(x: list[list[str]], y: list[list[str]]) -> np.ndarray:
    """Per user, the share of the two top-10 sets' items they have in common (over the longer list)."""
    return np.array([len(set(p) & set(q)) / max(1, len(p), len(q)) for p, q in zip(x, y, strict=True)])


def _hit_ranks(ranks: pd.DataFrame) -> list[int | None]:
    """Per user, the target's rank in the top-10 (None: not in it)."""
    return [int(r) if 0 <= r < TOP else None for r in ranks["rank"]]


def _kept_by_rank(lists: list[list[str]], reference: list[list[str]]) -> list[float]:
    """For each rank of the reference's lists, the share of users whose list holds the reference's item there."""
    users = max(1, len(reference))
    return [sum(len(r) > position and r[position] in set(mine) for mine, r in zip(lists, reference, strict=True)) / users
            for position in range(TOP)]


def _same_users(a: Path, ranks_a: pd.DataFrame, b: Path, ranks_b: pd.DataFrame) -> None:
    keys = ["user_id", "target_item_id"]
    if not ranks_a[keys].equals(ranks_b[keys]):
        raise ValueError(f"{a} and {b} hold different users or targets: evaluate both with the same --users/--seed/--split")


def compare(a: Path, b: Path, reference: Path | None = None) -> dict[str, Any]:
    """The paired comparison of evaluation ``b`` against ``a`` (same users in the same order); with
    ``reference``, also each side's per-user top-10 overlap with the reference's lists, paired."""
    ranks_a, ranks_b = _ranks(a), _ranks(b)
    _same_users(a, ranks_a, b, ranks_b)
    lists_a, lists_b = _lists(ranks_a), _lists(ranks_b)
    test = paired_test(per_user_ndcg(ranks_a["rank"].tolist()), per_user_ndcg(ranks_b["rank"].tolist()))
    protocol_a, protocol_b = (json.loads(p.read_text()).get("protocol", {}) for p in (a, b))
    agreement: dict[str, Any] = {}
    if reference is not None:
        ranks_r = _ranks(reference)
        _same_users(a, ranks_a, reference, ranks_r)
        lists_r = _lists(ranks_r)
        hits_r = _hit_ranks(ranks_r)
        agreement = {"reference": str(reference),
                     "top10_overlap_with_reference": paired_test(_overlaps(lists_a, lists_r), _overlaps(lists_b, lists_r)),
                     "reference_hits_by_rank": [sum(r == position for r in hits_r) for position in range(TOP)],
                     "kept_by_reference_rank": {"a": _kept_by_rank(lists_a, lists_r), "b": _kept_by_rank(lists_b, lists_r)},
                     "hits_shared_with_reference": {side: sum(mine is not None and theirs is not None
                                                              for mine, theirs in zip(_hit_ranks(ranks), hits_r, strict=True))
                                                    for side, ranks in (("a", ranks_a), ("b", ranks_b))}}
    return {
        "a": str(a), "b": str(b),
        "hits_a": sum(rank is not None for rank in _hit_ranks(ranks_a)),
        "hits_b": sum(rank is not None for rank in _hit_ranks(ranks_b)),
        "ndcg@10": test,
        "identical_top10_lists": sum(x == y for x, y in zip(lists_a, lists_b, strict=True)),
        "mean_top10_overlap": float(_overlaps(lists_a, lists_b).mean()) if lists_a else 0.0,
        "protocol_differences": {key: [protocol_a.get(key), protocol_b.get(key)] for key in sorted(set(protocol_a) | set(protocol_b))
                                 if protocol_a.get(key) != protocol_b.get(key)},
        **agreement,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="evaluation JSON (the reference)")
    parser.add_argument("b", type=Path, help="evaluation JSON of the same users")
    parser.add_argument("--reference", type=Path, default=None,
                        help="evaluation JSON of the same users (the teacher): each side's top-10 overlap with its lists, paired")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    emit_json(compare(args.a, args.b, args.reference), args.output)


if __name__ == "__main__":
    main()
