"""Vocabulary pruning: cut the embedding, the LM head and the tokenizer to the recommender's closed text.

Beyond the PruneRec paper (arXiv 2507.07064), which keeps the full 49k-token head: after the width and depth
stages the embedding and LM head are most of a pruned model's parameters and of its per-token cost. A
recommender only ever reads and writes a closed text, the prompt template plus the catalog titles, so the
tokens that tokenising all of it needs are enough.

Which tokens: every token the (piecewise) tokenisation of the template and of each title produces, every
*intermediate* symbol that byte-pair encoding creates on the way to one of them (a BPE tokenizer cannot
produce ``abc`` by the merge ``ab + c`` unless ``ab`` is in its vocabulary), and every special / added token.
The merges kept are those whose two parts and result are all kept, in their original order. Applying the
kept merges to a word of the closed text then makes exactly the original merges: at every step the original
algorithm applies the lowest-ranked applicable merge, which is kept, and every kept applicable merge was
applicable originally, so the choice is the same. The closed text therefore tokenises to the same tokens,
with ids remapped; the stage checks that on every piece anyway and refuses to write an artifact otherwise.

The model keeps the embedding rows (and untied LM-head rows) of the kept tokens, in original id order, so
the logits of kept tokens are exactly the unpruned model's. The artifact loads with stock
``AutoModelForCausalLM`` / ``AutoTokenizer``; its manifest records the original vocabulary size and the kept
original ids (new id i is original id ``kept_ids[i]``), and the original tokenizer is kept beside it
(``vocab/original-tokenizer``) so that text outside the closed text can be diagnosed exactly: a new catalog
title that needs pruned tokens is reported with the tokens, and the way out is to re-run the stage from the
unpruned parent.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmrec.prompting import PromptEncoder
from llmrec.vocabulary import ORIGINAL_TOKENIZER, coverage_problems
from pruning.surgery import _state, rebuild
from recdata.catalog import Catalog
from recdata.prompts import PromptTemplate

logger = logging.getLogger(__name__)

@dataclass
class VocabPlan:
    kept_ids: list[int]
    """Original ids of the kept tokens, ascending; new id i = kept_ids[i]."""
    original_size: int
    closed_tokens: int
    """Tokens the closed text itself uses (the rest are BPE intermediates and special tokens)."""

    @property
    def new_id(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept_ids)}


def closed_pieces(template: PromptTemplate, titles: Iterable[str]) -> list[str]:
    """Every text piece a recommender tokenises: template pieces, each title as history item and response."""
    pieces = [template.prefix, template.separator, template.suffix]
    for title in titles:
        pieces += [template.item_text(title), template.response_text(title)]
    return [p for p in dict.fromkeys(pieces) if p]


def _tokenizer_json(tokenizer: PreTrainedTokenizerBase) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("vocabulary pruning needs a fast (tokenizers-backed) tokenizer")
    payload = json.loads(backend.to_str())
    if payload["model"]["type"] != "BPE":
        raise ValueError(f"vocabulary pruning supports BPE tokenizers, not {payload['model']['type']}")
    return payload


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    """Merges as pairs, from either serialisation (``"a b"`` strings or ``[a, b]`` lists)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]  # type: ignore[misc]


def bpe_symbols(token: str, ranks: dict[tuple[str, str], int]) -> set[str]:
    """Every symbol BPE creates while building ``token`` from its characters (the characters included)."""
    symbols = list(token)
    created = set(symbols)
    while len(symbols) > 1:
        candidates = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(itertools.pairwise(symbols))]
        applicable = [(rank, i) for rank, i in candidates if rank is not None]
        if not applicable:
            break
        rank = min(applicable)[0]
        merged: list[str] = []
        i = 0
        while i < len(symbols):  # apply that merge at every position, left to right
            if i + 1 < len(symbols) and ranks.get((symbols[i], symbols[i + 1])) == rank:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
        created.update(symbols)
    return created


def plan_vocabulary(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, titles: Sequence[str]) -> VocabPlan:
    """The kept token ids for a template and catalog (see the module docstring)."""
    payload = _tokenizer_json(tokenizer)
    vocab: dict[str, int] = payload["model"]["vocab"]
    ranks = {pair: rank for rank, pair in enumerate(_merge_pairs(payload["model"]["merges"]))}
    used: set[int] = set()
    for piece in closed_pieces(template, titles):
        used.update(tokenizer(piece, add_special_tokens=False)["input_ids"])
    special = {int(t["id"]) for t in payload.get("added_tokens", [])} | {int(i) for i in tokenizer.all_special_ids}
    id_to_token = {i: t for t, i in vocab.items()}
    kept = set(used) | special
    for token_id in used:
        token = id_to_token.get(token_id)
        if token is None:  # an added token: no merges behind it
            continue
        for symbol in bpe_symbols(token, ranks):
            if symbol in vocab:
                kept.add(vocab[symbol])
    size = max([*vocab.values(), *special]) + 1
    return VocabPlan(sorted(kept), size, len(used))


