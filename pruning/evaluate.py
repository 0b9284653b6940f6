"""Offline evaluation: full-catalog ranking by constrained beam search, with MostPop beside it.

Protocol (DESIGN.md §3): the split's samples (default: test, leave-one-out by time), the last
``max_history`` items as the prompt, ``num_beams`` beams (>= 20), every catalog item a candidate, the user's
whole past excluded from the ranking (as RecBole's full-sort evaluation masks the training history), one
relevant item per user. HR/NDCG at 1/5/10/20, MRR within the beam list, coverage. The same users and
exclusions are used for MostPop (training-part popularity). The metrics JSON names the protocol; per-user
ranks and top lists are written beside it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from llmrec.artifact import update_manifest
from llmrec.recommender import Recommender
from recdata.metrics import DEFAULT_KS, coverage, mostpop_ranks, ndcg_per_user, rank_metrics
from recdata.prep import PreparedData

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Evaluation settings; all of them are written into the metrics JSON as the protocol."""

    artifact: str
    """Artifact directory to evaluate."""
    split: Literal["test", "valid"] = "test"
    """Which held-out item is the target: test or valid."""
    num_beams: int = 20
    """Beams per user; also the length of the ranked list (top-k = num_beams)."""
    users: int | None = None
    """Evaluate a seeded random sample of this many users (None or 0 = all)."""
    seed: int = 0
    """Seed of the user sample."""
    batch_size: int = 8
    """Users decoded together."""
    exclude_history: bool = True
    """Remove each user's past items from the ranking (LLM and MostPop alike)."""
    output: str | None = None
    """Metrics JSON path (default: <artifact>/eval/<split>.json); per-user ranks go beside it."""
    device: str | None = None
    """cpu or cuda (default: cuda when available)."""
    head: str = "catalog"
    """Next-token normalisation: 'full' vocabulary (exact), 'catalog' tokens only (cheaper, renormalised) or 'trie'
    (each step over the continuations of the title prefix: log P(item) over the catalog; llmrec.decode)."""
    search: Literal["beam", "exact"] = "beam"
    """How each user's list is made: 'beam' (constrained beam search, num_beams prefixes per step) or 'exact'
    (every catalog title scored by its exact log P(title + end | prompt); see llmrec.exact)."""
    assist: bool | None = None
    """Mix the artifact's assistant into the scores (D3's assisted decoding, `prunerec assist`): None = when
    the artifact carries one (as the service does), False = the pure LLM, True = require one."""
    step: Literal["auto", "lean", "compiled", "graphs", "stock"] = "auto"
    """How beam search runs a decoding step: 'auto' ('graphs' on a CUDA device, else 'lean'), 'lean' (packed
    weights, a preallocated beam cache; llmrec.fast_step), 'compiled' (the lean step through torch.compile),
    'graphs' (replayed as a CUDA graph) or 'stock' (the model's own forward). Same lists and scores to float
    tolerance."""


def sample_users(pairs: np.ndarray, users: int | None, seed: int) -> np.ndarray:
    """A seeded, sorted subset of the split's samples: all of them when users is None or 0 (every command's
    "0 = all", `prunerec compare --users 0` and `prunerec evaluate --users 0` alike)."""
    if users is not None and users < 0:
        raise ValueError(f"users must be a positive count, or 0 / None for every user; got {users}")
    if not users or users >= len(pairs):
        return pairs
    keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=users, replace=False))
    return pairs[keep]


def mostpop_metrics(data: PreparedData, pairs: np.ndarray, exclude_history: bool, ks: list[int], top: int
                    ) -> tuple[dict[str, float], list[int | None]]:
    """MostPop (training-part popularity) on the (user, position) samples: metrics and per-sample ranks."""
    targets = [data.target(int(u), int(p)) for u, p in pairs]
    excluded = [data.history(int(u), int(p)).tolist() for u, p in pairs] if exclude_history else None
    ranks, lists = mostpop_ranks(data.train_popularity(), targets, excluded, top=top)
    return {**rank_metrics(ranks, ks, top), **coverage(lists, len(data.catalog), ks)}, ranks


def rank_users(recommender: Recommender, data: PreparedData, pairs: np.ndarray, num_beams: int, batch_size: int,
               exclude_history: bool, head: str, progress: bool = False,
               search: str = "beam", assist: bool | None = None,
               step: str = "auto") -> tuple[list[list[int]], list[int | None]]:
    """Each sample's ranked list (catalog indices, best first) and the rank of its target in it (None: absent)."""
    histories = [data.history(int(u), int(p)).tolist() for u, p in pairs]
    targets = [data.target(int(u), int(p)) for u, p in pairs]
    lists = recommender.recommend(histories, k=num_beams, num_beams=num_beams,
                                  exclude=histories if exclude_history else None, batch_size=batch_size,
                                  progress=progress, head=head, search=search, assist=assist, step=step)
    items = [[item for item, _ in ranked] for ranked in lists]
    ranks = [ranked.index(t) if t in ranked else None for ranked, t in zip(items, targets, strict=True)]
    return items, ranks


