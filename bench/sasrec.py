"""The classic baseline: RecBole SASRec (Kang & McAuley 2018) on exactly the split the LLMs are scored on.

RecBole 1.2.1 is driven through its config / data / trainer modules (its ``quick_start`` imports ray tune).
The prepared sequences are written as a RecBole atomic file whose timestamps are each user's positions
0..n−1, so RecBole's leave-one-out split (``LS: valid_and_test``, ``order: TO``) reproduces ours item for
item; every catalog item is registered through an ``.item`` file so the ranking is over the whole catalog.
RecBole trains with early stopping on its validation NDCG@10. The *test* scores are then computed here, not
by RecBole's evaluator: for each of our test samples the model's full-sort scores are taken, the user's
whole past is masked (as in the LLM protocol) and the rank of the target is scored with
:func:`recdata.metrics.rank_metrics`, so SASRec and the LLMs share one metric implementation and one
exclusion rule. RecBole's own evaluator masks no history for sequential models, so its figures are lower
(ml-100k, all 943 test users, 5 epochs: NDCG@10 0.057 unmasked against 0.100 with the past excluded); they
are kept beside ours as ``test_recbole``, and with ``exclude_history=False`` the two agree.
``Trainer.evaluate(load_best_model=True)`` calls ``torch.load`` in a way torch ≥ 2.6 refuses, so the best
checkpoint RecBole wrote is loaded here.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from recdata.metrics import DEFAULT_KS, rank_metrics
from recdata.prep import PreparedData

logger = logging.getLogger(__name__)


@dataclass
class SASRecConfig:
    """SASRec training; defaults follow DESIGN.md §3 (CE loss, dropout 0.2, batch 256, max length 50)."""

    output: str
    """Work directory (atomic files, RecBole checkpoints, metrics)."""
    epochs: int = 50
    """Most epochs (the cpu benchmark profile caps this; early stopping usually ends sooner)."""
    stopping_step: int = 3
    """Validation evaluations without improvement before stopping."""
    batch_size: int = 256
    lr: float = 1e-3
    max_length: int = 50
    dropout: float = 0.2
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    seed: int = 2020
    device: str = "cpu"
    exclude_history: bool = True
    """Mask each user's whole past before ranking (the LLM protocol). RecBole's own evaluator masks nothing for
    sequential models (its ``history_index`` is None), so its figures are those of ``False``."""


def recbole_modules() -> tuple[Any, ...]:
    """RecBole's Config, create_dataset, data_preparation, SASRec, Trainer and init_seed.

    Importing ``recbole.model.sequential_recommender`` runs ``torch.autograd.set_detect_anomaly(True)`` at
    module level (in ``sine.py``), for the whole process: every later backward pass, ours included, then
    checks each gradient for NaNs and records forward stack traces, which made SASRec's epochs several times
    slower here. The import is made here and anomaly detection put back as it was.
    """
    anomaly = torch.is_anomaly_enabled()
    try:
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.model.sequential_recommender.sasrec import SASRec
        from recbole.trainer import Trainer
        from recbole.utils import init_seed
    finally:
        torch.autograd.set_detect_anomaly(anomaly)
    return Config, create_dataset, data_preparation, SASRec, Trainer, init_seed


def _write_atomic(data: PreparedData, directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{name}.inter", "w") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, sequence in zip(data.users, data.sequences, strict=True):
            for position, item in enumerate(sequence):
                handle.write(f"{user}\t{data.catalog.item_ids[int(item)]}\t{position}\n")
    with open(directory / f"{name}.item", "w") as handle:
        handle.write("item_id:token\n")
        for item_id in data.catalog.item_ids:
            handle.write(f"{item_id}\n")


def _check_same_split(data: PreparedData, dataset: Any, test: Any) -> None:
    """RecBole's test targets must be ours, user for user (the point of writing positions as timestamps)."""
    users = dataset.id2token(dataset.uid_field, test.inter_feat[dataset.uid_field].numpy())
    items = dataset.id2token(dataset.iid_field, test.inter_feat[dataset.iid_field].numpy())
    theirs = dict(zip(users.tolist(), items.tolist(), strict=True))
    ours = {data.users[int(u)]: data.catalog.item_ids[data.target(int(u), int(p))] for u, p in data.splits["test"]}
    if theirs != ours:
        differing = [u for u in ours if theirs.get(u) != ours[u]][:5]
        raise RuntimeError(f"RecBole's leave-one-out test split differs from prunerec's (users {differing})")


