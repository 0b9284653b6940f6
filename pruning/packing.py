"""Packed rows for fine-tuning and distillation on a GPU: several examples in one row, attention kept apart.

Examples of any template (the D3 instruction template included) are concatenated into rows of at most
``max_tokens`` tokens, with ``position_ids`` restarting at 0 at every example. Given position ids and no 2D
attention mask, transformers (>= 4.53, ``masking_utils.find_packed_sequence_indices``) builds the
block-diagonal causal mask for sdpa and eager attention and uses the variable-length kernels of flash
attention, so every example sees exactly its own tokens, at its own positions, as when it was alone in a
row (``tests/pruning/test_packing.py`` checks the logits). What packing changes is the padding: a batch of
``batch_size`` rows holds about ``batch_size × max_tokens`` real tokens instead of as many examples padded
to the longest one, so batches are sized in tokens.

No loss crosses a boundary: an example's first token is a prompt token (labelled -100), so the logits at the
last token of one example, which the shifted loss compares with the next token, never meet a label of the
next example. Packing refuses an example that starts with a label.

The compact template's windows (:func:`pruning.examples.packed_windows`) are a different thing: one user's
consecutive items as one causal sequence with many targets; they can be packed into rows as well.
"""

from __future__ import annotations

import logging

import numpy as np

from pruning.examples import IGNORE, Example

logger = logging.getLogger(__name__)


def pack(examples: list[Example], max_tokens: int, seed: int = 0) -> list[Example]:
    """Rows of at most ``max_tokens`` tokens, filled in a seeded random order (next fit: a row is closed when
    the next example does not fit). An example longer than ``max_tokens`` gets a row of its own, whole."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    order = np.random.default_rng(seed).permutation(len(examples))
    rows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    too_long = 0
    for index in order:
        example = examples[int(index)]
        if example.position_ids is not None:
            raise ValueError("an example is packed already")
        if example.labels and example.labels[0] != IGNORE:
            raise ValueError("an example starts with a labelled token; packing it would let the loss cross a boundary")
        n = len(example.input_ids)
        too_long += n > max_tokens
        if ids and len(ids) + n > max_tokens:
            rows.append(Example(ids, labels, positions))
            ids, labels, positions = [], [], []
        ids.extend(example.input_ids)
        labels.extend(example.labels)
        positions.extend(range(n))
    if ids:
        rows.append(Example(ids, labels, positions))
    if too_long:
        logger.warning("%d examples are longer than %d tokens; each has a row of its own", too_long, max_tokens)
    real = sum(len(e.input_ids) for e in examples)
    logger.info("packed %d examples (%d tokens) into %d rows of <= %d tokens (%.0f%% full)", len(examples), real,
                len(rows), max_tokens, 100 * real / max(len(rows) * max_tokens, 1))
    return rows
