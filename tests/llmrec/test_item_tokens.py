"""Collaborative item tokens: the embedding wrapper, the prompt layout (and its fallback), packed windows equal
per-sample prompts, the artifact format (stock loading untouched, the table beside it), fine-tuning both
kinds, and the pruning stages carrying the tokens through every surgery."""

from __future__ import annotations

import pytest
import torch
from helpers import histories, save_model_dir, tiny_llama, tiny_qwen2
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmrec import item_tokens
from llmrec.artifact import parameter_counts, read_manifest, write_artifact
from llmrec.model import load_model
from llmrec.prompting import PromptEncoder
from llmrec.recommender import Recommender
from pruning.examples import IGNORE, sample_example, window_example
from recdata.prompts import compact_template, d3_template


def with_items(model, tokenizer, prepared, kind: str = "learned"):
    encoder = PromptEncoder(tokenizer, compact_template())
    if kind == "learned":
        table = item_tokens.learned(model, [encoder.title_ids(t) for t in prepared.catalog.titles])
    else:
        table = item_tokens.from_sasrec(model, torch.randn(len(prepared.catalog), 8))
    item_tokens.attach(model, table)
    return model


def test_item_ids_look_up_the_table_and_other_ids_the_embedding(tokenizer, prepared):
    model = with_items(tiny_llama(len(tokenizer)), tokenizer, prepared)
    wrapper = item_tokens.item_tokens_of(model)
    assert wrapper is not None and wrapper.vocab_size == len(tokenizer) and wrapper.num_items == len(prepared.catalog)
    ids = torch.tensor([[5, wrapper.token_id(3), 7, wrapper.token_id(0)]])
    out = wrapper(ids)
    assert torch.equal(out[0, 0], wrapper.base.weight[5]) and torch.equal(out[0, 2], wrapper.base.weight[7])
    assert torch.equal(out[0, 1], wrapper.table[3]) and torch.equal(out[0, 3], wrapper.table[0])
    title = PromptEncoder(tokenizer, compact_template()).title_ids(prepared.catalog.titles[3])
    assert torch.allclose(wrapper.table[3], wrapper.base.weight[title].mean(0))  # initialised from the title
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)  # item tokens are input only
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # still tied


def test_the_prompt_puts_each_items_token_after_its_title_and_falls_back_to_the_title(tokenizer, prepared):
    titles = prepared.catalog.titles
    tokens = {titles[0]: 1000, titles[1]: 1001}  # titles[2] has no token: a catalog addition
    for template in (compact_template(), d3_template()):
        plain = PromptEncoder(tokenizer, template)
        encoder = PromptEncoder(tokenizer, template, item_tokens=tokens)
        ids = encoder.prompt_ids(titles[:3])
        expected = list(plain._piece(template.prefix))
        for i, title in enumerate(titles[:3]):
            if i:
                expected += list(plain._piece(template.separator))
            expected += plain.item_ids(title) + ([1000 + i] if i < 2 else [])
        expected += list(plain._piece(template.suffix))
        assert ids == expected
        assert encoder.response_ids(titles[0]) == plain.response_ids(titles[0])  # the model never generates them


def test_packed_windows_equal_per_sample_prompts_and_never_label_item_tokens(tokenizer, prepared):
    titles = prepared.catalog.titles
    encoder = PromptEncoder(tokenizer, compact_template(), max_history=4,
                            item_tokens={t: 1000 + i for i, t in enumerate(titles)})
    user = 0
    seq = prepared.sequences[user]
    window = window_example(prepared, encoder, user, 0, 1, 4)
    for position in (1, 2, 3):  # each target's context in the window is that target's own prompt
        sample = sample_example(encoder, [titles[i] for i in seq[:position]], titles[seq[position]])
        prompt = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label == IGNORE]
        assert window.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE for tok, label in zip(window.input_ids, window.labels, strict=True) if tok >= 1000)
    assert window.input_ids[-1] == encoder.end_id  # the last item is a target only: no item token after it