def cut_tokenizer(tokenizer: PreTrainedTokenizerBase, plan: VocabPlan) -> PreTrainedTokenizerBase:
    """A tokenizer with the kept vocabulary (ids renumbered) and merges; loads with ``AutoTokenizer``."""
    payload = _tokenizer_json(tokenizer)
    new_id = plan.new_id
    vocab = payload["model"]["vocab"]
    kept_tokens = {t: new_id[i] for t, i in vocab.items() if i in new_id}
    payload["model"]["vocab"] = kept_tokens
    merges = payload["model"]["merges"]
    kept_merges = [m for m, (a, b) in zip(merges, _merge_pairs(merges), strict=True)
                   if a in kept_tokens and b in kept_tokens and a + b in kept_tokens]
    payload["model"]["merges"] = kept_merges
    added = []
    for entry in payload.get("added_tokens", []):
        if int(entry["id"]) in new_id:
            added.append({**entry, "id": new_id[int(entry["id"])]})
    payload["added_tokens"] = added
    _remap_post_processor(payload.get("post_processor"), new_id)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(payload, ensure_ascii=False))
        config_file = Path(tmp) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        decoder = config.get("added_tokens_decoder", {})
        config["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in decoder.items() if int(k) in new_id}
        config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2))
        for extra in ("vocab.json", "merges.txt"):  # slow-tokenizer files would describe the old vocabulary
            (Path(tmp) / extra).unlink(missing_ok=True)
        return AutoTokenizer.from_pretrained(tmp)


def _remap_post_processor(processor: dict | None, new_id: dict[int, int]) -> None:
    if not processor:
        return
    for child in processor.get("processors", []):
        _remap_post_processor(child, new_id)
    special = processor.get("special_tokens")
    if isinstance(special, dict):
        for entry in special.values():
            entry["ids"] = [new_id[int(i)] for i in entry.get("ids", []) if int(i) in new_id]
    for key in ("sep", "cls"):
        value = processor.get(key)
        if isinstance(value, list) and len(value) == 2 and int(value[1]) in new_id:
            processor[key] = [value[0], new_id[int(value[1])]]


def cut_model(model: PreTrainedModel, plan: VocabPlan) -> PreTrainedModel:
    """The embedding and LM-head rows of the kept tokens; special-token ids in the configs remapped."""
    index = torch.as_tensor(plan.kept_ids, dtype=torch.long)
    state = _state(model)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            state[name] = state[name][index.to(state[name].device)]
    if "lm_head.bias" in state:
        state["lm_head.bias"] = state["lm_head.bias"][index.to(state["lm_head.bias"].device)]
    config = copy.deepcopy(model.config)
    config.vocab_size = len(plan.kept_ids)
    new_id = plan.new_id
    _remap_ids(config, new_id)
    fresh = rebuild(model, config, state)
    _remap_ids(fresh.generation_config, new_id)
    return fresh


def _remap_ids(holder: object, new_id: dict[int, int]) -> None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(holder, key, None)
        if value is None:
            continue
        if isinstance(value, list):
            setattr(holder, key, [new_id[int(v)] for v in value if int(v) in new_id] or None)
        else:
            setattr(holder, key, new_id.get(int(value)))


def prune_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, catalog: Catalog,
    max_history: int,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """The vocab stage: plan, cut the tokenizer and model, verify the closed text; returns a record."""
    plan = plan_vocabulary(tokenizer, template, catalog.titles)
    pruned_tokenizer = cut_tokenizer(tokenizer, plan)
    problems = coverage_problems(tokenizer, pruned_tokenizer, plan.kept_ids, template, catalog.titles)
    if problems:  # a bug, not a user error: the construction guarantees identical tokenisation
        raise RuntimeError(f"vocabulary pruning changed the tokenisation of {len(problems)} pieces: {problems[:3]}")
    original_encoder, pruned_encoder = PromptEncoder(tokenizer, template, max_history), PromptEncoder(pruned_tokenizer, template, max_history)
    if pruned_encoder.end_id != plan.new_id[original_encoder.end_id]:
        raise RuntimeError("the end-of-title token was not remapped")
    smaller = cut_model(model, plan)
    record = {
        "original_vocab_size": plan.original_size,
        "vocab_size": len(plan.kept_ids),
        "closed_text_tokens": plan.closed_tokens,
        "kept_ids": plan.kept_ids,
        "kept_merges": len(json.loads(pruned_tokenizer.backend_tokenizer.to_str())["model"]["merges"]),
        "original_tokenizer": ORIGINAL_TOKENIZER,
    }
    logger.info("vocabulary: %d -> %d tokens (%d used by the closed text)", plan.original_size, len(plan.kept_ids), plan.closed_tokens)
    return smaller, pruned_tokenizer, record
