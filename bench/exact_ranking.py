"""What exact ranking changes against 20-beam search, and what it costs, on the same artifact and users.

For each seeded test user: the 20-beam list and the exact list (every catalog title scored by its exact
log P(title + end | prompt), :mod:`llmrec.exact`), the target's rank in each, how many of the exact top-10
the beam search found, and the seconds per user of each; NDCG@10 / HR@10 of both over the users.

    python -m bench.exact_ranking --artifact runs/demo/dense --users 20 --output bench/results/exact_ranking_cpu.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness import emit_json
from llmrec.recommender import Recommender
from pruning.evaluate import sample_users
from recdata.metrics import ndcg_per_user
from recdata.prep import prepare
from recdata.sources import read_ml100k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True, help="artifact directory (trained on ml-100k)")
    parser.add_argument("--users", type=int, default=20, help="seeded test users")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beams", type=int, default=20)
    parser.add_argument("--head", default="catalog", help="full or catalog")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    data = prepare(read_ml100k())
    recommender = Recommender.from_artifact(args.artifact, device=args.device)
    pairs = sample_users(data.splits["test"], args.users, args.seed)
    histories = [data.history(int(u), int(p)).tolist() for u, p in pairs]
    targets = [data.target(int(u), int(p)) for u, p in pairs]
    device = recommender.device
    recommender.recommend(histories[:1], k=10, num_beams=args.beams, head=args.head)  # warm-up

    rows: list[dict[str, Any]] = []
    for history, target in zip(histories, targets, strict=True):
        timings = {}
        lists = {}
        for search in ("beam", "exact"):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            ranked = recommender.recommend([history], k=args.beams, num_beams=args.beams, exclude=[history],
                                           head=args.head, search=search)[0]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings[search] = time.perf_counter() - started
            lists[search] = [item for item, _ in ranked]
        exact_top10 = set(lists["exact"][:10])
        rows.append({
            "target_rank_beam": lists["beam"].index(target) if target in lists["beam"] else None,
            "target_rank_exact": lists["exact"].index(target) if target in lists["exact"] else None,
            "exact_top10_found_by_beam": len(exact_top10 & set(lists["beam"][:10])),
            "seconds_beam": round(timings["beam"], 3), "seconds_exact": round(timings["exact"], 3),
        })
        logging.info("user %d/%d: %s", len(rows), len(pairs), rows[-1])

    def quality(key: str) -> dict[str, float]:
        ranks = [r[key] for r in rows]
        return {"ndcg@10": float(ndcg_per_user(ranks, 10).mean()),
                "hr@10": float(np.mean([r is not None and r < 10 for r in ranks]))}

    report = {
        "artifact": args.artifact, "users": len(rows), "seed": args.seed, "beams": args.beams, "head": args.head,
        "device": str(device), "machine": f"{platform.platform()}, torch threads {torch.get_num_threads()}",
        "trie_nodes": recommender.trie.num_nodes, "catalog": len(recommender.catalog),
        "beam": {**quality("target_rank_beam"), "seconds_per_user": float(np.mean([r["seconds_beam"] for r in rows]))},
        "exact": {**quality("target_rank_exact"), "seconds_per_user": float(np.mean([r["seconds_exact"] for r in rows]))},
        "exact_top10_found_by_beam_mean": float(np.mean([r["exact_top10_found_by_beam"] for r in rows])),
        "per_user": rows,
    }
    emit_json(report, args.output)


if __name__ == "__main__":
    main()
