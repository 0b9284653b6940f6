"""Artifacts: stock transformers reload them with identical logits; manifests; atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama, tiny_qwen2
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmrec.artifact import is_artifact, parameter_counts, read_manifest, update_manifest, write_artifact
from llmrec.recommender import Recommender
from recdata.prompts import compact_template


@pytest.mark.parametrize("kind", ["llama-tied", "qwen2-untied-bias"])
def test_reload_gives_identical_logits(tmp_path, tokenizer, prepared, kind):
    model = tiny_llama(len(tokenizer), tie=True) if kind == "llama-tied" else tiny_qwen2(len(tokenizer), tie=False)
    if kind.startswith("qwen2"):
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    manifest = {"template": compact_template().to_dict(), "max_history": 10, "stage": "test"}
    path = write_artifact(tmp_path / "art", model, tokenizer, prepared.catalog, manifest)
    assert is_artifact(path) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    reloaded = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    ids = torch.randint(2, len(tokenizer), (2, 17))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert AutoTokenizer.from_pretrained(path)("Toy Story (1995)")["input_ids"] == tokenizer("Toy Story (1995)")["input_ids"]
    rec = Recommender.from_artifact(path, device="cpu")
    assert rec.catalog.titles == prepared.catalog.titles and rec.template == compact_template()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))


def test_parameter_counts_tied_and_untied(tokenizer):
    vocab = len(tokenizer)
    tied, untied = tiny_llama(vocab, tie=True), tiny_llama(vocab, tie=False)
    t, u = parameter_counts(tied), parameter_counts(untied)
    assert t["embedding"] == vocab * 64 and u["embedding"] == 2 * vocab * 64
    assert t["non_embedding"] == u["non_embedding"] == t["total"] - vocab * 64
    assert t["total"] == sum(p.numel() for p in tied.parameters())


def test_manifest_content_overwrite_and_update(tmp_path, tokenizer, prepared):
    model = tiny_llama(len(tokenizer))
    manifest = {"template": compact_template().to_dict(), "max_history": 10, "stage": "finetune", "parent": "x"}
    path = write_artifact(tmp_path / "art", model, tokenizer, prepared.catalog, manifest)
    data = read_manifest(path)
    assert data["params"]["total"] == parameter_counts(model)["total"]
    assert data["catalog"]["items"] == len(prepared.catalog) and "torch" in data["versions"] and data["created"]
    write_artifact(tmp_path / "art", model, tokenizer, prepared.catalog, {**manifest, "stage": "second"})
    assert read_manifest(path)["stage"] == "second"
    update_manifest(path, metrics={"test": {"ndcg@10": 0.5}})
    assert json.loads((path / "prunerec.json").read_text())["metrics"]["test"]["ndcg@10"] == 0.5
    with pytest.raises(ValueError, match="template"):
        write_artifact(tmp_path / "bad", model, tokenizer, prepared.catalog, {"max_history": 1})
    assert not (tmp_path / "bad").exists()
