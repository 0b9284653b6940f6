"""Serving a vocabulary-pruned artifact safely: is a catalog inside the artifact's closed text?

The vocab stage (:mod:`pruning.vocab`) cuts the tokenizer and the model to the tokens that the template and
the catalog titles need. Text outside that closed text cannot be tokenised as the model was trained to
read it, so a catalog with new titles is checked against the unpruned tokenizer kept in the artifact: every
title must tokenise, with the pruned tokenizer, to the unpruned tokenizer's tokens remapped. A title that
does not is reported with the tokens that were pruned, never mis-tokenised silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmrec.artifact import read_manifest
from recdata.prompts import PromptTemplate

ORIGINAL_TOKENIZER = "vocab/original-tokenizer"
"""Where, inside an artifact, the unpruned tokenizer is kept (for diagnosing new catalog titles)."""


class VocabularyCoverageError(ValueError):
    """Text that the pruned vocabulary cannot tokenise as the unpruned one did."""

    def __init__(self, problems: list[dict]):
        self.problems = problems
        shown = "; ".join(
            f"{p['title']!r} needs pruned tokens {p['missing_tokens']}" if p["missing_tokens"]
            else f"{p['title']!r} tokenises differently ({p['expected']} vs {p['got']})"
            for p in problems[:5]
        )
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(
            f"{len(problems)} catalog titles are outside this artifact's pruned vocabulary: {shown}{more}. "
            "Re-run the vocab stage from the unpruned parent with the new catalog "
            "(`prunerec prune <teacher> -o <run> --stages ...,vocab --data <new data>`)."
        )


def coverage_problems(
    original: PreTrainedTokenizerBase, pruned: PreTrainedTokenizerBase, kept_ids: Sequence[int],
    template: PromptTemplate, titles: Sequence[str],
) -> list[dict]:
    """Titles (and template pieces) the pruned tokenizer does not tokenise as the original did, remapped.

    Each problem names the text, the original tokens that were pruned (``missing_tokens``; empty when every
    token is kept but a BPE intermediate is not), and both id lists.
    """
    new_id = {old: new for new, old in enumerate(kept_ids)}
    problems = []
    by_piece: dict[str, str] = {}
    for title in titles:
        by_piece.setdefault(template.item_text(title), title)
        by_piece.setdefault(template.response_text(title), title)
    for piece in (template.prefix, template.separator, template.suffix):
        by_piece.setdefault(piece, f"<template piece {piece!r}>")
    reported: set[str] = set()
    for piece, title in by_piece.items():
        if not piece or title in reported:
            continue
        ids = original(piece, add_special_tokens=False)["input_ids"]
        expected = [new_id.get(i) for i in ids]
        got = pruned(piece, add_special_tokens=False)["input_ids"]
        if expected != got:
            missing = [original.convert_ids_to_tokens(i) for i in ids if i not in new_id]
            problems.append({"title": title, "missing_tokens": missing, "expected": expected, "got": got})
            reported.add(title)
    return problems


def check_artifact_catalog(directory: str | Path, titles: Sequence[str]) -> list[dict]:
    """For a vocabulary-pruned artifact, the titles it cannot serve (see :func:`coverage_problems`); [] for
    an artifact whose vocabulary was not pruned."""
    manifest = read_manifest(directory)
    vocab = manifest.get("vocab")
    if not vocab:
        return []
    original = AutoTokenizer.from_pretrained(Path(directory) / vocab["original_tokenizer"])
    pruned = AutoTokenizer.from_pretrained(directory)
    return coverage_problems(original, pruned, vocab["kept_ids"], PromptTemplate.from_dict(manifest["template"]), titles)
