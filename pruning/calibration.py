"""Calibration data and the teacher's distribution at response positions (PruneRec, arXiv 2507.07064, §3.2).

The released PruneRec code calibrates on one sample and compares unshifted logits; here a calibration set
of many training prompts (seeded) is batched with padding masked, and every comparison is made at the
*shifted* response positions: the logits at position t predict the token at t + 1, so the positions that
matter are those whose next token carries a label.

The teacher's distribution is cached once, coarsened to its top-k tokens plus one "tail" bucket holding
the remaining mass. KL between two coarsened distributions is exact for that partition (and a lower bound
of the full-vocabulary KL); it needs k + 1 numbers per position instead of the vocabulary size.

A :class:`LossVocabulary` restricts the logits to a set of tokens (the softmax, the CE and the KL then run over
those rows of the LM head only): a recommender's responses are catalog titles, so the distillation can be done
over the tokens the served ``catalog`` head scores (:mod:`pruning.distill`, ``vocab = "catalog"``), a few
thousand rows instead of the whole vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from llmrec.prompting import PromptEncoder
from pruning.examples import IGNORE, Example, collate, split_examples, training_example_count, training_examples
from recdata.prep import PreparedData

logger = logging.getLogger(__name__)


@dataclass
class CalibrationConfig:
    """Which samples calibrate importance scores."""

    samples: int = 128
    """Training samples (one prompt + response each), a seeded random subset of the training split."""
    batch_size: int = 8
    """Calibration samples per forward pass."""
    seed: int = 0
    """Seed of the calibration sample."""
    top_k: int = 64
    """Teacher tokens kept per position (plus one tail bucket)."""


@dataclass
class Batch:
    input_ids: torch.Tensor
    """(B, T)"""
    attention_mask: torch.Tensor
    """(B, T)"""
    labels: torch.Tensor
    """(B, T), -100 outside responses"""
    position_ids: torch.Tensor | None = None
    """(B, T) for packed rows (:mod:`pruning.packing`): the model gets these and no attention mask."""
    response_index: torch.Tensor | None = None
    """(n,) flat indices (row · T + column) of the response positions, row-major; computed where the batch is
    built (the host), so that selecting them on a GPU needs no synchronisation (a boolean mask would)."""
    targets: torch.Tensor = None  # type: ignore[assignment]
    """(n,) the tokens predicted at the response positions, in the same order."""

    def __post_init__(self) -> None:
        if self.response_index is None:
            self.response_index = self.response.flatten().nonzero().squeeze(1)
        if self.targets is None:
            self.targets = self.labels[:, 1:][self.labels[:, 1:] != IGNORE]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward (packed rows: positions, no 2D mask)."""
        if self.position_ids is not None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    @property
    def response(self) -> torch.Tensor:
        """(B, T) bool: positions whose *next* token is a response token (the shifted targets)."""
        mask = torch.zeros_like(self.labels, dtype=torch.bool)
        mask[:, :-1] = self.labels[:, 1:] != IGNORE
        return mask

    def response_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, d) the hidden states (B, T, d) at the response positions."""
        assert self.response_index is not None
        return hidden.flatten(0, 1).index_select(0, self.response_index)

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``; to a GPU through pinned memory without waiting (a copy from pageable memory
        would wait for the GPU's queued work: a host synchronisation per step)."""
        target = torch.device(device)
        pin = target.type == "cuda"

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None or tensor.device == target:
                return tensor
            if pin and tensor.device.type == "cpu":
                return tensor.pin_memory().to(target, non_blocking=True)
            return tensor.to(target)

        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels),  # type: ignore[arg-type]
                     move(self.position_ids), move(self.response_index), move(self.targets))  # type: ignore[arg-type]


