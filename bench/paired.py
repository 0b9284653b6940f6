"""Two evaluations of the same users compared user by user (another head, search or step; another model).

    python -m bench.paired runs/cpu60/eval/test.json runs/trie/dense.json --output bench/results/cpu/trie_head/dense.json

Each argument is an evaluation JSON that ``prunerec evaluate`` wrote, its per-user ranks beside it
(``NAME.ranks.csv``). The users must be the same (same ids, same targets); the report gives each side's
NDCG@10 and hits, the paired difference of per-user NDCG@10 (B − A) with its 95% bootstrap interval, Wilcoxon and
t-test p-values (:func:`bench.report.paired_test`), how many users' top-10 lists are identical and the mean
overlap of the two top-10 sets (shared items over the longer list), and the two protocols where they differ. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from bench.harness import emit_json
from bench.report import NDCG_K as TOP
from bench.report import paired_test, per_user_ndcg


def _ranks(evaluation: Path) -> pd.DataFrame:
    path = evaluation.with_suffix(".ranks.csv")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: compare evaluations written by `prunerec evaluate` (ranks beside the JSON)")
    return pd.read_csv(path, dtype={"user_id": str, "target_item_id": str, "top_item_ids": str})


def compare(a: Path, b: Path) -> dict[str, Any]:
    """The paired comparison of evaluation ``b`` against ``a`` (same users in the same order)."""
    ranks_a, ranks_b = _ranks(a), _ranks(b)
    keys = ["user_id", "target_item_id"]
    if not ranks_a[keys].equals(ranks_b[keys]):
        raise ValueError(f"{a} and {b} hold different users or targets: evaluate both with the same --users/--seed/--split")
    lists_a = [str(x).split()[:TOP] for x in ranks_a["top_item_ids"].fillna("")]
    lists_b = [str(x).split()[:TOP] for x in ranks_b["top_item_ids"].fillna("")]
    test = paired_test(per_user_ndcg(ranks_a["rank"].tolist()), per_user_ndcg(ranks_b["rank"].tolist()))
    protocol_a, protocol_b = (json.loads(p.read_text()).get("protocol", {}) for p in (a, b))
    return {
        "a": str(a), "b": str(b),
        "hits_a": int(((ranks_a["rank"] >= 0) & (ranks_a["rank"] < TOP)).sum()),
        "hits_b": int(((ranks_b["rank"] >= 0) & (ranks_b["rank"] < TOP)).sum()),
        "ndcg@10": test,
        "identical_top10_lists": sum(x == y for x, y in zip(lists_a, lists_b, strict=True)),
        "mean_top10_overlap": sum(len(set(x) & set(y)) / max(1, len(x), len(y))
                                  for x, y in zip(lists_a, lists_b, strict=True)) / max(1, len(lists_a)),
        "protocol_differences": {key: [protocol_a.get(key), protocol_b.get(key)] for key in sorted(set(protocol_a) | set(protocol_b))
                                 if protocol_a.get(key) != protocol_b.get(key)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="evaluation JSON (the reference)")
    parser.add_argument("b", type=Path, help="evaluation JSON of the same users")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    emit_json(compare(args.a, args.b), args.output)


if __name__ == "__main__":
    main()
