"""Packed rows: every example sees exactly its own tokens (the logits equal those of the example alone), the
loss of a packed batch is the loss of the same examples unpacked, packing never splits or loses an example,
and fine-tuning and distillation train on packed rows of the D3 template."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import save_model_dir, tiny_llama, tiny_qwen2

from llmrec.artifact import read_manifest
from llmrec.prompting import PromptEncoder
from pruning import distill
from pruning.calibration import batches, collate_batch, mean_ce, response_logits, validation_batches
from pruning.examples import IGNORE, Example, collate, model_inputs, split_examples
from pruning.packing import pack
from pruning.train import TrainConfig, run
from recdata.prompts import d3_template


@pytest.fixture
def d3_examples(tokenizer, prepared) -> list[Example]:
    encoder = PromptEncoder(tokenizer, d3_template(), 10)
    return split_examples(prepared, encoder, "train", limit=24, seed=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_example_has_the_logits_it_has_alone(tokenizer, d3_examples, kind, attention):
    model = (tiny_llama if kind == "llama" else tiny_qwen2)(len(tokenizer)).eval()
    model.config._attn_implementation = attention
    rows = pack(d3_examples, max_tokens=3 * max(len(e.input_ids) for e in d3_examples), seed=1)
    assert len(rows) < len(d3_examples)  # several examples per row
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits  # (rows, T, V)
        alone = {tuple(e.input_ids): model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in d3_examples}
    for row, example in enumerate(rows):
        assert example.position_ids is not None
        starts = [i for i, p in enumerate(example.position_ids) if p == 0] + [len(example.input_ids)]
        for start, end in itertools.pairwise(starts):
            expected = alone[tuple(example.input_ids[start:end])]
            torch.testing.assert_close(packed[row, start:end], expected, rtol=1e-4, atol=1e-5)


def test_the_loss_of_a_packed_batch_is_the_loss_of_the_same_examples(tokenizer, d3_examples):
    model = tiny_llama(len(tokenizer)).eval()
    rows = pack(d3_examples, max_tokens=512, seed=0)
    with torch.no_grad():
        packed = model(**model_inputs(collate(rows, 0))).loss
        unpacked = model(**collate(d3_examples, 0)).loss
        # the response-position path (distillation, calibration) agrees too
        flat = response_logits(model, collate_batch(rows, 0))
    torch.testing.assert_close(packed, unpacked, rtol=1e-4, atol=1e-5)
    assert flat.shape[0] == sum(e.targets for e in d3_examples)


def test_a_packed_loop_validates_on_batches_of_its_token_budget(tokenizer, d3_examples):
    """Validation prompts are never packed; a loop of 2 packed rows validates them to the rows' token budget
    (not 2 prompts a pass), every prompt once and in order, with the same loss."""
    lengths = [len(e.input_ids) for e in d3_examples]
    by_count = validation_batches(d3_examples, 0, 2, None)
    budget = 2 * 3 * max(lengths)
    by_tokens = validation_batches(d3_examples, 0, 2, 3 * max(lengths))
    assert [b.input_ids.shape[0] for b in by_count] == [2] * (len(d3_examples) // 2) + [1] * (len(d3_examples) % 2)
    assert len(by_tokens) < len(by_count) / 2
    assert sum(b.input_ids.shape[0] for b in by_tokens) == len(d3_examples)
    assert all(b.input_ids.numel() <= budget for b in by_tokens)
    ids = [row[row != 0].tolist() for b in by_tokens for row in b.input_ids]
    assert ids == [[t for t in e.input_ids if t != 0] for e in d3_examples]  # in order, each once
    # at least batch_size a pass even when two do not fit the budget; a budget of one prompt each otherwise
    assert [b.input_ids.shape[0] for b in batches(d3_examples[:5], 0, 2, max_tokens=1)] == [2, 2, 1]
    model = tiny_llama(len(tokenizer))
    assert mean_ce(model, by_tokens) == pytest.approx(mean_ce(model, by_count), rel=1e-5)


def test_packing_keeps_every_example_whole_and_refuses_a_leading_label(d3_examples):
    longest = max(len(e.input_ids) for e in d3_examples)
    rows = pack(d3_examples, max_tokens=longest + 10, seed=3)
    assert all(len(r.input_ids) <= longest + 10 for r in rows)
    pieces = []
    for row in rows:
        assert row.position_ids is not None and len(row.position_ids) == len(row.input_ids) == len(row.labels)
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        pieces += [tuple(row.input_ids[a:b]) for a, b in itertools.pairwise(starts)]
    assert sorted(pieces) == sorted(tuple(e.input_ids) for e in d3_examples)
    small = pack(d3_examples[:3], max_tokens=4)  # every example longer than a row: one row each, whole
    assert sorted(r.input_ids for r in small) == sorted(e.input_ids for e in d3_examples[:3])
    with pytest.raises(ValueError, match="cross a boundary"):
        pack([Example([1, 2], [1, 2])], max_tokens=8)
    with pytest.raises(ValueError, match="packed already"):
        pack(rows, max_tokens=8)
    assert all(e.labels[0] == IGNORE for e in d3_examples)


def test_fine_tuning_and_distillation_train_on_packed_d3_rows(tmp_path, tokenizer, prepared, d3_examples):
    base = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    out = run(TrainConfig(output=str(tmp_path / "out"), model=str(base), template="d3", pack_tokens=400, batch_size=2,
                          lr=3e-3, max_steps=10, eval_every=5, valid_examples=16, warmup_steps=0, patience=0, epochs=20.0),
              prepared)
    training = read_manifest(out)["training"]
    assert training["rows"] < training["examples"]
    assert training["best_valid_loss"] < training["valid_history"][0]["valid_loss"]

    teacher = tiny_llama(len(tokenizer), seed=1)
    student = tiny_llama(len(tokenizer), seed=2)
    rows = pack(d3_examples, max_tokens=3 * max(len(e.input_ids) for e in d3_examples))
    assert len(rows) <= 12  # 6 steps of 2 rows see every row
    cache = distill.TeacherCache(teacher, rows, 0, top_k=16, temperature=1.0)
    config = distill.DistillConfig(alpha=0.0, temperature=1.0, max_steps=6, eval_every=3, patience=0, lr=3e-3, epochs=10,
                                   batch_size=2)
    student, record = distill.run(config, student, cache, d3_examples[:8], tmp_path / "ckpt")
    assert record["steps"] == 6 and record["teacher_examples_computed"] == len(rows)
    assert record["best_valid_loss"] <= record["valid_history"][0]["valid_loss"]
