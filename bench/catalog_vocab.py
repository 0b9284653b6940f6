"""What the catalog head and vocabulary pruning buy: dense vs pruned vs pruned + vocab, in one run.

For every artifact and head mode (``full``: log-softmax over the model's whole vocabulary; ``catalog``: over
the catalog's tokens only): parameters, artifact size on disk, multiply-adds per decoded token *counted*
with ``torch.utils.flop_counter`` on one cached decoding step (context of ``--context`` tokens, plus the
head's rows × hidden), NDCG@10 / HR@10 on the same seeded test users (LOO, history 10, 20 beams, history
excluded), top-10 latency per single request (in process, batch 1, 20 beams) and, per model, how often the
``catalog`` head's top-10 list equals the ``full`` head's.

    python -m bench.catalog_vocab --model dense=runs/cpu40 --model pruned=runs/prune40/3-depth \
        --model pruned+vocab=runs/prune40/4-vocab --users 300 --output bench/results/catalog_vocab_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.report import artifact_bytes, macs_per_token
from llmrec.artifact import read_manifest
from llmrec.recommender import Recommender
from pruning.evaluate import EvalConfig, sample_users
from pruning.evaluate import run as evaluate
from recdata.prep import prepare
from recdata.sources import read_ml100k

HEADS = ("full", "catalog")


def attention_macs_per_token(recommender: Recommender, context: int) -> int:
    """Scores and weighted sum over the cached context (2 x layers x heads x head_dim x context), computed."""
    c = recommender.model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return int(2 * c.num_hidden_layers * c.num_attention_heads * head_dim * (context + 1))


def latency(recommender: Recommender, histories: list[list[int]], head: str) -> dict[str, float]:
    for history in histories[:2]:  # warm-up
        recommender.recommend([history], k=10, num_beams=20, exclude=[history], head=head)
    times = []
    for history in histories:
        started = time.perf_counter()
        recommender.recommend([history], k=10, num_beams=20, exclude=[history], head=head)
        times.append(1000 * (time.perf_counter() - started))
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)), "requests": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="name=artifact directory (repeat)")
    parser.add_argument("--users", type=int, default=300, help="seeded test users for NDCG/HR")
    parser.add_argument("--latency-requests", type=int, default=30, help="single requests timed per model and head")
    parser.add_argument("--context", type=int, default=64, help="tokens of context for the counted decoding step")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    data = prepare(read_ml100k())
    pairs = sample_users(data.splits["test"], args.users, 0)
    timing_histories = [data.history(int(u), int(p)).tolist()[-10:] for u, p in pairs[: args.latency_requests]]
    work = args.output.with_suffix("")
    results: dict = {"protocol": {
        "dataset": "ml-100k", "split": "loo:test", "users": len(pairs), "seed": 0, "history_length": 10,
        "num_beams": 20, "exclude_history": True, "latency": "in process, one request at a time, top-10, 20 beams",
        "macs": f"one cached decoding step at {args.context} tokens of context: projections counted (torch FlopCounterMode / 2)"
                " + head rows x hidden; attention over the context reported apart (computed)",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
    }, "models": {}}
    for spec in args.model:
        name, path = spec.split("=", 1)
        directory = Path(path)
        manifest = read_manifest(directory)
        recommender = Recommender.from_artifact(directory, device="cpu")
        entry: dict = {"artifact": str(directory), "params": manifest["params"], "artifact_bytes": artifact_bytes(directory),
                       "vocab_size": recommender.model.config.vocab_size, "catalog_tokens": int(recommender.trie.vocabulary.numel()),
                       "attention_macs_per_token": attention_macs_per_token(recommender, args.context), "heads": {}}
        tops = {}
        for head in HEADS:
            output = work / name / f"test-{head}.json"
            cached = json.loads(output.read_text()) if output.is_file() else None
            if cached and cached["config"]["users"] == args.users and cached["config"]["artifact"] == str(directory):
                result = cached  # a re-run re-times latency only (quality numbers do not depend on load)
            else:
                result = evaluate(EvalConfig(artifact=str(directory), users=args.users, head=head, output=str(output),
                                             batch_size=16), data, recommender)
            tops[head] = pd.read_csv(output.with_suffix(".ranks.csv"))["top_item_ids"].map(lambda s: s.split()[:10]).tolist()
            entry["heads"][head] = {
                "macs_per_token": macs_per_token(recommender, head, args.context),
                "ndcg@10": result["metrics"]["ndcg@10"], "hr@10": result["metrics"]["hr@10"],
                "seconds_per_user_batched": result["seconds_per_user"],
                "latency_ms": latency(recommender, timing_histories, head),
            }
            entry["mostpop"] = {"ndcg@10": result["mostpop"]["ndcg@10"], "hr@10": result["mostpop"]["hr@10"]}
            logging.info("%s / %s: %s", name, head, entry["heads"][head])
        same = [a == b for a, b in zip(tops["full"], tops["catalog"], strict=True)]
        overlap = [len(set(a) & set(b)) / 10 for a, b in zip(tops["full"], tops["catalog"], strict=True)]
        entry["catalog_vs_full"] = {"identical_top10": float(np.mean(same)), "mean_top10_overlap": float(np.mean(overlap))}
        results["models"][name] = entry
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))  # after every model: nothing lost on interruption
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
