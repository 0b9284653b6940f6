"""Latency and throughput of served arms, measured side by side through the real HTTP service.

Starts ``prunerec serve`` on 127.0.0.1 with every arm given, then for each arm (forced by header) and each
concurrency level sends the same requests (ml-100k test users: their last 10 items, top-10, history
excluded) and records client-side latency per request and throughput (requests / wall time).

    python -m bench.serve_latency --arm dense=runs/dense --arm pruned=runs/pruned/3-depth \
        --requests 48 --concurrency 1 --concurrency 16 --output bench/results/serve_latency.json
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
from pathlib import Path

import httpx
import numpy as np

from bench.harness import UNBOUNDED_DEADLINE, emit_json, measure_level, request_payloads, running_service, time_requests
from recdata.prep import prepare
from recdata.sources import read_ml100k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, help="NAME=ARTIFACT_DIR; repeat")
    parser.add_argument("--requests", type=int, default=48, help="requests per arm and concurrency level")
    parser.add_argument("--concurrency", type=int, action="append", help="levels (default 1 and 16)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("bench/results/serve_latency.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    arms = dict(a.split("=", 1) for a in args.arm)
    levels = args.concurrency or [1, 16]

    data = prepare(read_ml100k())
    rng = np.random.default_rng(args.seed)
    pairs = data.splits["test"][rng.choice(len(data.splits["test"]), size=args.requests, replace=False)]
    payloads = request_payloads(data, pairs, k=args.k)
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "k": args.k,
                     "num_beams": 20, "arms": {}}
    with running_service(arms, "--max-batch-size", str(args.max_batch_size), env=UNBOUNDED_DEADLINE) as (base, _server):
        for name in arms:
            time_requests(base, payloads[:2], 1, arm=name)  # warm-up outside the measurement
            results["arms"][name] = {f"c{c}": measure_level(base, payloads, c, arm=name) for c in levels}
            for c in levels:
                r = results["arms"][name][f"c{c}"]
                logging.info("%10s c=%-3d p50 %9.1f ms  p99 %9.1f ms  %7.2f req/s", name, c, r["latency_ms"]["p50"],
                             r["latency_ms"]["p99"], r["throughput_rps"])
        models = httpx.get(f"{base}/v1/models").json()
        results["params"] = {a["arm"]: a["params"] for a in models["arms"]}
    names = list(arms)
    if len(names) >= 2:
        a, b = names[0], names[1]
        results["ratios"] = {
            f"c{c}": {
                "speedup_p50": results["arms"][a][f"c{c}"]["latency_ms"]["p50"] / results["arms"][b][f"c{c}"]["latency_ms"]["p50"],
                "throughput_gain": results["arms"][b][f"c{c}"]["throughput_rps"] / results["arms"][a][f"c{c}"]["throughput_rps"],
            }
            for c in levels
        }
    emit_json(results, args.output)


if __name__ == "__main__":
    main()
