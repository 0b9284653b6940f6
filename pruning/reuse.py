"""What compression computes once per process and reuses, keyed by a digest of everything it depends on.

The benchmark runs the greedy and the TRSP compression paths from one dense model, and the retention curve
(:mod:`bench.retention`) prunes one dense model to several targets, each in the same process. Two results are
the same for every such run and cost minutes to recompute: the dense model's head scores
(:func:`pruning.importance.reused_head_importance`) and the teacher's distillation targets
(:class:`pruning.distill.TeacherCache` with ``shared=True``). They are kept in :class:`ProcessStore` s, keyed
by a digest of the model's weights and config, the device and the data they were computed on, so that a
different model, data set or setting is never served a stale result; the least recently used entry leaves
first. :func:`forget` drops them all (tests that count computations call it).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import torch
from torch import nn

Value = TypeVar("Value")

_STORES: list[ProcessStore] = []


class ProcessStore(Generic[Value]):
    """At most ``kept`` values by key, the least recently used dropped first; ``make`` builds a missing one."""

    def __init__(self, kept: int, make: Callable[[], Value]):
        if kept < 1:
            raise ValueError(f"a store keeps at least one value, got {kept}")
        self.kept = kept
        self.make = make
        self._values: OrderedDict[str, Value] = OrderedDict()
        _STORES.append(self)

    def get(self, key: str) -> Value:
        """The value under ``key`` (a new one from ``make`` when there is none), now the most recently used."""
        if key not in self._values:
            self._values[key] = self.make()
        self._values.move_to_end(key)
        while len(self._values) > self.kept:
            self._values.popitem(last=False)
        return self._values[key]

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def clear(self) -> None:
        self._values.clear()


def forget() -> None:
    """Drop every value every store of this process keeps."""
    for store in _STORES:
        store.clear()


def digest_tensors(tensors: Iterable[torch.Tensor], into: hashlib.blake2b) -> None:
    """Feed each tensor's dtype, shape and bytes to ``into`` (copied to the host when on a GPU)."""
    for tensor in tensors:
        tensor = tensor.detach().reshape(-1).contiguous().cpu()
        into.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        into.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def digest_model(model: nn.Module, into: hashlib.blake2b) -> None:
    """Feed a model's config, device and weights to ``into`` (about a second for SmolLM2 on a CPU)."""
    config = getattr(model, "config", None)
    if config is not None:
        into.update(config.to_json_string(use_diff=False).encode())
    into.update(str(next(model.parameters()).device.type).encode())
    # a tied LM head is the embedding's tensor under a second name: hash each tensor once (a third of the time)
    distinct = {(t.data_ptr(), tuple(t.shape), t.stride()): t for t in model.state_dict().values()}
    digest_tensors(distinct.values(), into)
