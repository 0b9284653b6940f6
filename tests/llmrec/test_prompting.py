"""The prompt-length guard: a prompt over budget drops its oldest titles, the same rule everywhere."""

from __future__ import annotations

import pytest
from conftest import TITLES

from llmrec.prompting import PromptEncoder
from recdata.prompts import compact_template, d3_template


@pytest.mark.parametrize("template", [compact_template(), d3_template()])
def test_a_prompt_over_budget_keeps_the_newest_titles_that_fit(tokenizer, template):
    history = TITLES[:10]
    unguarded = PromptEncoder(tokenizer, template, max_history=50)
    budget = len(unguarded.prompt_ids(history[-3:]))  # exactly the last three titles fit
    guarded = PromptEncoder(tokenizer, template, max_history=50, max_prompt_tokens=budget)
    assert guarded.prompt_ids(history) == unguarded.prompt_ids(history[-3:])
    assert len(guarded.prompt_ids(history)) <= budget < len(unguarded.prompt_ids(history))
    one_less = PromptEncoder(tokenizer, template, max_history=50, max_prompt_tokens=budget - 1)
    assert one_less.prompt_ids(history) == unguarded.prompt_ids(history[-2:])
    assert guarded.prompt_ids(history[-2:]) == unguarded.prompt_ids(history[-2:])  # under budget: unchanged


def test_a_template_longer_than_the_budget_is_an_error(tokenizer):
    encoder = PromptEncoder(tokenizer, d3_template(), max_prompt_tokens=3)
    with pytest.raises(ValueError, match="template alone"):
        encoder.prompt_ids(TITLES[:2])
