"""Our decoder against the way the papers' code decodes, on the same artifact and users.

    python -m bench.decoders runs/bench-cpu/dense runs/bench-cpu/3-depth --users 16

BIGRec's and D3's released code rank with Hugging Face ``generate``: beam search with ``num_beams`` beams,
``prefix_allowed_tokens_fn`` walking a title trie, the model's stock forward and its stock (per-beam) KV
cache. Here, per artifact and in one process:

- ``generate``: that way, 20 beams, 10 returned sequences, ``length_penalty=0`` (a title's score is the sum of
  its token log-probabilities, as ours; the papers' default of 1 would divide by the length), over the same
  trie as ours, the full-vocabulary log-softmax; each returned sequence mapped to its item by the trie;
- ``ours (stock step)`` and ``ours (lean step)``: :func:`llmrec.decode.constrained_beam_search` with 20 beams,
  top 10, the ``full`` head (the same scores as ``generate``'s), no exclusion and no assistant (``generate``
  has neither), once with the model's own forward and once with :mod:`llmrec.fast_step`;

users/s of each (same batch size, after a warm-up batch), the lean step's agreement with the stock step
(identical lists; largest score difference) and each decoder's top-10 agreement with ``generate`` (mean
overlap of the two top-10 sets, and the share of users whose ordered lists are identical). Writes JSON
(``--output``), which ``prunerec bench`` also puts in its report under ``decoders``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.harness import emit_json
from llmrec.decode import TitleTrie
from llmrec.recommender import Recommender

logger = logging.getLogger(__name__)

NUM_BEAMS = 20
TOP_K = 10


class TrieWalker:
    """``prefix_allowed_tokens_fn`` over a :class:`TitleTrie`: the tokens that continue a generated prefix."""

    def __init__(self, trie: TitleTrie, prompt_length: int, pad_id: int) -> None:
        offsets = trie.child_offsets.tolist()
        tokens, nodes = trie.child_tokens.tolist(), trie.child_nodes.tolist()
        self.children: list[dict[int, int]] = [
            dict(zip(tokens[offsets[n]: offsets[n + 1]], nodes[offsets[n]: offsets[n + 1]], strict=True))
            for n in range(len(offsets) - 1)
        ]
        self.allowed = [list(c) for c in self.children]
        self.node_item = trie.node_item.tolist()
        self.prompt_length = prompt_length
        self.pad_id = pad_id

    def node(self, response: Sequence[int]) -> int | None:
        node = 0
        for token in response:
            nxt = self.children[node].get(int(token))
            if nxt is None:
                return None
            node = nxt
        return node

    def __call__(self, batch_id: int, input_ids: torch.Tensor) -> list[int]:
        node = self.node(input_ids[self.prompt_length:].tolist())
        if node is None or not self.allowed[node]:  # a finished or padded beam
            return [self.pad_id]
        return self.allowed[node]

    def item(self, response: Sequence[int], end_id: int, pad_id: int) -> int:
        """The catalog item a generated response completes (-1 when it does not end in a title's end token)."""
        tokens = [int(t) for t in response]
        if end_id in tokens:
            tokens = tokens[: tokens.index(end_id) + 1]
        node = self.node(tokens)
        return self.node_item[node] if node is not None else -1


@torch.no_grad()
def generate_rank(recommender: Recommender, histories: Sequence[Sequence[int]]) -> list[list[tuple[int, float]]]:
    """Top-10 per user the papers' way: one ``generate`` call for the batch (left-padded prompts)."""
    prompts = [recommender.prompt_ids(h) for h in histories]
    length = max(len(p) for p in prompts)
    pad = recommender.pad_id
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    walker = TrieWalker(recommender.trie, length, pad)
    end_id = recommender.trie.end_id
    out = recommender.model.generate(  # type: ignore[operator]
        input_ids=ids.to(recommender.device), attention_mask=mask.to(recommender.device), num_beams=NUM_BEAMS,
        num_return_sequences=TOP_K, max_new_tokens=recommender.trie.max_depth, do_sample=False, length_penalty=0.0,
        prefix_allowed_tokens_fn=walker, eos_token_id=end_id, pad_token_id=pad, output_scores=True,
        return_dict_in_generate=True, temperature=None, top_p=None, top_k=None,
    )
    sequences = out.sequences[:, length:].tolist()
    scores = out.sequences_scores.tolist()
    ranked: list[list[tuple[int, float]]] = []
    for row in range(len(prompts)):
        pairs = []
        for index in range(row * TOP_K, (row + 1) * TOP_K):
            item = walker.item(sequences[index], end_id, pad)
            if item >= 0:
                pairs.append((item, float(scores[index])))
        ranked.append(pairs)
    return ranked


def _agreement(a: list[list[tuple[int, float]]], b: list[list[tuple[int, float]]]) -> dict[str, float]:
    overlap = [len({i for i, _ in x} & {i for i, _ in y}) / TOP_K for x, y in zip(a, b, strict=True)]
    identical = [[i for i, _ in x] == [i for i, _ in y] for x, y in zip(a, b, strict=True)]
    return {"top10_overlap": sum(overlap) / len(overlap), "identical_lists": sum(identical) / len(identical)}


def _versus_stock(lists: list[list[tuple[int, float]]], stock: list[list[tuple[int, float]]]) -> dict[str, float]:
    """Agreement with the stock step's lists, and the largest score difference rank by rank."""
    differences = [abs(x[1] - y[1]) for a, b in zip(lists, stock, strict=True) for x, y in zip(a, b, strict=False)]
    return {**_agreement(lists, stock), "max_score_difference": max(differences, default=0.0)}


def _timed(rank: Any, histories: Sequence[Sequence[int]], batch_size: int) -> tuple[list[list[tuple[int, float]]], float]:
    rank(histories[:batch_size][:2])  # warm-up (allocations, one-time packing)
    started = time.perf_counter()
    results: list[list[tuple[int, float]]] = []
    for start in range(0, len(histories), batch_size):
        results.extend(rank(histories[start:start + batch_size]))
    return results, len(histories) / (time.perf_counter() - started)


def compare_decoders(recommender: Recommender, histories: Sequence[Sequence[int]], batch_size: int = 16,
                     generate: bool = True, extra_steps: Sequence[str] = ()) -> dict[str, Any]:
    """users/s and agreement of the stock step, the lean step, each of ``extra_steps`` ('compiled', 'graphs':
    ``ours_<step>``, with its agreement with the stock step) and (when ``generate``) HF ``generate``."""

    def ours(step: str, narrow: bool = True) -> Any:
        return lambda hs: recommender.recommend(hs, k=TOP_K, num_beams=NUM_BEAMS, batch_size=batch_size, head="full",
                                                assist=False, step=step, narrow=narrow)

    stock, stock_rate = _timed(ours("stock"), histories, batch_size)
    lean, lean_rate = _timed(ours("lean"), histories, batch_size)
    wide, wide_rate = _timed(ours("lean", narrow=False), histories, batch_size)  # every row, one token a step
    report: dict[str, Any] = {
        "users": len(histories), "batch_size": batch_size, "num_beams": NUM_BEAMS, "top_k": TOP_K,
        "device": str(recommender.device),
        "users_per_s": {"ours_stock": stock_rate, "ours_lean": lean_rate, "ours_lean_wide": wide_rate},
        "lean_vs_stock": _versus_stock(lean, stock),
        "lean_wide_vs_stock": _versus_stock(wide, stock),
        "lean_speedup_vs_stock": lean_rate / stock_rate,
        "narrow_speedup": lean_rate / wide_rate,
    }
    for step in extra_steps:
        lists, rate = _timed(ours(step), histories, batch_size)
        report["users_per_s"][f"ours_{step}"] = rate
        report[f"{step}_vs_stock"] = _versus_stock(lists, stock)
    if generate:
        reference, generate_rate = _timed(lambda hs: generate_rank(recommender, hs), histories, batch_size)
        report["users_per_s"]["hf_generate"] = generate_rate
        report["generate_vs"] = {"ours_lean": _agreement(lean, reference), "ours_stock": _agreement(stock, reference)}
        report["lean_speedup_vs_generate"] = lean_rate / generate_rate
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--users", type=int, default=16, help="seeded test users (the benchmark's first N)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype [bf16 on CUDA, fp32 on a CPU]")
    parser.add_argument("--no-generate", action="store_true", help="skip HF generate (it is the slow one)")
    parser.add_argument("--extra-steps", default="", help="also time these decoding steps (comma-separated: "
                        "compiled, graphs)")
    parser.add_argument("--output", default=None, help="JSON file [stdout only]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from pruning.evaluate import sample_users
    from recdata.prep import prepare
    from recdata.sources import read_ml100k

    data = prepare(read_ml100k())
    pairs = sample_users(data.splits["test"], 300, 0)[: args.users]  # the benchmark's users
    histories = [data.history(int(u), int(p)).tolist() for u, p in pairs]
    reports = {}
    for artifact in args.artifacts:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        recommender = Recommender.from_artifact(artifact, device=args.device, dtype=dtype)
        reports[artifact] = compare_decoders(recommender, histories, args.batch_size, generate=not args.no_generate,
                                             extra_steps=[s for s in args.extra_steps.split(",") if s])
        logger.info("%s: %s", artifact, json.dumps(reports[artifact]["users_per_s"]))
    emit_json(reports, Path(args.output) if args.output else None)


if __name__ == "__main__":
    main()