def collate_batch(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded tensors of the examples (padding and prompts labelled -100)."""
    tensors = collate(examples, pad_id)
    return Batch(tensors["input_ids"], tensors["attention_mask"], tensors["labels"], tensors.get("position_ids"))


def batches(examples: list[Example], pad_id: int, batch_size: int, max_tokens: int | None = None) -> list[Batch]:
    """The examples in order, ``batch_size`` at a time; with ``max_tokens``, as many at a time as fit in that
    many padded tokens (at least ``batch_size``, or what is left)."""
    if max_tokens is None:
        return [collate_batch(examples[start : start + batch_size], pad_id) for start in range(0, len(examples), batch_size)]
    groups: list[list[Example]] = []
    longest = 0
    for example in examples:
        length = max(longest, len(example.input_ids))
        if groups and (len(groups[-1]) < batch_size or (len(groups[-1]) + 1) * length <= max_tokens):
            groups[-1].append(example)
            longest = length
        else:
            groups.append([example])
            longest = len(example.input_ids)
    return [collate_batch(group, pad_id) for group in groups]


def validation_batches(examples: list[Example], pad_id: int, batch_size: int, pack_tokens: int | None) -> list[Batch]:
    """Batches of the validation examples of a loop whose training batches are ``batch_size`` rows (of
    ``pack_tokens`` tokens when packed). Validation examples are single prompts, never packed: batched by the
    same count, a packed loop's 2 rows of 2048 tokens would become 2 prompts a forward pass, so 256 validation
    users took 128 passes, each paying a step's host overhead on a GPU. With packing they are batched to the
    same token budget instead (about 27 prompts of ~150 tokens a pass)."""
    return batches(examples, pad_id, batch_size, batch_size * pack_tokens if pack_tokens else None)


def calibration_batches(data: PreparedData, encoder: PromptEncoder, config: CalibrationConfig, pad_id: int) -> list[Batch]:
    """Seeded training samples (history -> next item), batched."""
    examples = split_examples(data, encoder, "train", limit=config.samples, seed=config.seed)
    return batches(examples, pad_id, config.batch_size)


def distillation_examples(data: PreparedData, encoder: PromptEncoder, limit: int | None, seed: int) -> list[Example]:
    """The examples distillation trains on: the same layout as fine-tuning (packed when possible). A limit below
    what the training split holds is said in the log (never a silent cap), and one above it too."""
    packing = encoder.template.packable
    available = training_example_count(data, encoder, packing)
    kind = "packed windows" if packing else "samples"
    if limit is not None and limit < available:
        logger.warning("distilling on %d of the %d training %s (--distill-examples caps it; none = all)",
                       limit, available, kind)
    elif limit is not None and limit > available:
        logger.info("--distill-examples %d asks for more than the %d training %s: all of them are used",
                    limit, available, kind)
    else:
        logger.info("distilling on all %d training %s", available, kind)
    return training_examples(data, encoder, packing, None, limit, seed + 1)


@dataclass
class LossVocabulary:
    """The tokens a loss's softmax runs over: ``ids`` (U,) ascending token ids; ``local`` (V,) each token's
    column among them (-1: not in the set)."""

    ids: torch.Tensor
    local: torch.Tensor

    @classmethod
    def of(cls, tokens: Iterable[int], vocab_size: int) -> LossVocabulary:
        ids = torch.tensor(sorted(set(tokens)), dtype=torch.long)
        if not ids.numel() or int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
            raise ValueError(f"a loss vocabulary needs token ids in [0, {vocab_size}), got {ids.numel()} ids")
        local = torch.full((vocab_size,), -1, dtype=torch.long)
        local[ids] = torch.arange(ids.numel())
        return cls(ids, local)

    def __len__(self) -> int:
        return int(self.ids.numel())

    def to(self, device: torch.device | str) -> LossVocabulary:
        return LossVocabulary(self.ids.to(device), self.local.to(device))

    def columns(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> their columns in the restricted logits; every token must be in the set."""
        columns = self.local[tokens]
        if bool((columns < 0).any()):
            outside = sorted(set(tokens[columns < 0].tolist()))[:10]
            raise ValueError(f"labels outside the loss vocabulary of {len(self)} tokens (e.g. token ids {outside})")
        return columns


def catalog_vocabulary(model: PreTrainedModel, encoder: PromptEncoder, data: PreparedData,
                       examples: list[Example]) -> LossVocabulary:
    """The tokens of the served catalog head (every title's response tokens and the end token) with any label
    token of ``examples`` outside them: a loss's softmax over these (distillation's ``vocab``, fine-tuning's
    ``loss_vocab``) covers every label."""
    tokens = {encoder.end_id}
    for title in data.catalog.titles:
        tokens.update(encoder.response_ids(title))
    titles = len(tokens)
    for example in examples:
        tokens.update(label for label in example.labels if label != IGNORE)
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    logger.info("loss vocabulary: the catalog's %d tokens%s (of %d)", titles,
                f" and {len(tokens) - titles} other label tokens" if len(tokens) > titles else "", vocab_size)
    return LossVocabulary.of(tokens, vocab_size)


def response_logits(model: PreTrainedModel, batch: Batch, vocabulary: LossVocabulary | None = None) -> torch.Tensor:
    """Logits at the response positions only, (n, V), or (n, U) over ``vocabulary``'s rows of the LM head: the
    head never runs on other positions (nor, with a vocabulary, on other tokens)."""
    hidden = model.model(**batch.model_inputs(), use_cache=False).last_hidden_state
    return head_logits(model, batch.response_states(hidden), vocabulary)


def head_logits(model: PreTrainedModel, states: torch.Tensor, vocabulary: LossVocabulary | None = None) -> torch.Tensor:
    """(n, d) final hidden states -> (n, V) logits, or (n, U) over ``vocabulary``'s rows of the LM head."""
    if vocabulary is None:
        return model.lm_head(states)
    head = model.get_output_embeddings()
    ids = vocabulary.ids.to(states.device)
    bias = head.bias.index_select(0, ids) if getattr(head, "bias", None) is not None else None
    return nn.functional.linear(states, head.weight.index_select(0, ids), bias)


def response_targets(batch: Batch, vocabulary: LossVocabulary | None = None) -> torch.Tensor:
    """(n,) the labels at the response positions, as columns of :func:`response_logits`' output."""
    return batch.targets if vocabulary is None else vocabulary.to(batch.targets.device).columns(batch.targets)


def recommendation_loss(model: PreTrainedModel, batch: Batch, vocabulary: LossVocabulary | None = None) -> torch.Tensor:
    """Mean cross-entropy of the labels at the response positions (differentiable; ``mean_ce`` is its
    no-grad average over a set of batches)."""
    return nn.functional.cross_entropy(response_logits(model, batch, vocabulary).float(), response_targets(batch, vocabulary))


@dataclass
class TeacherTargets:
    """A coarsened teacher distribution at n positions, at temperature T."""

    top_index: torch.Tensor
    """(n, k) int64 token ids"""
    top_logprob: torch.Tensor
    """(n, k) float32 log-probabilities of those tokens"""
    tail_logprob: torch.Tensor
    """(n,) float32 log of the remaining mass"""

    def to(self, device: torch.device) -> TeacherTargets:
        return TeacherTargets(self.top_index.to(device), self.top_logprob.to(device), self.tail_logprob.to(device))


def coarsen(logits: torch.Tensor, top_k: int, temperature: float = 1.0) -> TeacherTargets:
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    top_logprob, top_index = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    tail = torch.log1p(-top_logprob.exp().sum(-1).clamp(max=1 - 1e-6))
    return TeacherTargets(top_index, top_logprob, tail)


def coarse_kl(targets: TeacherTargets, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(teacher ‖ student) over the partition {top-k tokens, tail}; (n,)."""
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    q_top = logq.gather(-1, targets.top_index)
    q_tail = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-6))
    p_top, p_tail = targets.top_logprob, targets.tail_logprob
    kl = (p_top.exp() * (p_top - q_top)).sum(-1) + p_tail.exp() * (p_tail - q_tail)
    return kl


@torch.no_grad()
def teacher_targets(model: PreTrainedModel, calibration: list[Batch], top_k: int, temperature: float = 1.0) -> list[TeacherTargets]:
    model.eval()
    device = next(model.parameters()).device
    return [coarsen(response_logits(model, b.to(device)), top_k, temperature) for b in calibration]


@torch.no_grad()
def mean_kl(model: PreTrainedModel, calibration: list[Batch], targets: list[TeacherTargets]) -> float:
    """Mean KL(teacher ‖ model) over every response position of the calibration set."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch, target in zip(calibration, targets, strict=True):
        kl = coarse_kl(target, response_logits(model, batch.to(device)))
        total += float(kl.sum())
        count += kl.numel()
    return total / max(count, 1)


@torch.no_grad()
def mean_ce(model: PreTrainedModel, calibration: list[Batch], vocabulary: LossVocabulary | None = None) -> float:
    """Mean cross-entropy of the labels at the response positions (the recommendation loss), over the whole
    vocabulary or ``vocabulary``'s tokens."""
    return mean_ces(model, calibration, [vocabulary])[0]


@torch.no_grad()
def mean_ces(model: PreTrainedModel, calibration: list[Batch], vocabularies: list[LossVocabulary | None]) -> list[float]:
    """:func:`mean_ce` over each of ``vocabularies`` (None: the whole vocabulary), from one forward pass a batch."""
    model.eval()
    device = next(model.parameters()).device
    totals, count = [0.0] * len(vocabularies), 0
    for batch in calibration:
        batch = batch.to(device)
        hidden = model.model(**batch.model_inputs(), use_cache=False).last_hidden_state
        states = batch.response_states(hidden)
        for index, vocabulary in enumerate(vocabularies):
            logits = head_logits(model, states, vocabulary)
            totals[index] += float(nn.functional.cross_entropy(logits.float(), response_targets(batch, vocabulary),
                                                               reduction="sum"))
        count += int(batch.targets.numel())
    return [total / max(count, 1) for total in totals]
