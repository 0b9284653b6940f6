"""Shared fixtures: a small interaction fixture, a tiny tokenizer, tiny Llama/Qwen2 models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_tokenizer, template_texts, tiny_llama

from recdata.prep import PreparedData, PrepConfig, prepare
from recdata.sources import RawData

# The tiny test models are far faster on one thread, and several threads per process oversubscribe the cores
# when anything else runs (25x slower measured with a concurrent job on 2 cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _nothing_reused_across_tests():
    """Every test scores heads and runs its teacher itself: the process-wide reuse (pruning.reuse) would
    otherwise depend on which tests ran before."""
    from pruning import reuse

    reuse.forget()
    yield
    reuse.forget()

TITLES = [
    "Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
    "Twelve Monkeys (1995)", "Babe (1995)", "Dead Man Walking (1995)", "Richard III (1995)", "Seven (1995)",
    "Usual Suspects, The (1995)", "Mighty Aphrodite (1995)", "Postino, Il (1994)", "French Twist (1995)",
    "From Dusk Till Dawn (1996)", "White Balloon, The (1995)", "Antonia's Line (1995)", "Angels and Insects (1995)",
    "Muppet Treasure Island (1996)", "Braveheart (1995)",
]


def synthetic_raw(users: int = 30, seed: int = 0) -> RawData:
    """Users walking through the catalog with a drift, so there is sequential signal to learn."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        start = int(rng.integers(0, len(TITLES)))
        length = int(rng.integers(6, 14))
        for step in range(length):
            item = (start + step + int(rng.integers(0, 2))) % len(TITLES)
            rows.append((f"u{u}", f"i{item}", float(step * 10 + u), float(rng.integers(1, 6))))
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    interactions = interactions.drop_duplicates(["user_id", "item_id"])
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(len(TITLES))], "title": TITLES})
    return RawData(interactions, items, name="synthetic")


@pytest.fixture(scope="session")
def prepared() -> PreparedData:
    return prepare(synthetic_raw(), PrepConfig(append_year_field=None))


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer(TITLES + [" " + t for t in TITLES] + template_texts())


@pytest.fixture()
def llama(tokenizer):
    return tiny_llama(len(tokenizer))
