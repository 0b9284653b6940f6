"""Token ids of prompts and responses for a :class:`recdata.prompts.PromptTemplate`.

Each piece of a template is tokenised on its own, without special tokens, and the ids are concatenated
(pieces are cached, so encoding a history costs dictionary look-ups). This makes the ids a function of
the titles alone, identical at training, calibration, evaluation and serving, and makes the compact
template exactly packable (see ``PromptTemplate.packable``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from recdata.prompts import PromptTemplate


class PromptEncoder:
    """Turns title lists into prompt ids and titles into response ids (response + end token)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, max_history: int = 10) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-sequence token; set tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.template = template
        self.max_history = max_history
        self.end_id: int = int(tokenizer.eos_token_id)
        self._piece = lru_cache(maxsize=None)(self._encode_piece)

    def _encode_piece(self, text: str) -> tuple[int, ...]:
        if not text:
            return ()
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def item_ids(self, title: str) -> list[int]:
        """Ids of one history item (with the end token when the template puts one there)."""
        ids = list(self._piece(self.template.item_text(title)))
        if self.template.history_item_ends_with_eos:
            ids.append(self.end_id)
        return ids

    def prompt_ids(self, history: Sequence[str]) -> list[int]:
        """Ids of the prompt for the last ``max_history`` titles (oldest first)."""
        history = list(history)[-self.max_history :] if self.max_history > 0 else []
        ids = list(self._piece(self.template.prefix))
        separator = self._piece(self.template.separator)
        for i, title in enumerate(history):
            if i:
                ids.extend(separator)
            ids.extend(self.item_ids(title))
        ids.extend(self._piece(self.template.suffix))
        return ids

    def title_ids(self, title: str) -> list[int]:
        """Ids of the response text for a title, without the end token."""
        return list(self._piece(self.template.response_text(title)))

    def response_ids(self, title: str) -> list[int]:
        """Ids the model must generate for a title: the response text and the end token."""
        return [*self.title_ids(title), self.end_id]
