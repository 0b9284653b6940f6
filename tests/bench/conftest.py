"""Shared by the pruning benchmarks' smoke tests: a briefly fine-tuned tiny Qwen2 (their pruning settings are
``helpers.TINY_PRUNE``)."""

from __future__ import annotations

import pytest
from helpers import save_model_dir, tiny_qwen2

from pruning.train import TrainConfig
from pruning.train import run as train


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory, tokenizer, prepared):
    root = tmp_path_factory.mktemp("dense")
    base = save_model_dir(root / "base", tiny_qwen2(len(tokenizer), layers=4), tokenizer)
    return train(TrainConfig(output=str(root / "dense"), model=str(base), max_steps=4, eval_every=4, lr=3e-3, epochs=20.0,
                             valid_examples=8, warmup_steps=0, patience=0), prepared)
