"""Teacher-path distillation: the teacher's own top items as distillation examples (pruning.teacher_paths)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import tiny_llama

from llmrec.prompting import PromptEncoder
from llmrec.recommender import Recommender
from pruning import distill
from pruning.examples import IGNORE, split_examples
from pruning.teacher_paths import sample_prompts, teacher_paths
from recdata.prompts import compact_template


def test_teacher_paths_are_the_teachers_top_items_after_each_prompt(tokenizer, prepared):
    """Each sampled training prompt gives its teacher's top-N items (the served search: history excluded), best
    first, each as prompt + that title + end with the loss on the title only."""
    teacher = tiny_llama(len(tokenizer), seed=3)
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    paths = teacher_paths(teacher, tokenizer, prepared, compact_template(), encoder, prompts=5, items=3, seed=0,
                          num_beams=6, batch_size=2)
    assert len(paths.pairs) == 5 and len(paths.examples) == 15
    recommender = Recommender(teacher, tokenizer, prepared.catalog, compact_template(), 10)
    histories = [prepared.history(int(u), int(p)).tolist() for u, p in paths.pairs]
    expected = recommender.recommend(histories, k=3, num_beams=6, exclude=histories, assist=False)
    assert paths.items == [[item for item, _ in ranked] for ranked in expected]
    titles = prepared.catalog.titles
    for index, (history, items) in enumerate(zip(histories, paths.items, strict=True)):
        assert not set(items) & set(history)
        prompt = encoder.prompt_ids([titles[i] for i in history])
        for rank, item in enumerate(items):
            example = paths.examples[3 * index + rank]
            response = encoder.response_ids(titles[item])
            assert example.input_ids == prompt + response
            assert example.labels == [IGNORE] * len(prompt) + response


def test_the_prompt_sample_is_seeded(prepared):
    data = prepared
    first, again, other = sample_prompts(data, 7, 0), sample_prompts(data, 7, 0), sample_prompts(data, 7, 1)
    assert (first == again).all() and not (first == other).all()
    assert len(sample_prompts(data, 10**6, 0)) == len(data.splits["train"])
    with pytest.raises(ValueError, match="at least one prompt"):
        sample_prompts(data, 0, 0)


def test_every_step_adds_its_path_examples_and_never_draws_them_as_windows(tmp_path, tokenizer, prepared):
    teacher = tiny_llama(len(tokenizer), seed=1)
    student = tiny_llama(len(tokenizer), seed=2)
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    windows = split_examples(prepared, encoder, "train", limit=16, seed=1)
    paths = teacher_paths(teacher, tokenizer, prepared, compact_template(), encoder, prompts=3, items=2, seed=0,
                          num_beams=4).examples
    cache = distill.TeacherCache(teacher, [*windows, *paths], 0, top_k=16, temperature=1.0)
    requested: list[list[int]] = []
    targets = cache.targets
    cache.targets = lambda indices: requested.append(list(indices)) or targets(indices)  # type: ignore[method-assign]
    path_indices = list(range(16, 22))
    config = distill.DistillConfig(max_steps=3, eval_every=3, patience=0, batch_size=4, lr=1e-3, teacher_paths=2,
                                   teacher_path_prompts=3, teacher_path_batch=2)
    valid = split_examples(prepared, encoder, "valid", limit=4)
    _, record = distill.run(config, student, cache, valid, tmp_path / "ckpt", path_indices=path_indices)
    assert record["steps"] == 3 and record["teacher_path_examples"] == 6
    assert len(requested) == 3  # one batch a step: its windows, then its paths
    for batch in requested:
        assert len(batch) == 6 and all(i < 16 for i in batch[:4]) and all(i in path_indices for i in batch[4:])
    with pytest.raises(ValueError, match="path examples"):
        distill.run(config, student, cache, valid, tmp_path / "ckpt2")
    with pytest.raises(ValueError, match="teacher_path_batch"):
        distill.run(replace(config, teacher_path_batch=0), student, cache, valid, tmp_path / "ckpt3", path_indices=path_indices)


def test_path_batches_cycle_through_a_seeded_order_and_depend_only_on_the_batch():
    paths_for = distill.path_batches(list(range(10, 20)), 3, seed=0)
    assert paths_for([1, 2, 3]) == paths_for([1, 2, 3])  # a resumed run draws the same for the same batch
    drawn = {tuple(paths_for([i, i + 1])) for i in range(40)}
    assert all(len(set(d)) == 3 and set(d) <= set(range(10, 20)) for d in drawn)
    assert len(set().union(*drawn)) == 10  # every path example gets drawn
    assert sorted(distill.path_batches([5, 6], 4, seed=0)([0])) == [5, 6]  # fewer paths than a step asks for


def test_saved_paths_are_read_back_for_the_same_teacher_only(tmp_path, tokenizer, prepared, monkeypatch):
    """A resumed run reads the teacher's items instead of decoding again; another teacher decodes anew."""
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    saved = tmp_path / "teacher-paths.json"
    args = (tokenizer, prepared, compact_template(), encoder)
    first = teacher_paths(tiny_llama(len(tokenizer), seed=3), *args, prompts=4, items=2, seed=0, num_beams=4, saved=saved)
    assert saved.is_file()
    monkeypatch.setattr(Recommender, "recommend", lambda *a, **k: pytest.fail("decoded again"))
    again = teacher_paths(tiny_llama(len(tokenizer), seed=3), *args, prompts=4, items=2, seed=0, num_beams=4, saved=saved)
    assert again.items == first.items and [e.input_ids for e in again.examples] == [e.input_ids for e in first.examples]
    with pytest.raises(pytest.fail.Exception, match="decoded again"):
        teacher_paths(tiny_llama(len(tokenizer), seed=4), *args, prompts=4, items=2, seed=0, num_beams=4, saved=saved)