def test_artifact_keeps_stock_loading_and_the_table_beside_it(tmp_path, tokenizer, prepared):
    model = with_items(tiny_qwen2(len(tokenizer)), tokenizer, prepared, "sasrec")
    with torch.no_grad():
        item_tokens.item_tokens_of(model).projection.weight.mul_(3)  # not what a fresh projection would be
    manifest = {"template": compact_template().to_dict(), "max_history": 10}
    before = Recommender(model, tokenizer, prepared.catalog, compact_template()).recommend(histories(prepared), k=5)
    path = write_artifact(tmp_path / "art", model, tokenizer, prepared.catalog, manifest)
    assert item_tokens.item_tokens_of(model) is not None  # the writer put them back
    stock = AutoModelForCausalLM.from_pretrained(path)
    assert stock.config.vocab_size == len(tokenizer) and not item_tokens.item_tokens_of(stock)
    assert set(load_file(str(path / item_tokens.ITEM_TOKENS_FILE))) == {"sasrec_items", "projection.weight", "projection.bias"}
    entry = read_manifest(path)["item_tokens"]
    assert entry == {"kind": "sasrec", "items": len(prepared.catalog), "file": item_tokens.ITEM_TOKENS_FILE}
    counts = read_manifest(path)["params"]
    assert counts["embedding"] > parameter_counts(stock)["embedding"]  # the projection counts as embedding
    assert counts["non_embedding"] == parameter_counts(stock)["non_embedding"]
    after = Recommender.from_artifact(path, device="cpu").recommend(histories(prepared), k=5)
    for a, b in zip(before, after, strict=True):
        assert [i for i, _ in a] == [i for i, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-4)
    assert Recommender.from_artifact(path, device="cpu").prompt_ids([0])[-1] == len(tokenizer) + 0


@pytest.mark.parametrize("kind", ["learned", "sasrec"])
def test_finetuning_trains_the_item_vectors(tmp_path, tokenizer, prepared, kind):
    from pruning.train import TrainConfig, run

    base = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    config = TrainConfig(output=str(tmp_path / "out"), model=str(base), template="compact", batch_size=8, lr=3e-3,
                         max_steps=6, eval_every=6, valid_examples=16, warmup_steps=0, patience=0, epochs=20.0,
                         item_tokens=kind)
    path = run(config, prepared)
    loaded = load_model(path, device="cpu", dtype=torch.float32).model
    wrapper = item_tokens.item_tokens_of(loaded)
    assert wrapper is not None and wrapper.kind == kind
    fresh = with_items(load_model(base, device="cpu", dtype=torch.float32).model, tokenizer, prepared, kind)
    if kind == "learned":  # moved away from the title means they started from
        assert not torch.allclose(wrapper.table, item_tokens.item_tokens_of(fresh).table)
    else:  # the SASRec table is frozen; the projection learnt
        assert wrapper.projection.weight.requires_grad and not wrapper.sasrec_items.requires_grad
    assert read_manifest(path)["stage_config"]["item_tokens"] == kind
    ranked = Recommender.from_artifact(path, device="cpu").recommend(histories(prepared, 2), k=3)
    assert all(len(r) == 3 for r in ranked)
    with pytest.raises(ValueError, match="--method full"):
        run(TrainConfig(output=str(tmp_path / "lora"), model=str(base), method="lora", item_tokens="learned",
                        max_steps=1), prepared)


def test_every_pruning_stage_carries_the_item_tokens(tmp_path, tokenizer, prepared):
    from pruning import distill
    from pruning.calibration import CalibrationConfig
    from pruning.plan import KeepRatios
    from pruning.prune import PruneConfig, run

    teacher_model = with_items(tiny_qwen2(len(tokenizer), layers=4), tokenizer, prepared)
    teacher = write_artifact(tmp_path / "dense", teacher_model, tokenizer, prepared.catalog,
                             {"template": compact_template().to_dict(), "max_history": 5})
    config = PruneConfig(output=str(tmp_path / "run"), teacher=str(teacher), stages=["attn", "mlp", "depth", "vocab"],
                         ratios=KeepRatios(kv_groups=0.5, heads_per_group=1.0, hidden=0.5, mlp=0.5, layers=0.5),
                         calibration=CalibrationConfig(samples=16, batch_size=8, top_k=16),
                         distill=distill.DistillConfig(examples=32, max_steps=2, eval_every=2, valid_examples=8,
                                                       batch_size=8), evaluate=False)
    paths = run(config, prepared)
    teacher_table = item_tokens.item_tokens_of(teacher_model).table
    for path in paths:
        model = load_model(path, device="cpu", dtype=torch.float32).model
        wrapper = item_tokens.item_tokens_of(model)
        assert wrapper is not None and wrapper.table.shape == (len(prepared.catalog), model.config.hidden_size)
        assert wrapper.vocab_size == model.config.vocab_size  # after the vocab stage the ids start lower
        recommender = Recommender.from_artifact(path, device="cpu")
        assert recommender.prompt_ids([2])[-1] == model.config.vocab_size + 2
        assert all(len(r) == 3 for r in recommender.recommend(histories(prepared, 2), k=3))
    assert teacher_table.shape[1] == 2 * item_tokens.item_tokens_of(load_model(paths[0], device="cpu").model).table.shape[1]
