"""Tiny random models and a tiny tokenizer for fast, offline tests."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from recdata.prompts import compact_template, d3_template


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


def tiny_qwen2(vocab_size: int, seed: int = 0, tie: bool = False, layers: int = 2) -> Qwen2ForCausalLM:
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
        use_sliding_window=False,
    )
    return Qwen2ForCausalLM(config).eval()


def save_model_dir(path, model, tokenizer):
    """A local HF directory (what `--model PATH` points at)."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# Requests the service must answer with a 4xx naming the problem (max_k 10, max_history 20 in the API tests).
BAD_INPUTS = [
    ({"user_id": "u", "history": ["nope", "i1", 424242], "k": 3}, 422, "nope"),
    ({"user_id": "u", "history": [], "k": 3}, 422, "history is empty"),
    ({"user_id": "u", "history": ["i1"] * 21, "k": 3}, 422, "at most 20"),
    ({"user_id": "u", "history": ["i1"], "k": 0}, 422, "k must be between 1 and 10"),
    ({"user_id": "u", "history": ["i1"], "k": 11}, 422, "k must be between 1 and 10"),
    ({"user_id": "", "history": ["i1"], "k": 3}, 422, "user_id"),
    ({"history": ["i1"]}, 422, "user_id"),
    ({"user_id": "u", "history": "i1", "k": 3}, 422, "history"),
]
