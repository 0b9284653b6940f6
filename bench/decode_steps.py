"""The lean decoding step against the stock one, one request at a time (the service at concurrency 1).

    python -m bench.decode_steps runs/bench-cpu/0-dense runs/bench-cpu/3-depth --requests 12 \
        --output bench/results/cpu/decode_steps.json

Per artifact: ms per top-10 request (20 beams, the catalog head, history excluded, the artifact's assistant
when it carries one, as served), each step timed over the same requests in alternating rounds after a
warm-up, the lower round kept. ``--heads catalog,trie`` times each step under each head mode (keys
``STEP@HEAD``). Prints JSON.
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
    parser.add_argument("--steps", default="lean,stock", help="comma-separated decoding steps; 'lean:wide' is the lean "
                        "step over every row, one token a step (the search not narrowed, BeamSearchConfig.narrow)")
    parser.add_argument("--heads", default="catalog", help="comma-separated head modes (llmrec.decode.HEADS); with more "
                        "than one, every step runs under each and is keyed STEP@HEAD")
    parser.add_argument("--device", default="cpu", help="where the models run (cpu, cuda)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()
    data = prepare(read_ml100k())
    pairs = sample_users(data.splits["test"], 300, 0)[: args.requests]
    histories = [data.history(int(u), int(p)).tolist() for u, p in pairs]
    heads = args.heads.split(",")
    steps = [step if len(heads) == 1 else f"{step}@{head}" for step in args.steps.split(",") for head in heads]
    report = {}
    for artifact in args.artifacts:
        recommender = Recommender.from_artifact(artifact, device=args.device)
        def run(step: str, users: list[list[int]], recommender: Recommender = recommender) -> None:
            step, _, head = step.partition("@")
            name, _, variant = step.partition(":")
            recommender.recommend(users, k=10, exclude=users, batch_size=1, step=name, narrow=variant != "wide",
                                  head=head or heads[0])

        for step in steps:  # warm-up: packing, allocator
            run(step, histories[:1])
        ms: dict[str, list[float]] = {step: [] for step in steps}
        for _ in range(args.rounds):
            for step in steps:
                started = time.perf_counter()
                for history in histories:
                    run(step, [history])
                ms[step].append((time.perf_counter() - started) * 1000 / len(histories))
        report[artifact] = {"ms_per_request": {step: round(min(v), 1) for step, v in ms.items()},
                            "requests": len(histories), "assisted": recommender.uses_assistant(None),
                            "device": str(recommender.device)}
    emit_json(report, Path(args.output) if args.output else None)


if __name__ == "__main__":
    main()
