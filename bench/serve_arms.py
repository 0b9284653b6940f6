"""Arms side by side: does a small arm wait behind a big arm's batches? One server with both arms, for each
``--model-threads`` mode; clients of both arms at once (forced by header), and the small arm alone.

    python -m bench.serve_arms runs/bench-cpu/0-dense runs/bench-cpu/3-depth --clients 8 --requests 24 \
        --output bench/results/serve_arms_cpu.json

Requests: the benchmark's seeded test users (top-10, 20 beams, history excluded), deadlines unbounded.
"""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.harness import UNBOUNDED_DEADLINE, emit_json, request_payloads, running_service, time_requests
from pruning.evaluate import sample_users
from recdata.prep import prepare
from recdata.sources import read_ml100k


def drive(base: str, arm: str, payloads: list[dict], clients: int) -> dict:
    """``clients`` threads send the payloads to one arm: p50/p99 and throughput."""
    timed = time_requests(base, payloads, clients, arm=arm)
    return {"p50_ms": timed["latency_ms"]["p50"], "p99_ms": timed["latency_ms"]["p99"],
            "req_per_s": timed["throughput_rps"], "requests": len(payloads), "clients": clients}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("big", help="The big arm's artifact (dense).")
    parser.add_argument("small", help="The small arm's artifact (pruned).")
    parser.add_argument("--clients", type=int, default=8, help="Clients per arm.")
    parser.add_argument("--requests", type=int, default=24, help="Requests per arm.")
    parser.add_argument("--mode", action="append", choices=["shared", "per-arm"], help="Modes to measure [both].")
    parser.add_argument("--serve-option", action="append", default=[], help="Extra `prunerec serve` option, e.g. --serve-option=--torch-threads=1.")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    data = prepare(read_ml100k())
    payloads = request_payloads(data, sample_users(data.splits["test"], 300, 0)[: args.requests])
    results: dict = {"artifacts": {"dense": args.big, "pruned": args.small}, "clients_per_arm": args.clients,
                     "requests_per_arm": args.requests, "serve_options": args.serve_option}
    for mode in args.mode or ["shared", "per-arm"]:
        with running_service({"dense": args.big, "pruned": args.small}, "--model-threads", mode, *args.serve_option,
                             env=UNBOUNDED_DEADLINE) as (base, _server):
            for arm in ("dense", "pruned"):
                drive(base, arm, payloads[:2], 1)  # warm-up
            alone = drive(base, "pruned", payloads, args.clients)
            with ThreadPoolExecutor(max_workers=2) as pool:
                big = pool.submit(drive, base, "dense", payloads, args.clients)
                small = pool.submit(drive, base, "pruned", payloads, args.clients)
                together = {"dense": big.result(), "pruned": small.result()}
        results[mode] = {"pruned_alone": alone, "together": together}
        logging.info("%s: pruned alone p50 %.0f ms; together pruned p50 %.0f ms, dense p50 %.0f ms", mode,
                     alone["p50_ms"], together["pruned"]["p50_ms"], together["dense"]["p50_ms"])
    emit_json(results, args.output)


if __name__ == "__main__":
    main()
