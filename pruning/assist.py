"""The assistant stage: train a text-free SASRec beside an LLM artifact and choose its mixing weight (D3).

"Decoding Matters" (Bao et al., 2024, §3.2, "text-free assistant"): the constrained search scores each title
prefix by the LLM's log-probability plus w × the log of the probability mass a text-free recommender puts on
the items under that prefix (:mod:`llmrec.decode`), without length normalisation. This stage

1. trains the assistant (:class:`llmrec.assistant.SASRec`) on the training part of every user's sequence
   (windows of ``max_length`` + 1 items, next-item cross-entropy over the whole catalog at every position),
   through the one training engine, with early stopping on validation NDCG@10 (all validation users, their
   past excluded; a full-catalog softmax, so this costs one forward pass) - or reuses a trained one
   (``source``), e.g. the dense model's for a pruned artifact;
2. chooses w on a seeded sample of validation users: the artifact's LLM decodes them with each candidate
   weight (w = 0 is the pure LLM), the best NDCG@10 wins (ties: the smaller weight);
3. writes ``<artifact>/assistant/`` (config.json + model.safetensors) and the manifest's ``assistant`` entry
   (weight, the sweep, the assistant's own validation NDCG@10, its training record).

D3's released code normalises nothing by length but applies the assistant at the last step only in some
variants; here the prior enters at every step, as the paper describes, so that beams are pruned with it.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmrec import configs
from llmrec.artifact import is_artifact, read_manifest, swap_in, update_manifest
from llmrec.assistant import ASSISTANT_DIR, AssistantConfig, SASRec
from pruning.engine import Engine, Schedule, adamw
from recdata.metrics import DEFAULT_KS, ndcg_per_user, rank_metrics
from recdata.prep import PreparedData

logger = logging.getLogger(__name__)


@dataclass
class AssistConfig:
    """Training of the assistant and the choice of its weight."""

    artifact: str
    """LLM artifact the assistant joins (written into <artifact>/assistant)."""
    source: str | None = None
    """Reuse the trained assistant of this artifact (or assistant directory) instead of training one; only
    the weight is chosen again."""
    epochs: float = 200
    """Most passes over the training windows (early stopping usually ends sooner)."""
    batch_size: int = 128
    """Training windows per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_length: int = 50
    """Most recent items the assistant sees (SASRec's 50)."""
    hidden_size: int = 64
    """Width of the item embeddings and blocks."""
    layers: int = 2
    """Self-attention blocks."""
    heads: int = 2
    """Attention heads per block."""
    dropout: float = 0.2
    """Dropout on the embeddings, attention and blocks."""
    eval_every_epochs: float = 2.0
    """Epochs between validations (NDCG@10 on every validation user)."""
    patience: int = 5
    """Validations without improvement before stopping."""
    max_minutes: float | None = None
    """Time budget of the training."""
    weights: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    """Candidate mixing weights w (0 = the pure LLM)."""
    weight: float | None = None
    """Use this weight and skip the sweep."""
    select_users: int = 200
    """Seeded validation users the LLM decodes per candidate weight."""
    num_beams: int = 20
    """Beams of the sweep's decoding (the evaluation protocol's 20)."""
    head: str = "catalog"
    """Next-token normalisation of the sweep's decoding (as evaluation and serving use it)."""
    decode_batch_size: int = 16
    """Users decoded together during the sweep."""
    device: str | None = None
    """cpu or cuda (default: cuda when available)."""
    seed: int = 0
    """Seed of the initialisation, the window order and the sweep's users."""


PROFILES: dict[str, dict[str, Any]] = {
    # minutes on 2 cores: the sweep decodes select_users × weights users with the LLM (about 2 s each here)
    # a cpu-profile LLM (8 minutes of fine-tuning) measured best at w = 16 of 0..64 (README): the grid spans it
    # (and the pruned model of that run at w = 32, the largest then: the grid goes on to 64)
    "cpu": {"select_users": 50, "weights": [0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]},
    "gpu": {"select_users": 300, "weights": [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], "device": "cuda"},
    "tiny": {"epochs": 4, "eval_every_epochs": 1.0, "select_users": 8, "weights": [0.0, 1.0], "hidden_size": 16,
             "layers": 1, "max_length": 8},
}


