"""Token ids of prompts and responses for a :class:`recdata.prompts.PromptTemplate`.

Each piece of a template is tokenised on its own, without special tokens, and the ids are concatenated
(pieces are cached, so encoding a history costs dictionary look-ups). This makes the ids a function of
the titles alone, identical at training, calibration, evaluation and serving, and makes the compact
template exactly packable (see ``PromptTemplate.packable``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from recdata.prompts import PromptTemplate


class PromptEncoder:
    """Turns title lists into prompt ids and titles into response ids (response + end token)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, max_history: int = 10,
                 max_prompt_tokens: int | None = None, item_tokens: Mapping[str, int] | None = None) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-sequence token; set tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.template = template
        self.max_history = max_history
        self.max_prompt_tokens = max_prompt_tokens
        """The prompt-length guard: a prompt longer than this drops its oldest titles until it fits (the same
        rule in training, evaluation and serving, recorded in the artifact). None: no guard."""
        self.item_tokens = dict(item_tokens) if item_tokens else {}
        """Title -> the id of its collaborative item token (:mod:`llmrec.item_tokens`), placed after the title in
        a history; a title without one gets its title alone."""
        self.end_id: int = int(tokenizer.eos_token_id)
        self._piece = lru_cache(maxsize=None)(self._encode_piece)

    def _encode_piece(self, text: str) -> tuple[int, ...]:
        if not text:
            return ()
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def item_ids(self, title: str) -> list[int]:
        """Ids of one history item (with the end token when the template puts one there, then the item's token
        when the model has item tokens)."""
        ids = list(self._piece(self.template.item_text(title)))
        if self.template.history_item_ends_with_eos:
            ids.append(self.end_id)
        if title in self.item_tokens:
            ids.append(self.item_tokens[title])
        return ids

    def item_token(self, title: str) -> list[int]:
        """The item token of a title as a list ([] when it has none)."""
        return [self.item_tokens[title]] if title in self.item_tokens else []

    def prompt_ids(self, history: Sequence[str]) -> list[int]:
        """Ids of the prompt for the last ``max_history`` titles (oldest first), without the oldest ones that
        would take it past ``max_prompt_tokens``."""
        history = list(history)[-self.max_history :] if self.max_history > 0 else []
        prefix, suffix = self._piece(self.template.prefix), self._piece(self.template.suffix)
        separator = self._piece(self.template.separator)
        items = [self.item_ids(title) for title in history]
        if self.max_prompt_tokens is not None:
            length = len(prefix) + len(suffix) + sum(map(len, items)) + len(separator) * max(len(items) - 1, 0)
            while items and length > self.max_prompt_tokens:
                length -= len(items.pop(0)) + (len(separator) if items else 0)
            if length > self.max_prompt_tokens:
                raise ValueError(f"the template alone takes {length} tokens, more than max_prompt_tokens "
                                 f"({self.max_prompt_tokens})")
        ids = list(prefix)
        for i, item in enumerate(items):
            if i:
                ids.extend(separator)
            ids.extend(item)
        ids.extend(suffix)
        return ids

    def title_ids(self, title: str) -> list[int]:
        """Ids of the response text for a title, without the end token."""
        return list(self._piece(self.template.response_text(title)))

    def response_ids(self, title: str) -> list[int]:
        """Ids the model must generate for a title: the response text and the end token."""
        return [*self.title_ids(title), self.end_id]
