"""Training examples: token ids and labels for next-item fine-tuning (BIGRec/D3 style).

Two layouts, both with the loss on response tokens only (labels are -100 elsewhere):

- one sample per target: ``prompt(last N items before the target) + response(target) + end``;
- packed windows (packable templates only, e.g. ``compact``): a window of up to N+1 consecutive items of a
  user's training sequence is one causal sequence ``prefix + item_1 + ... + item_m``; every item after
  the first of the user's sequence is a target, its history being the window's earlier items. Windows
  overlap by ``N + 1 - stride`` items and only the last ``stride`` items of a window (every item of a
  user's first window) carry labels, so each training target is learnt exactly once with between
  ``N + 1 - stride`` and N items of history. One forward pass trains up to ``stride`` targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmrec.prompting import PromptEncoder
from recdata.prep import PreparedData

logger = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    """Set on a packed row (:mod:`pruning.packing`): positions restart at every example packed into it."""

    @property
    def targets(self) -> int:
        """Labelled tokens."""
        return sum(1 for label in self.labels if label != IGNORE)

    def target_items(self, end_id: int) -> int:
        """Labelled items (each response ends with the end token)."""
        return sum(1 for label in self.labels if label == end_id)


def sample_example(encoder: PromptEncoder, history_titles: list[str], target_title: str) -> Example:
    prompt = encoder.prompt_ids(history_titles)
    response = encoder.response_ids(target_title)
    return Example(prompt + response, [IGNORE] * len(prompt) + response)


def split_examples(data: PreparedData, encoder: PromptEncoder, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
    """One example per sample of a split (optionally a seeded random subset of ``limit``)."""
    pairs = data.splits[split]
    if limit is not None and limit < len(pairs):
        pairs = pairs[np.sort(np.random.default_rng(seed).choice(len(pairs), size=limit, replace=False))]
    titles = data.catalog.titles
    out = []
    for user, position in pairs:
        history = [titles[i] for i in data.history(int(user), int(position))]
        out.append(sample_example(encoder, history, titles[data.target(int(user), int(position))]))
    return out


def packed_windows(data: PreparedData, max_history: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(user, start, first_labelled, end) windows over each user's training part: items [start, end) are in
    the window, items [first_labelled, end) carry labels; every training target is labelled exactly once."""
    if not 1 <= stride <= max_history:
        raise ValueError(f"stride must be in [1, max_history={max_history}], got {stride}")
    windows = []
    width = max_history + 1
    for user, length in enumerate(data.train_lengths):
        length = int(length)
        if length < 2:
            continue
        end = min(width, length)
        windows.append((user, 0, 1, end))
        while end < length:
            previous, end = end, min(end + stride, length)
            windows.append((user, max(0, end - width), previous, end))
    return windows


def window_example(
    data: PreparedData, encoder: PromptEncoder, user: int, start: int, first_labelled: int, end: int
) -> Example:
    if not encoder.template.packable:
        raise ValueError(f"template {encoder.template.name!r} cannot be packed; use per-sample examples")
    titles = data.catalog.titles
    seq = data.sequences[user]
    # a history item is the item's response and then its item token (when the model has them; the window's
    # last item is a target only, so it needs none)
    pieces = [encoder.response_ids(titles[int(seq[position])]) + (encoder.item_token(titles[int(seq[position])])
              if position < end - 1 else []) for position in range(start, end)]
    ids = encoder.prompt_ids([])
    if encoder.max_prompt_tokens is not None:  # the prompt-length guard: each target's prompt must fit it
        while len(pieces) > 1 and len(ids) + sum(map(len, pieces[:-1])) > encoder.max_prompt_tokens:
            pieces.pop(0)
            start += 1
    labels = [IGNORE] * len(ids)
    for position, piece in zip(range(start, end), pieces, strict=True):
        ids.extend(piece)
        target = len(encoder.response_ids(titles[int(seq[position])]))  # the item token is input, never a label
        labels.extend(piece[:target] + [IGNORE] * (len(piece) - target) if position >= first_labelled
                      else [IGNORE] * len(piece))
    return Example(ids, labels)


def training_example_count(data: PreparedData, encoder: PromptEncoder, packing: bool, stride: int | None = None) -> int:
    """How many examples :func:`training_examples` would give without a limit (windows or samples)."""
    if not packing:
        return len(data.splits["train"])
    return len(packed_windows(data, encoder.max_history, stride or encoder.max_history))


def training_examples(
    data: PreparedData,
    encoder: PromptEncoder,
    packing: bool,
    stride: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """Examples over the training split: packed windows or one sample per target; ``limit`` keeps a seeded
    random subset (of windows or samples)."""
    if not packing:
        return split_examples(data, encoder, "train", limit=limit, seed=seed)
    stride = stride or encoder.max_history
    windows = packed_windows(data, encoder.max_history, stride)
    if limit is not None and limit < len(windows):
        keep = np.sort(np.random.default_rng(seed).choice(len(windows), size=limit, replace=False))
        windows = [windows[i] for i in keep]
    return [window_example(data, encoder, *window) for window in windows]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (real tokens), labels (padding labelled -100), all (B, T).

    A batch of packed rows also gets ``position_ids``; the model is then called with them and without the
    attention mask (:func:`model_inputs`), and transformers builds the block-diagonal causal mask from the
    restarting positions. The padding at a row's end starts a segment of its own (positions from 0), so no
    real token attends to it either way."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    positions = torch.zeros((len(examples), length), dtype=torch.long) if packed else None
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.as_tensor(example.input_ids)
        labels[row, :n] = torch.as_tensor(example.labels)
        attention[row, :n] = 1
        if positions is not None:
            own = example.position_ids if example.position_ids is not None else list(range(n))
            positions[row, :n] = torch.as_tensor(own)
            positions[row, n:] = torch.arange(length - n)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if positions is not None:
        batch["position_ids"] = positions
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword arguments for a collated batch: a packed batch passes its position ids, no
    attention mask and no cache (transformers builds the packed-sequence mask only when neither a 2D mask nor
    a cache is given)."""
    if "position_ids" in batch:
        return {**{k: v for k, v in batch.items() if k != "attention_mask"}, "use_cache": False}
    return batch
