"""Parallel batches (``PRUNEREC_PARALLEL_BATCHES``): one batch on every thread against two half batches at once
on one thread each, in process and through the service.

    python -m bench.parallel_batches runs/bench-cpu/0-dense runs/bench-cpu/3-depth --rounds 2 \
        --output bench/results/cpu/parallel_batches.json

In process, per artifact: users/s of one batch of ``--users`` on two torch threads and of two batches of half
as many decoded at the same time on two Python threads with one torch thread each (the benchmark's users, last
10 items, top-10, past excluded, the artifact's assistant). Served: the benchmark's serving measurement (one
server per artifact, the first 24 of its users, concurrency 1 and 16) with ``PRUNEREC_PARALLEL_BATCHES`` 1 and
2 in alternating rounds. Prints JSON.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.harness import emit_json, request_payloads, serve_and_measure
from llmrec.recommender import Recommender
from pruning.evaluate import sample_users
from recdata.prep import prepare
from recdata.sources import read_ml100k


def in_process(artifact: str, histories: Sequence[list[int]], rounds: int) -> dict[str, list[float]]:
    """users/s: one batch on 2 threads vs two half batches at once on 1 thread each, per round."""
    recommender = Recommender.from_artifact(artifact, device="cpu")
    recommender.recommend(list(histories[:1]), k=10, exclude=list(histories[:1]), batch_size=1)  # warm-up
    half = len(histories) // 2
    result: dict[str, list[float]] = {"one_batch_2_threads": [], "two_batches_1_thread_each": []}

    def decode(part: Sequence[list[int]], threads: int) -> None:
        torch.set_num_threads(threads)
        recommender.recommend(list(part), k=10, exclude=list(part), batch_size=len(part))

    for _ in range(rounds):
        started = time.perf_counter()
        decode(histories, 2)
        result["one_batch_2_threads"].append(round(len(histories) / (time.perf_counter() - started), 2))
        workers = [threading.Thread(target=decode, args=(part, 1)) for part in (histories[:half], histories[half:])]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        result["two_batches_1_thread_each"].append(round(len(histories) / (time.perf_counter() - started), 2))
    torch.set_num_threads(2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense")
    parser.add_argument("pruned")
    parser.add_argument("--users", type=int, default=16, help="users of the in-process batch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-serve", action="store_true", help="in process only")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()
    data = prepare(read_ml100k())
    pairs = sample_users(data.splits["test"], 300, 0)
    histories = [data.history(int(u), int(p)).tolist()[-10:] for u, p in pairs[: args.users]]
    arms = {"dense": args.dense, "pruned": args.pruned}
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
                              "in_process": {name: in_process(path, histories, args.rounds) for name, path in arms.items()}}
    if not args.no_serve:
        payloads = request_payloads(data, pairs[:24])
        served = []
        for round_ in range(args.rounds):
            for parallel in (1, 2):
                os.environ["PRUNEREC_PARALLEL_BATCHES"] = str(parallel)
                row: dict[str, Any] = {"round": round_, "parallel_batches": parallel}
                for name, path in arms.items():
                    measured = serve_and_measure(name, path, payloads, [1, 16])
                    row[name] = {level: {"p50_ms": round(measured[level]["latency_ms"]["p50"], 1),
                                         "req_per_s": round(measured[level]["throughput_rps"], 2)} for level in ("c1", "c16")}
                row["speedup_p50"] = round(row["dense"]["c1"]["p50_ms"] / row["pruned"]["c1"]["p50_ms"], 2)
                row["throughput_gain"] = round(row["pruned"]["c16"]["req_per_s"] / row["dense"]["c16"]["req_per_s"], 2)
                served.append(row)
        os.environ.pop("PRUNEREC_PARALLEL_BATCHES", None)
        report["served"] = served
    emit_json(report, Path(args.output) if args.output else None)


if __name__ == "__main__":
    main()
