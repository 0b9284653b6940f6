"""The benchmark's load check on two artifacts: 64 clients, closed loop, deadlines, dense and pruned at 50/50.

    python -m bench.serve_load runs/bench-cpu/0-dense runs/bench-cpu/3-depth --seconds 60 --deadline-ms 5000 \
        --output bench/results/serve_load_cpu.json

Every request carries the deadline; one client in eight gives up after 0.5 s; clients wait Retry-After after
a 503 (``--impatient``: they retry at once). The JSON has the answers by
status and reason, late answers, goodput, and from /metrics the shed counts, the requests dropped before
decoding, those decoded for a departed client, and how long the model kept working after the load stopped.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from bench.harness import LoadCheck, emit_json, load_check, request_payloads
from pruning.evaluate import sample_users
from recdata.prep import prepare
from recdata.sources import read_ml100k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense")
    parser.add_argument("pruned")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--deadline-ms", type=float, default=5000.0)
    parser.add_argument("--impatient", action="store_true", help="Clients retry at once after a 503 (no Retry-After).")
    parser.add_argument("--serve-option", action="append", default=[], help="Extra `prunerec serve` option.")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    data = prepare(read_ml100k())
    payloads = request_payloads(data, sample_users(data.splits["test"], 300, 0))
    check = LoadCheck(clients=args.clients, seconds=args.seconds, deadline_ms=args.deadline_ms,
                      honour_retry_after=not args.impatient)
    result = load_check({"dense": args.dense, "pruned": args.pruned}, payloads, check, options=tuple(args.serve_option))
    result["serve_options"] = args.serve_option
    result["artifacts"] = {"dense": args.dense, "pruned": args.pruned}
    emit_json(result, args.output)


if __name__ == "__main__":
    main()
