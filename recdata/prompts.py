"""Prompt templates: the text around a user's history and the response that names the next item.

Two templates (DESIGN.md §3):

- ``d3``: the BIGRec / D3 instruction template (Bao et al. 2023, arXiv 2308.08434; Bao et al. 2024,
  arXiv 2406.14900): instruction, ``The user has watched the following movies before: "t1", "t2"``,
  and the response ``"title"`` followed by the end-of-sequence token.
- ``compact``: a short prefix and every title followed by the end-of-sequence token, in the history as in
  the response. It is *packable*: the prompt for the (j+1)-th item of a sequence is a prefix of the
  text that names the first j+1 items, so one forward pass trains every position of a user's sequence
  (many more targets per token, which is what a CPU budget needs).

A template is pure text; :mod:`llmrec.prompting` tokenises it. Every piece (prefix, each history item,
separator, suffix, response) is tokenised on its own and the ids concatenated, so that training,
calibration, evaluation and serving see identical ids. The template is saved in every artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

TITLE = "{title}"


@dataclass(frozen=True)
class PromptTemplate:
    """The pieces of a prompt; ``{title}`` in ``history_item`` and ``response`` is replaced by a title."""

    name: str
    prefix: str
    """Text before the first history item (instruction, input header)."""
    history_item: str
    """One history item, e.g. '"{title}"'."""
    separator: str
    """Text between two history items."""
    history_item_ends_with_eos: bool
    """Whether each history item is followed by the end-of-sequence token (the compact template)."""
    suffix: str
    """Text after the history and before the response."""
    response: str
    """The response naming the target item; the end-of-sequence token always follows it."""

    def __post_init__(self) -> None:
        for name in ("history_item", "response"):
            if TITLE not in getattr(self, name):
                raise ValueError(f"template {self.name!r}: {name} must contain {TITLE}")

    @property
    def packable(self) -> bool:
        """True when prompt(history + [t]) == prompt(history) + response(t) piece by piece."""
        return (
            self.separator == ""
            and self.suffix == ""
            and self.history_item == self.response
            and self.history_item_ends_with_eos
        )

    def item_text(self, title: str) -> str:
        return self.history_item.replace(TITLE, title)

    def response_text(self, title: str) -> str:
        return self.response.replace(TITLE, title)

    def render(self, history: list[str], target: str | None = None) -> str:
        """Human-readable text of a prompt (with ``<eos>`` where the token goes); for logs and docs."""
        parts = [self.prefix]
        for i, title in enumerate(history):
            if i:
                parts.append(self.separator)
            parts.append(self.item_text(title))
            if self.history_item_ends_with_eos:
                parts.append("<eos>")
        parts.append(self.suffix)
        if target is not None:
            parts.append(self.response_text(target) + "<eos>")
        return "".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptTemplate:
        return cls(**data)


def d3_template(item: str = "movie", items: str | None = None, verb: str = "watched") -> PromptTemplate:
    """The BIGRec/D3 instruction template for a domain (e.g. item='movie', verb='watched')."""
    items = items or f"{item}s"
    prefix = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n"
        f"Given a list of {items} the user has {verb} before, please recommend a new {item} "
        "that the user likes to the user.\n\n"
        "### Input:\n"
        f"The user has {verb} the following {items} before: "
    )
    return PromptTemplate(
        name="d3",
        prefix=prefix,
        history_item='"{title}"',
        separator=", ",
        history_item_ends_with_eos=False,
        suffix="\n\n### Response:\n",
        response='"{title}"',
    )


def compact_template(items: str = "movies", verb: str = "watched") -> PromptTemplate:
    """A short, packable template: 'Movies watched, in order:' then ' title<eos>' per item."""
    return PromptTemplate(
        name="compact",
        prefix=f"{items.capitalize()} {verb}, in order:",
        history_item=" {title}",
        separator="",
        history_item_ends_with_eos=True,
        suffix="",
        response=" {title}",
    )


TEMPLATES: dict[str, Callable[[], PromptTemplate]] = {"d3": d3_template, "compact": compact_template}


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]()