def apply_profile(config: AssistConfig, profile: str) -> AssistConfig:
    return configs.apply_profile(config, PROFILES, profile)


def training_windows(data: PreparedData, max_length: int) -> list[np.ndarray]:
    """Each user's training part cut into windows of at most ``max_length`` + 1 items, newest first; windows
    overlap by one item so that every item after a user's first is a target exactly once."""
    windows = []
    for sequence, length in zip(data.sequences, data.train_lengths, strict=True):
        seen = sequence[: int(length)]
        end = len(seen)
        while end >= 2:
            start = max(0, end - (max_length + 1))
            windows.append(seen[start:end])
            end = start + 1
            if start == 0:
                break
    return windows


def collate_windows(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input tokens (B, L) (catalog index + 1, 0 = padding) and targets (B, L) (-100 = none)."""
    length = max(len(w) for w in windows) - 1
    tokens = torch.zeros((len(windows), length), dtype=torch.long)
    targets = torch.full((len(windows), length), -100, dtype=torch.long)
    for row, window in enumerate(windows):
        items = torch.as_tensor(window, dtype=torch.long)
        tokens[row, : len(window) - 1] = items[:-1] + 1
        targets[row, : len(window) - 1] = items[1:]
    return tokens, targets


def assistant_ranks(model: SASRec, data: PreparedData, pairs: np.ndarray, batch_size: int = 1024) -> list[int]:
    """The rank (0 = first) of each sample's target under the assistant alone, over the whole catalog with
    the user's past excluded (the evaluation protocol without the LLM)."""
    ranks: list[int] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        histories = [data.history(int(u), int(p)).tolist() for u, p in chunk]
        log_probs = model.log_probs(histories, excluded=histories).cpu()
        targets = torch.tensor([data.target(int(u), int(p)) for u, p in chunk])
        target_scores = log_probs.gather(1, targets[:, None])
        ranks.extend(int(r) for r in (log_probs > target_scores).sum(1).tolist())
    return ranks


def validation_ndcg(model: SASRec, data: PreparedData, pairs: np.ndarray) -> float:
    """Mean NDCG@10 of the assistant alone on (user, position) samples, each user's past excluded."""
    return float(ndcg_per_user(assistant_ranks(model, data, pairs), 10).mean())


def assistant_metrics(artifact: str | Path, data: PreparedData, pairs: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS
                      ) -> dict[str, float]:
    """HR/NDCG/MRR of an artifact's assistant alone on the samples (a row beside the LLMs it assists)."""
    ranks = assistant_ranks(SASRec.load(_assistant_source(str(artifact))), data, pairs)
    return rank_metrics([r if r < max(ks) else None for r in ranks], ks, max(ks))


def train_assistant(config: AssistConfig, data: PreparedData, device: torch.device) -> tuple[SASRec, dict[str, Any]]:
    """Train a SASRec on the training part; returns it (best validated weights) and its training record."""
    torch.manual_seed(config.seed)
    model = SASRec(AssistantConfig(num_items=len(data.catalog), max_length=config.max_length,
                                   hidden_size=config.hidden_size, layers=config.layers, heads=config.heads,
                                   dropout=config.dropout, catalog_fingerprint=data.catalog.fingerprint())).to(device)
    windows = training_windows(data, config.max_length)
    steps_per_epoch = max(1, math.ceil(len(windows) / config.batch_size))
    schedule = Schedule(batch_size=config.batch_size, epochs=config.epochs, max_minutes=config.max_minutes,
                        max_grad_norm=None, eval_every=max(1, round(config.eval_every_epochs * steps_per_epoch)),
                        patience=config.patience, min_delta=1e-4, seed=config.seed, log_every=steps_per_epoch)
    engine = Engine(model, adamw(list(model.parameters()), config.lr, config.weight_decay), schedule,
                    desc="assistant", metric="valid_ndcg@10", maximize=True)
    valid = data.splits["valid"]

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, targets = (t.to(device) for t in batch)
        logits = model.item_logits(model.hidden_states(tokens))  # (B, L, I)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    def validate() -> float:
        model.eval()
        try:
            return validation_ndcg(model, data, valid)
        finally:
            model.train()

    engine.fit(windows, collate_windows, loss_of, validate)
    engine.restore_best(model)
    model.eval()
    return model, {**engine.record(), "windows": len(windows)}


def sweep_users(config: AssistConfig, data: PreparedData) -> np.ndarray:
    """The seeded validation samples the weight sweep decodes."""
    from pruning.evaluate import sample_users

    return sample_users(data.splits["valid"], config.select_users, config.seed)


def choose_weight(config: AssistConfig, data: PreparedData, recommender: Any, assistant: SASRec) -> tuple[float, dict[str, float]]:
    """The candidate weight with the best validation NDCG@10 of the assisted LLM, and every candidate's."""
    from pruning.evaluate import rank_users

    pairs = sweep_users(config, data)
    sweep: dict[str, float] = {}
    for weight in sorted(set(config.weights)):
        recommender.attach_assistant(assistant, weight)
        _, ranks = rank_users(recommender, data, pairs, config.num_beams, config.decode_batch_size, True, config.head,
                              progress=True)
        sweep[str(weight)] = float(ndcg_per_user(ranks, 10).mean())
        logger.info("assistant weight %s: valid NDCG@10 %.4f on %d users", weight, sweep[str(weight)], len(pairs))
    best = max(sweep, key=lambda w: (sweep[w], -float(w)))
    if len(sweep) > 1 and float(best) == max(config.weights):
        logger.warning("the best assistant weight is the largest candidate (%s): a larger one may be better still "
                       "(--weights); the LLM then adds little to its assistant on these users", best)
    return float(best), sweep


def _assistant_source(source: str) -> Path:
    """An artifact's assistant directory, or the directory given when it is not an artifact."""
    path = Path(source)
    return path / ASSISTANT_DIR if is_artifact(path) else path


def _install(assistant: SASRec, artifact: Path) -> None:
    """Write ``artifact/assistant`` atomically (staged beside it, then renamed over any older one)."""
    staging = artifact / f".{ASSISTANT_DIR}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    assistant.save(staging)
    swap_in(staging, artifact / ASSISTANT_DIR)


def run(config: AssistConfig, data: PreparedData) -> Path:
    """Train (or reuse) the assistant, choose its weight, write both into the artifact; returns its path."""
    from llmrec.recommender import Recommender

    artifact = Path(config.artifact)
    manifest = read_manifest(artifact)
    if manifest["catalog"]["fingerprint"] != data.catalog.fingerprint():
        raise ValueError("the artifact's catalog differs from the dataset's; train the assistant on the data the "
                         "artifact was trained on")
    if config.weight is not None and config.weight < 0:
        raise ValueError(f"weight must be >= 0, got {config.weight}")
    if not config.weights and config.weight is None:
        raise ValueError("give candidate weights or a fixed weight")
    recommender = Recommender.from_artifact(artifact, device=config.device)
    device = recommender.device
    if config.source is not None:
        assistant = SASRec.load(_assistant_source(config.source), device=device)
        training: dict[str, Any] = {"reused": str(config.source)}
    else:
        assistant, training = train_assistant(config, data, device)
    recommender.attach_assistant(assistant, 0.0)  # checks the catalog
    assistant_ndcg = validation_ndcg(assistant, data, data.splits["valid"])
    logger.info("assistant alone: valid NDCG@10 %.4f", assistant_ndcg)
    sweep: dict[str, float] = {}
    if config.weight is not None:
        weight = float(config.weight)
    else:
        weight, sweep = choose_weight(config, data, recommender, assistant)
    _install(assistant, artifact)
    alone_on_sweep = validation_ndcg(assistant, data, sweep_users(config, data)) if sweep else None
    update_manifest(artifact, assistant={
        "kind": "sasrec", "path": ASSISTANT_DIR, "weight": weight, "valid_ndcg@10_by_weight": sweep,
        "select_users": config.select_users if sweep else 0, "assistant_valid_ndcg@10": assistant_ndcg,
        "assistant_valid_ndcg@10_sweep_users": alone_on_sweep,
        "training": training, "config": asdict(config),
    })
    logger.info("assistant written to %s (weight %s)", artifact / ASSISTANT_DIR, weight)
    return artifact
