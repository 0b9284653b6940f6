"""Vocabulary pruning: identical tokenisation up to the id mapping, exact kept logits, stock reload,
decoding unchanged, and catalog titles outside the pruned vocabulary reported."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_llama, tiny_qwen2
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmrec.artifact import read_manifest, write_artifact
from llmrec.prompting import PromptEncoder
from llmrec.recommender import Recommender
from llmrec.vocabulary import ORIGINAL_TOKENIZER, VocabularyCoverageError, check_artifact_catalog
from pruning.plan import KeepRatios
from pruning.prune import PruneConfig, run
from pruning.vocab import bpe_symbols, prune_vocabulary
from recdata.catalog import Catalog
from recdata.prompts import compact_template, d3_template


@pytest.fixture(params=["llama-tied-d3", "qwen2-untied-compact"])
def case(request, tokenizer):
    if request.param.startswith("llama"):
        return tiny_llama(len(tokenizer), tie=True), d3_template()
    return tiny_qwen2(len(tokenizer), tie=False), compact_template()


def test_bpe_symbols_follow_the_merge_order():
    ranks = {("a", "b"): 0, ("ab", "c"): 1, ("b", "c"): 2}
    assert bpe_symbols("abc", ranks) == {"a", "b", "c", "ab", "abc"}
    assert bpe_symbols("x", ranks) == {"x"}


@torch.no_grad()
def test_tokenisation_and_kept_logits_are_unchanged(case, tokenizer, prepared):
    model, template = case
    smaller, cut, record = prune_vocabulary(model, tokenizer, template, prepared.catalog, 5)
    kept = record["kept_ids"]
    new_id = {old: new for new, old in enumerate(kept)}
    assert record["original_vocab_size"] == len(tokenizer) and len(kept) < len(tokenizer)
    assert smaller.config.vocab_size == len(kept) == len(cut)
    assert smaller.get_input_embeddings().weight.shape[0] == len(kept)
    assert smaller.config.tie_word_embeddings == model.config.tie_word_embeddings
    before, after = PromptEncoder(tokenizer, template, 5), PromptEncoder(cut, template, 5)
    titles = prepared.catalog.titles
    for title in titles:
        assert after.response_ids(title) == [new_id[i] for i in before.response_ids(title)]
    for start in range(0, len(titles), 3):
        history = titles[start : start + 5]
        assert after.prompt_ids(history) == [new_id[i] for i in before.prompt_ids(history)]
    assert after.end_id == new_id[before.end_id] and cut.pad_token_id == new_id[tokenizer.pad_token_id]
    prompt = before.prompt_ids(titles[:4]) + before.response_ids(titles[5])
    reference = model(torch.tensor([prompt])).logits[0]  # (T, V)
    logits = smaller(torch.tensor([[new_id[i] for i in prompt]])).logits[0]  # (T, V')
    assert torch.allclose(logits, reference[:, kept], atol=1e-5)


def _config(tmp_path, teacher) -> PruneConfig:
    return PruneConfig(output=str(tmp_path / "run"), teacher=str(teacher), stages=["vocab"], ratios=KeepRatios(),
                       evaluate=False)


@pytest.fixture
def pruned(tmp_path, tokenizer, prepared):
    teacher = write_artifact(tmp_path / "dense", tiny_qwen2(len(tokenizer)), tokenizer, prepared.catalog,
                             {"template": compact_template().to_dict(), "max_history": 5})
    [path] = run(_config(tmp_path, teacher), prepared)
    return teacher, path


def test_vocab_stage_artifact_reloads_and_recommends_the_same(pruned, tokenizer, prepared):
    teacher, path = pruned
    assert path.name == "1-vocab"
    manifest = read_manifest(path)
    assert manifest["vocab"]["original_vocab_size"] == len(tokenizer)
    assert manifest["params"]["embedding"] < read_manifest(teacher)["params"]["embedding"]
    model = AutoModelForCausalLM.from_pretrained(path)
    cut = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(cut) == len(manifest["vocab"]["kept_ids"])
    assert len(AutoTokenizer.from_pretrained(path / ORIGINAL_TOKENIZER)) == len(tokenizer)
    dense, small = Recommender.from_artifact(teacher), Recommender.from_artifact(path)
    histories = [prepared.history(int(u), int(p)).tolist() for u, p in prepared.splits["test"][:5]]
    # the catalog head normalises over catalog tokens, whose logits are unchanged: the same lists and scores
    a = dense.recommend(histories, k=5, num_beams=10, head="catalog")
    b = small.recommend(histories, k=5, num_beams=10, head="catalog")
    assert [[i for i, _ in r] for r in a] == [[i for i, _ in r] for r in b]
    assert all(abs(x[1] - y[1]) < 1e-4 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    full = small.recommend(histories, k=5, num_beams=10, head="full")
    assert all(0 <= i < len(prepared.catalog) for r in full for i, _ in r)


def test_titles_outside_the_pruned_vocabulary_are_reported(pruned, prepared):
    _, path = pruned
    assert check_artifact_catalog(path, prepared.catalog.titles) == []
    problems = check_artifact_catalog(path, [*prepared.catalog.titles, "Qwzx Jjjj (2031)"])
    assert [p["title"] for p in problems] == ["Qwzx Jjjj (2031)"]
    assert problems[0]["missing_tokens"]
    # an artifact whose catalog was swapped for one with a new title refuses to load, naming the title
    titles = list(prepared.catalog.titles)
    titles[0] = "Qwzx Jjjj (2031)"
    Catalog(prepared.catalog.item_ids, titles).save(path / "catalog.parquet")
    with pytest.raises(VocabularyCoverageError, match="Qwzx Jjjj") as error:
        Recommender.from_artifact(path)
    assert "Re-run the vocab stage from the unpruned parent" in str(error.value)


def test_vocab_check_command(pruned, prepared, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    _, path = pruned
    prepared.save(tmp_path / "data")
    result = CliRunner().invoke(app, ["vocab-check", str(path), "--data", str(tmp_path / "data")])
    assert result.exit_code == 0 and "inside the artifact's vocabulary" in result.output
    changed = copy.deepcopy(prepared)  # the fixture is shared by the session
    titles = list(changed.catalog.titles)
    titles[3] = "Qwzx Jjjj (2031)"
    changed.catalog = Catalog(changed.catalog.item_ids, titles)
    changed.save(tmp_path / "new")
    result = CliRunner().invoke(app, ["vocab-check", str(path), "--data", str(tmp_path / "new")])
    assert result.exit_code == 1 and "Qwzx Jjjj (2031): needs pruned tokens" in result.output


def test_the_service_serves_a_vocabulary_pruned_artifact(pruned):
    from helpers import serving

    from app.main import create_app
    from app.settings import Settings

    teacher, path = pruned
    body = {"user_id": "u1", "history": ["i1", "i2", "i3"], "k": 5}
    answers = {}
    for name, artifact in (("dense", teacher), ("vocab", path)):
        with serving(create_app(Settings(models={name: str(artifact)}))) as client:
            response = client.post("/v1/recommend", json=body)
            assert response.status_code == 200, response.text
            answers[name] = [r["item_id"] for r in response.json()["items"]]
    assert answers["vocab"] == answers["dense"]  # the default catalog head: identical lists
