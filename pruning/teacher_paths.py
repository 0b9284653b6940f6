"""Teacher-path distillation examples: the dense teacher's own top items as extra distillation targets.

Past PruneRec (arXiv 2507.07064, §3.5 distils on the training data's ground-truth responses only). A
recommendation is read off a constrained beam search, which scores the title prefixes of the items the model
ranks high; distillation on the training windows matches the teacher's next-token distribution only along the
ground-truth title (and at every title's first token), never along the other items' title prefixes that the
search explores. Sequence-level knowledge distillation (Kim & Rush, EMNLP 2016, §3.2) trains a student on the
teacher's own beam outputs; here each of the teacher's top-N items for a seeded sample of training prompts
becomes one example (the prompt, then that item's title and the end token) on which the usual loss runs: the
KL to the teacher's distribution at every token of the path, and the CE term on the path's tokens.

The teacher decodes with the evaluation's protocol (``num_beams`` beams, the catalog head, the prompt's own
items excluded, no assistant: the paths are the language model's own), so the paths are the lists a served
student is asked to reproduce.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llmrec.prompting import PromptEncoder
from llmrec.recommender import Recommender
from pruning import reuse
from pruning.evaluate import sample_users
from pruning.examples import Example, sample_example
from recdata.prep import PreparedData
from recdata.prompts import PromptTemplate

logger = logging.getLogger(__name__)


@dataclass
class TeacherPaths:
    """The path examples and where they came from."""

    examples: list[Example]
    """``items`` examples per prompt, the teacher's best first, prompt by prompt."""
    pairs: np.ndarray
    """(prompts, 2) the (user, position) training samples whose prompts were decoded."""
    items: list[list[int]]
    """Per prompt, the catalog indices of the teacher's top items, best first."""


def sample_prompts(data: PreparedData, prompts: int, seed: int) -> np.ndarray:
    """A seeded, sorted sample of ``prompts`` training (user, position) pairs (all of them when fewer)."""
    if prompts < 1:
        raise ValueError(f"teacher paths need at least one prompt, got {prompts}")
    # seed + 2: not the calibration's (seed) nor the distillation windows' (seed + 1) draw
    return sample_users(data.splits["train"], prompts, seed + 2)


@torch.no_grad()
def teacher_paths(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: PreparedData,
                  template: PromptTemplate, encoder: PromptEncoder, prompts: int, items: int, seed: int,
                  num_beams: int = 20, batch_size: int = 16, saved: Path | None = None) -> TeacherPaths:
    """The teacher's top ``items`` items for ``prompts`` seeded training prompts, as distillation examples.

    ``saved``: a JSON file of the chosen items, read instead of decoding when it was written for the same
    teacher weights, data and settings, else written after decoding (a resumed compression run decodes nothing)."""
    if not 1 <= items <= num_beams:
        raise ValueError(f"teacher paths per prompt must be between 1 and the beams ({num_beams}), got {items}")
    pairs = sample_prompts(data, prompts, seed)
    histories = [data.history(int(user), int(position)).tolist() for user, position in pairs]
    key = _key(teacher, data, prompts, items, seed, num_beams) if saved is not None else ""
    chosen = _load(saved, key)
    if chosen is None:
        chosen = _decode(teacher, tokenizer, data, template, encoder, histories, items, num_beams, batch_size)
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({"key": key, "items": chosen}))
    titles = data.catalog.titles
    examples = [sample_example(encoder, [titles[i] for i in history], titles[item])
                for history, ranked in zip(histories, chosen, strict=True) for item in ranked]
    return TeacherPaths(examples, pairs, chosen)


def _decode(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: PreparedData, template: PromptTemplate,
            encoder: PromptEncoder, histories: list[list[int]], items: int, num_beams: int,
            batch_size: int) -> list[list[int]]:
    recommender = Recommender(teacher, tokenizer, data.catalog, template, encoder.max_history,
                              max_prompt_tokens=encoder.max_prompt_tokens)
    was_training = teacher.training
    teacher.eval()
    logger.info("teacher paths: decoding %d training prompts with the teacher (%d beams, its top %d items each)",
                len(histories), num_beams, items)
    try:
        lists = recommender.recommend(histories, k=items, num_beams=num_beams, exclude=histories,
                                      batch_size=batch_size, progress=True, head="catalog", assist=False)
    finally:
        teacher.train(was_training)
    return [[item for item, _ in ranked] for ranked in lists]


def _key(teacher: PreTrainedModel, data: PreparedData, prompts: int, items: int, seed: int, num_beams: int) -> str:
    into = hashlib.blake2b(digest_size=16)
    reuse.digest_model(teacher, into)
    into.update(f"{data.fingerprint}:{prompts}:{items}:{seed}:{num_beams}".encode())
    return into.hexdigest()


def _load(saved: Path | None, key: str) -> list[list[int]] | None:
    if saved is None or not saved.is_file():
        return None
    stored = json.loads(saved.read_text())
    if stored.get("key") != key:
        return None
    logger.info("teacher paths: the teacher's items read from %s", saved)
    return [[int(item) for item in ranked] for ranked in stored["items"]]
