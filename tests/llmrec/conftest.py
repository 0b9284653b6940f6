"""A tiny recommender per architecture and template: Llama with the d3 template, Qwen2 with the compact one."""

from __future__ import annotations

import pytest
from helpers import tiny_llama, tiny_qwen2

from llmrec.recommender import Recommender
from recdata.prompts import compact_template, d3_template


@pytest.fixture(params=["llama-d3", "qwen2-compact"])
def recommender(request, tokenizer, prepared):
    if request.param == "llama-d3":
        return Recommender(tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, d3_template())
    return Recommender(tiny_qwen2(len(tokenizer)), tokenizer, prepared.catalog, compact_template())
