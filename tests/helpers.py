"""Tiny random models and a tiny tokenizer for fast, offline tests."""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from recdata.prompts import compact_template, d3_template

if TYPE_CHECKING:
    from llmrec.recommender import Recommender


def make_tokenizer(texts: Iterable[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the given texts, with <eos> and <pad>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def template_texts() -> list[str]:
    return [t.prefix + t.suffix + t.separator for t in (d3_template(), compact_template())]


def tiny_llama(vocab_size: int, seed: int = 0, tie: bool = True, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(vocab_size: int, seed: int = 0, tie: bool = False, layers: int = 2,
               sliding_window: int | None = None) -> Qwen2ForCausalLM:
    """``sliding_window``: the layers after the first attend over that many positions only (a mix of masks)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
        initializer_range=0.2,
        use_sliding_window=sliding_window is not None,
        sliding_window=sliding_window,
        max_window_layers=1,
    )
    return Qwen2ForCausalLM(config).eval()


def save_model_dir(path, model, tokenizer):
    """A local HF directory (what `--model PATH` points at)."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# Requests the service must answer with a 4xx naming the problem (max_k 10, max_history 20 in the API tests).
JSON = {"content-type": "application/json"}
"""Bodies are sent as ``content=json.dumps(payload)`` (ASCII escapes), as clients may send lone surrogates."""

BAD_INPUTS = [
    ({"user_id": "u", "history": ["nope", "i1", 424242], "k": 3}, 422, "nope"),
    ({"user_id": "u", "history": [], "k": 3}, 422, "body.history: List should have at least 1 item"),
    ({"user_id": "u", "history": ["i1"] * 21, "k": 3}, 422, "at most 20 items"),
    ({"user_id": "u", "history": ["i1"], "k": 0}, 422, "body.k: Input should be greater than or equal to 1"),
    ({"user_id": "u", "history": ["i1"], "k": 11}, 422, "body.k: Input should be less than or equal to 10"),
    ({"user_id": "", "history": ["i1"], "k": 3}, 422, "user_id"),
    ({"history": ["i1"]}, 422, "user_id"),
    ({"user_id": "u", "history": "i1", "k": 3}, 422, "history"),
    # strict: no coercion of booleans or strings to numbers or ids, no unknown fields
    ({"user_id": "u", "history": [True], "k": 3}, 422, "body.history.0"),
    ({"user_id": "u", "history": ["i1"], "k": "5"}, 422, "body.k"),
    ({"user_id": "u", "history": ["i1"], "k": True}, 422, "body.k"),
    ({"user_id": "u", "history": ["i1"], "k": 3, "exclude_history": "yes"}, 422, "exclude_history"),
    ({"user_id": "u", "history": ["i1"], "k": 3, "colour": "red"}, 422, "colour"),
    ({"user_id": 7, "history": ["i1"], "k": 3}, 422, "user_id"),
    ({"user_id": "u", "history": [-1], "k": 3}, 422, "body.history.0"),
    ({"user_id": "u", "history": ["i1"], "k": 3, "deadline_ms": 0}, 422, "deadline_ms"),
    # a lone UTF-16 surrogate once made the 422 message unencodable: 500 and a dropped connection
    ({"user_id": "u", "history": ["\ud800"], "k": 3}, 422, "surrogate"),
    ({"user_id": "\udfff", "history": ["i1"], "k": 3}, 422, "body.user_id"),
]


@contextmanager
def serving(app, timeout: float = 120.0):
    """A TestClient of the app once every arm is loaded (the arms load in the background after start-up)."""
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        deadline = time.time() + timeout
        while client.get("/readyz").status_code != 200:
            state = client.app.state.prunerec
            if state.load_error:
                raise RuntimeError(state.load_error)
            if time.time() > deadline:
                raise TimeoutError("the app did not become ready")
            time.sleep(0.02)
        yield client


def teacher_forced_score(rec: Recommender, history: list[int], item: int) -> float:
    prompt = rec.prompt_ids(history)
    response = rec.encoder.response_ids(rec.catalog.titles[item])
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = torch.log_softmax(rec.model(ids).logits[0].float(), -1)
    return sum(float(logprobs[len(prompt) - 1 + j, tok]) for j, tok in enumerate(response))


def teacher_forced_trie_score(rec: Recommender, history: list[int], item: int) -> float:
    """log P(item) under the 'trie' head, by hand: each response token's logit against the logits of the tokens
    that continue its title prefix in the catalog (the trie node's children)."""
    prompt = rec.prompt_ids(history)
    response = rec.encoder.response_ids(rec.catalog.titles[item])
    with torch.no_grad():
        logits = rec.model(torch.tensor([prompt + response])).logits[0].float()
    trie, node, score = rec.trie, 0, 0.0
    for j, token in enumerate(response):
        start, end = int(trie.child_offsets[node]), int(trie.child_offsets[node + 1])
        siblings = trie.child_tokens[start:end]
        row = logits[len(prompt) - 1 + j]
        score += float(row[token] - torch.logsumexp(row[siblings], 0))
        node = int(trie.child_nodes[start + int((siblings == token).nonzero())])
    return score


def histories(prepared, n=6):
    return [prepared.history(int(u), int(p)).tolist() for u, p in prepared.splits["test"][:n]]


TINY_PRUNE = {"calibration.samples": 8, "calibration.batch_size": 8, "distill.examples": 16, "distill.max_steps": 2,
              "distill.eval_every": 2, "distill.valid_examples": 8, "distill.batch_size": 8}
"""PruneConfig overrides (dotted paths) over a profile: seconds per pruning run of a tiny model."""
