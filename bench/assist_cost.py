"""What D3's assistant costs at decoding time: the same users ranked with and without it, in one process.

    python -m bench.assist_cost --artifact runs/ablation-cpu/baseline --users 32

Prints JSON: seconds per user pure and assisted (two alternating rounds each, after a warm-up) and the time of
the assistant's own work per batch (the SASRec forward and the trie masses).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llmrec.recommender import Recommender
from pruning.evaluate import sample_users
from recdata.prep import prepare
from recdata.sources import read_ml100k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True, help="an artifact that carries an assistant")
    parser.add_argument("--users", type=int, default=32, help="seeded test users")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    data = prepare(read_ml100k())
    recommender = Recommender.from_artifact(args.artifact, device=args.device)
    if recommender.assistant is None:
        raise SystemExit(f"{args.artifact} carries no assistant (prunerec assist)")
    pairs = sample_users(data.splits["test"], args.users, 1)
    histories = [data.history(int(u), int(p)).tolist() for u, p in pairs]
    recommender.recommend(histories[:2], k=10, exclude=histories[:2])  # warm-up
    seconds: dict[str, list[float]] = {"pure": [], "assisted": []}
    for assist in (False, True, False, True):
        started = time.perf_counter()
        recommender.recommend(histories, k=20, num_beams=20, exclude=histories, batch_size=args.batch_size, assist=assist)
        seconds["assisted" if assist else "pure"].append((time.perf_counter() - started) / len(histories))
    batch = histories[: args.batch_size]
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(10):
            recommender.trie.node_log_mass(recommender.assistant.log_probs(batch, batch))
    print(json.dumps({"artifact": args.artifact, "users": len(histories), "batch_size": args.batch_size,
                      "device": str(recommender.device), "assist_weight": recommender.assist_weight,
                      "seconds_per_user": {k: round(min(v), 4) for k, v in seconds.items()},
                      "assistant_seconds_per_batch": round((time.perf_counter() - started) / 10, 4)}, indent=2))


if __name__ == "__main__":
    main()
