"""Where one top-10 request's time goes, in process: cProfile over single requests of the benchmark users.

    python -m bench.profile_decode runs/bench-cpu/3-depth --requests 24

``--batch-size 16`` profiles calls of 16 users, as the service batches concurrent requests. Prints ms per
request in the decoder's forward passes, the linear layers, attention, the next-token head and
the beam search's bookkeeping (the README's latency profile of the pruned model came from this).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from llmrec.recommender import Recommender
from pruning.evaluate import sample_users
from recdata.prep import prepare
from recdata.sources import read_ml100k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="users per call (the service batches up to 16 concurrent requests into one call)")
    parser.add_argument("--head", default="catalog")
    parser.add_argument("--step", default="auto", choices=["auto", "lean", "compiled", "graphs", "stock"], help="decoding step")
    parser.add_argument("--no-assist", action="store_true", help="rank without the artifact's assistant")
    args = parser.parse_args()

    data = prepare(read_ml100k())
    pairs = sample_users(data.splits["test"], 300, 0)[: args.requests]  # the benchmark's latency users
    histories = [data.history(int(u), int(p)).tolist()[-10:] for u, p in pairs]
    recommender = Recommender.from_artifact(args.artifact, device="cpu")
    size = args.batch_size
    options = dict(k=10, batch_size=size, head=args.head, step=args.step, assist=False if args.no_assist else None)
    calls = [histories[start : start + size] for start in range(0, len(histories), size)]
    recommender.recommend(calls[0], exclude=calls[0], **options)  # warm-up

    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    for call in calls:
        recommender.recommend(call, exclude=call, **options)
    profile.disable()
    per_request = (time.perf_counter() - started) * 1000 / len(histories)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]

    def cumulative_ms(function: str, file_part: str = "") -> float:
        total = sum(v[3] for k, v in stats.items() if k[2] == function and file_part in k[0])
        return total * 1000 / len(histories)

    # The decoder's own forward is the outermost `forward` of the modeling file: the largest cumulative time.
    decoder = max((v[3] for k, v in stats.items() if k[2] == "forward" and "/models/" in k[0]), default=0.0)
    parts = {
        "stock forward passes (the prompt pass; every step with --step stock)": decoder * 1000 / len(histories),
        "lean decoding steps": cumulative_ms("step", "fast_step"),
        "one pass over titles with one way left": cumulative_ms("_score_single_paths", "decode.py"),
        "  lean attention": cumulative_ms("_attend", "fast_step"),
        "assistant (SASRec forward + trie masses)": cumulative_ms("log_probs", "assistant") + cumulative_ms("node_log_mass"),
        "exclusion masks (available)": cumulative_ms("available", "decode.py"),
        "prompt building": cumulative_ms("prompt_ids"),
        "linear layers (every pass)": cumulative_ms("<built-in method torch._C._nn.linear>"),
        "stock attention (prefix-beam)": cumulative_ms("prefix_beam_attention"),
        "next-token head": cumulative_ms("__call__", "decode.py"),
        "trie expansion": cumulative_ms("expand_edges"),
        "grouped top-k": cumulative_ms("grouped_topk"),
        "cache reordering": cumulative_ms("reorder_cache", "prefix_cache") + cumulative_ms("reorder", "fast_step"),
    }
    print(f"{per_request:.1f} ms per request (profiled), {len(histories)} requests in calls of {size}, head={args.head}, "
          f"step={args.step}")
    for name, ms in parts.items():
        print(f"{name:45s} {ms:7.1f} ms  {100 * ms / per_request:5.1f}%")


if __name__ == "__main__":
    main()
