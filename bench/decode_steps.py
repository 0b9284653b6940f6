"""The lean decoding step against the stock one, one request at a time (the service at concurrency 1).

    python -m bench.decode_steps runs/bench-cpu/0-dense runs/bench-cpu/3-depth --requests 12 \
        --output bench/results/cpu/decode_steps.json

Per artifact: ms per top-10 request (20 beams, the catalog head, history excluded, the artifact's assistant
when it carries one, as served), each step timed over the same requests in alternating rounds after a
warm-up, the lower round kept. Prints JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.harness import emit_json
from llmrec.recommender import Recommender
from pruning.evaluate import sample_users
from recdata.prep import prepare
from recdata.sources import read_ml100k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--requests", type=int, default=12, help="the benchmark's first N latency users")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", default="lean,stock", help="comma-separated decoding steps")
    parser.add_argument("--device", default="cpu", help="where the models run (cpu, cuda)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()
    data = prepare(read_ml100k())
    pairs = sample_users(data.splits["test"], 300, 0)[: args.requests]
    histories = [data.history(int(u), int(p)).tolist() for u, p in pairs]
    steps = args.steps.split(",")
    report = {}
    for artifact in args.artifacts:
        recommender = Recommender.from_artifact(artifact, device=args.device)
        for step in steps:  # warm-up: packing, allocator
            recommender.recommend(histories[:1], k=10, exclude=histories[:1], batch_size=1, step=step)
        ms: dict[str, list[float]] = {step: [] for step in steps}
        for _ in range(args.rounds):
            for step in steps:
                started = time.perf_counter()
                for history in histories:
                    recommender.recommend([history], k=10, exclude=[history], batch_size=1, step=step)
                ms[step].append((time.perf_counter() - started) * 1000 / len(histories))
        report[artifact] = {"ms_per_request": {step: round(min(v), 1) for step, v in ms.items()},
                            "requests": len(histories), "assisted": recommender.uses_assistant(None),
                            "device": str(recommender.device)}
    emit_json(report, Path(args.output) if args.output else None)


if __name__ == "__main__":
    main()
