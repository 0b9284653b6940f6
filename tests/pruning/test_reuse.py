"""pruning.reuse: the process-wide stores and the digests that key them."""

from __future__ import annotations

import hashlib

import pytest
import torch
from helpers import tiny_llama

from pruning import reuse


def test_a_store_keeps_the_most_recently_used_values_and_forget_empties_it():
    made: list[int] = []
    store: reuse.ProcessStore[list[int]] = reuse.ProcessStore(2, lambda: made.append(1) or [])
    store.get("a").append(1)
    store.get("b")
    assert store.get("a") == [1] and len(made) == 2  # "a" reused, now the most recent
    store.get("c")  # evicts "b", the least recently used
    assert "a" in store and "c" in store and "b" not in store
    reuse.forget()
    assert "a" not in store and "c" not in store
    with pytest.raises(ValueError, match="at least one"):
        reuse.ProcessStore(0, list)


def test_a_model_digest_follows_its_weights():
    def digest(model: torch.nn.Module) -> str:
        into = hashlib.blake2b(digest_size=16)
        reuse.digest_model(model, into)
        return into.hexdigest()

    model = tiny_llama(64, layers=1)
    before = digest(model)
    assert digest(tiny_llama(64, layers=1)) == before  # same seed, same weights
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    assert digest(model) != before