class RankingCheck:
    """NDCG@10 of a model being trained, on a seeded sample of validation users: the evaluation protocol
    (constrained beam search over the full catalog, past items excluded) on the valid split, for model
    selection and early stopping on the metric that is reported rather than on the loss."""

    def __init__(self, model: Any, tokenizer: Any, data: PreparedData, template: Any, max_history: int, users: int,
                 seed: int = 0, num_beams: int = 20, batch_size: int = 16, head: str = "catalog",
                 max_prompt_tokens: int | None = None) -> None:
        self.recommender = Recommender(model, tokenizer, data.catalog, template, max_history,
                                       max_prompt_tokens=max_prompt_tokens)
        self.data = data
        self.pairs = sample_users(data.splits["valid"], users, seed)
        self.num_beams, self.batch_size, self.head = num_beams, batch_size, head

    def __call__(self) -> float:
        import torch

        model = self.recommender.model
        was_training = model.training
        model.eval()
        self.recommender.refresh()  # the catalog head's rows were gathered from older weights
        try:
            with torch.no_grad():
                _, ranks = rank_users(self.recommender, self.data, self.pairs, self.num_beams, self.batch_size, True,
                                      self.head)
        finally:
            model.train(was_training)
        return float(ndcg_per_user(ranks, 10).mean())


def run(config: EvalConfig, data: PreparedData, recommender: Recommender | None = None) -> dict[str, Any]:
    """Evaluate an artifact on a split; returns (and writes) the metrics with their protocol."""
    recommender = recommender or Recommender.from_artifact(config.artifact, device=config.device)
    if recommender.catalog.fingerprint() != data.catalog.fingerprint():
        raise ValueError(
            "the artifact's catalog differs from the dataset's; evaluate with the data it was trained on"
        )
    pairs = sample_users(data.splits[config.split], config.users, config.seed)
    if len(pairs) == 0:
        raise ValueError(f"split {config.split!r} has no samples")
    targets = [data.target(int(u), int(p)) for u, p in pairs]
    started = time.perf_counter()
    items, ranks = rank_users(recommender, data, pairs, config.num_beams, config.batch_size, config.exclude_history,
                              config.head, progress=True, search=config.search, assist=config.assist,
                              step=config.step)
    seconds = time.perf_counter() - started
    ks = [k for k in DEFAULT_KS if k <= config.num_beams]
    assisted = recommender.uses_assistant(config.assist)
    llm = {**rank_metrics(ranks, ks, config.num_beams), **coverage(items, len(data.catalog), ks)}

    mostpop, pop_ranks = mostpop_metrics(data, pairs, config.exclude_history, ks, config.num_beams)

    protocol = {
        "dataset": data.name,
        "dataset_fingerprint": data.fingerprint,
        "split": f"{data.config.split}:{config.split}",
        "users": len(pairs),
        "users_sampled": config.users is not None and config.users < len(data.splits[config.split]),
        "seed": config.seed,
        "history_length": recommender.max_history,
        "template": recommender.template.name,
        "num_beams": config.num_beams,
        "catalog_size": len(data.catalog),
        "ranking": ("full catalog, every title scored exactly" if config.search == "exact" else
                    "full catalog, constrained beam search") + ", score = log P(title + end | prompt)"
                   + (f" + {recommender.assist_weight} × log P_assistant(item)" if assisted else ""),
        "assisted": assisted,
        "assist_weight": recommender.assist_weight if assisted else None,
        "search": config.search,
        "head": config.head,
        "vocab_size": int(recommender.model.config.vocab_size),
        "exclude_history": config.exclude_history,
    }
    result = {
        "protocol": protocol,
        "metrics": llm,
        "mostpop": mostpop,
        "decode_seconds": round(seconds, 2),
        "seconds_per_user": round(seconds / len(pairs), 4),
        "config": asdict(config),
    }
    output = Path(config.output) if config.output else Path(config.artifact) / "eval" / f"{config.split}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    per_user = pd.DataFrame(
        {
            "user_id": [data.users[int(u)] for u, _ in pairs],
            "target_item_id": [data.catalog.item_ids[t] for t in targets],
            "rank": [r if r is not None else -1 for r in ranks],
            "mostpop_rank": [r if r is not None else -1 for r in pop_ranks],
            "top_item_ids": [" ".join(data.catalog.item_ids[i] for i in row) for row in items],
        }
    )
    per_user.to_csv(output.with_suffix(".ranks.csv"), index=False)
    if Path(config.artifact).joinpath("prunerec.json").is_file():
        update_manifest(config.artifact, metrics={config.split: {"protocol": protocol, **llm}})
    logger.info("wrote %s", output)
    return result


def format_table(result: dict[str, Any], name: str = "model") -> str:
    """A plain-text table of the model beside MostPop."""
    keys = [k for k in result["metrics"] if k.startswith(("ndcg", "hr", "mrr"))]
    width = max(len(k) for k in keys)
    lines = [f"{'metric':<{width}}  {name:>10}  {'MostPop':>10}"]
    for key in keys:
        lines.append(f"{key:<{width}}  {result['metrics'][key]:>10.4f}  {result['mostpop'][key]:>10.4f}")
    p = result["protocol"]
    lines.append(
        f"protocol: {p['dataset']} {p['split']}, {p['users']} users, history {p['history_length']}, "
        f"{p['num_beams']} beams, catalog {p['catalog_size']}, exclude history={p['exclude_history']}"
    )
    return "\n".join(lines)