def run(config: SASRecConfig, data: PreparedData, users: np.ndarray | None = None) -> dict[str, Any]:
    """Train SASRec and score it on the test split (or the given (user, position) test samples)."""
    if data.config.split != "loo":
        raise ValueError("the SASRec baseline reproduces the leave-one-out split only")
    Config, create_dataset, data_preparation, SASRec, Trainer, init_seed = recbole_modules()
    work = Path(config.output)
    name = "prunerec"
    _write_atomic(data, work / "data" / name, name)
    settings = {
        "data_path": str(work / "data"), "checkpoint_dir": str(work / "saved"), "device": config.device,
        "use_gpu": config.device != "cpu", "seed": config.seed, "reproducibility": True, "show_progress": False,
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "MAX_ITEM_LIST_LENGTH": config.max_length, "loss_type": "CE", "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["NDCG", "Hit"], "topk": [10], "valid_metric": "NDCG@10",
        "epochs": config.epochs, "stopping_step": config.stopping_step, "train_batch_size": config.batch_size,
        "eval_batch_size": 4096, "learning_rate": config.lr, "hidden_dropout_prob": config.dropout,
        "attn_dropout_prob": config.dropout, "hidden_size": config.hidden_size, "inner_size": 4 * config.hidden_size,
        "n_layers": config.layers, "n_heads": config.heads, "log_wandb": False, "state": "WARNING",
    }
    with warnings.catch_warnings():  # recbole 1.2.1 on pandas 2 warns about chained assignment, harmlessly
        warnings.simplefilter("ignore", FutureWarning)
        recbole_config = Config(model="SASRec", dataset=name, config_dict=settings)
        init_seed(config.seed, True)
        dataset = create_dataset(recbole_config)
        train_data, valid_data, test_data = data_preparation(recbole_config, dataset)
        _check_same_split(data, dataset, test_data.dataset)
        model = SASRec(recbole_config, train_data.dataset).to(recbole_config["device"])
        # RecBole's Trainer writes TensorBoard events to ./log_tensorboard of the working directory; keep them
        # in the work directory instead.
        from torch.utils.tensorboard import SummaryWriter

        with mock.patch("recbole.trainer.trainer.get_tensorboard",
                        lambda _logger: SummaryWriter(str((work / "tensorboard").resolve()))):
            trainer = Trainer(recbole_config, model)
        started = time.monotonic()
        logger.info("training SASRec (at most %d epochs)", config.epochs)
        _, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
        minutes = (time.monotonic() - started) / 60
    checkpoint = torch.load(trainer.saved_model_file, map_location=recbole_config["device"], weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    # RecBole's own test figures (no history masking), beside ours: a cross-check of the recomputation below
    recbole_test = {k: float(v) for k, v in trainer.evaluate(test_data, load_best_model=False, show_progress=False).items()}

    pairs = users if users is not None else data.splits["test"]
    item_token = {item: int(index) for item, index in zip(
        data.catalog.item_ids, dataset.token2id(dataset.iid_field, data.catalog.item_ids), strict=True)}
    to_model = np.array([item_token[i] for i in data.catalog.item_ids])  # catalog index -> RecBole id
    ranks: list[int | None] = []
    with torch.no_grad():
        for start in range(0, len(pairs), 256):
            chunk = pairs[start : start + 256]
            sequences = [to_model[data.history(int(u), int(p))][-config.max_length :] for u, p in chunk]
            lengths = torch.tensor([len(s) for s in sequences])
            padded = torch.zeros(len(sequences), config.max_length, dtype=torch.long)
            for row, sequence in enumerate(sequences):
                padded[row, : len(sequence)] = torch.as_tensor(sequence)
            from recbole.data.interaction import Interaction

            batch = Interaction({model.ITEM_SEQ: padded, model.ITEM_SEQ_LEN: lengths}).to(recbole_config["device"])
            scores = model.full_sort_predict(batch).view(len(chunk), -1).cpu()[:, torch.as_tensor(to_model)]  # (B, catalog)
            for row, (u, p) in enumerate(chunk):
                row_scores = scores[row].clone()
                if config.exclude_history:
                    row_scores[torch.as_tensor(data.history(int(u), int(p)))] = -torch.inf  # the whole past excluded
                target = data.target(int(u), int(p))
                rank = int((row_scores > row_scores[target]).sum())
                ranks.append(rank if rank < max(DEFAULT_KS) else None)
    metrics = rank_metrics(ranks, DEFAULT_KS, max(DEFAULT_KS))
    return {
        "metrics": metrics, "ranks": ranks, "best_valid_recbole": {k: float(v) for k, v in (best_valid or {}).items()},
        "test_recbole": recbole_test,
        "epochs_run": len(trainer.train_loss_dict), "minutes": round(minutes, 2),
        "params": int(sum(p.numel() for p in model.parameters())), "config": asdict(config),
    }
