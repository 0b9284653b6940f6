"""Served latency of one artifact at different torch thread counts (PRUNEREC_TORCH_THREADS), one server each.

    python -m bench.serve_threads runs/bench-cpu/3-depth --threads 1 --threads 0     # 0 = torch's default

Same requests as the benchmark (its first 24 seeded test users, top-10, 20 beams, history excluded),
concurrency 1 and 16, through `prunerec serve` on 127.0.0.1 (bench.harness.serve_and_measure).
"""

from __future__ import annotations

import argparse
import json
import os

from bench.harness import request_payloads, serve_and_measure
from pruning.evaluate import sample_users
from recdata.prep import prepare
from recdata.sources import read_ml100k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--threads", type=int, action="append", required=True, help="0 = torch's default")
    parser.add_argument("--requests", type=int, default=24)
    args = parser.parse_args()

    data = prepare(read_ml100k())
    payloads = request_payloads(data, sample_users(data.splits["test"], 300, 0)[: args.requests])
    results = {}
    for threads in args.threads:
        if threads:
            os.environ["PRUNEREC_TORCH_THREADS"] = str(threads)
        else:
            os.environ.pop("PRUNEREC_TORCH_THREADS", None)
        measured = serve_and_measure("arm", args.artifact, payloads, [1, 16])
        results[f"threads={threads or 'default'}"] = {
            "p50_ms_c1": measured["c1"]["latency_ms"]["p50"], "p99_ms_c1": measured["c1"]["latency_ms"]["p99"],
            "req_per_s_c16": measured["c16"]["throughput_rps"],
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
