"""Fine-tuning: loss falls (Llama, Qwen2 with biases and GQA), LoRA merges, resume equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import save_model_dir, tiny_llama, tiny_qwen2
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmrec.artifact import read_manifest
from pruning.train import TrainConfig, _config_key, apply_profile, run


def tiny_config(tmp_path, model_dir, **overrides) -> TrainConfig:
    values = dict(output=str(tmp_path / "out"), model=str(model_dir), template="compact", batch_size=8, lr=3e-3,
                  max_steps=12, eval_every=6, valid_examples=16, warmup_steps=0, patience=0, epochs=20.0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_finetuning_lowers_validation_loss(tmp_path, tokenizer, prepared, kind):
    model = tiny_llama(len(tokenizer)) if kind == "llama" else tiny_qwen2(len(tokenizer))
    model_dir = save_model_dir(tmp_path / "base", model, tokenizer)
    template = "compact" if kind == "llama" else "d3"
    out = run(tiny_config(tmp_path, model_dir, template=template), prepared)
    manifest = read_manifest(out)
    history = manifest["training"]["valid_history"]
    assert history[0]["step"] == 0 and len(history) == 3
    assert manifest["training"]["best_valid_loss"] < 0.8 * history[0]["valid_loss"]
    assert manifest["template"]["name"] == template and manifest["training"]["packing"] == (template == "compact")
    assert not (tmp_path / "out.ckpt").exists()  # removed after success
    AutoModelForCausalLM.from_pretrained(out)  # stock class


def test_lora_is_merged_into_a_plain_artifact(tmp_path, tokenizer, prepared):
    model_dir = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    out = run(tiny_config(tmp_path, model_dir, method="lora", lora_r=4, lr=1e-2, lora_targets=["q_proj", "v_proj"]), prepared)
    weights = load_file(str(out / "model.safetensors"))
    assert not [k for k in weights if "lora" in k]
    base = load_file(str(model_dir / "model.safetensors"))
    changed = [k for k in base if not torch.equal(base[k], weights[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
    assert read_manifest(out)["training"]["best_valid_loss"] < read_manifest(out)["training"]["valid_history"][0]["valid_loss"]


def test_resume_gives_the_same_artifact(tmp_path, tokenizer, prepared):
    model_dir = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    straight = run(tiny_config(tmp_path / "a", model_dir, max_steps=8, eval_every=4), prepared)
    # interrupted after 4 steps (checkpoint kept), then resumed to 8
    run(tiny_config(tmp_path / "b", model_dir, max_steps=4, eval_every=4, keep_checkpoints=True), prepared)
    state = json.loads((tmp_path / "b" / "out.ckpt" / "trainer_state.json").read_text())
    assert state["state"]["step"] == 4
    resumed = run(tiny_config(tmp_path / "b", model_dir, max_steps=8, eval_every=4), prepared)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert read_manifest(resumed)["training"]["steps"] == 8


@pytest.mark.parametrize(("kind", "settings"), [("llama", {}),
                                               ("qwen2", {"template": "d3", "method": "lora", "lr": 1e-2,
                                                          "lora_targets": ["q_proj", "up_proj"], "lora_dropout": 0.0})])
def test_compiled_layers_train_the_same_weights(tmp_path, tokenizer, prepared, kind, settings):
    # the layers compiled in place (LoRA's adapters inside them too): the same updates to float tolerance, a
    # plain artifact, validation eager (no dropout: compiled layers draw their masks from inductor's generator)
    model = tiny_llama(len(tokenizer)) if kind == "llama" else tiny_qwen2(len(tokenizer))
    model_dir = save_model_dir(tmp_path / "base", model, tokenizer)
    eager = run(tiny_config(tmp_path / "a", model_dir, max_steps=4, eval_every=2, **settings), prepared)
    compiled = run(tiny_config(tmp_path / "b", model_dir, max_steps=4, eval_every=2, compile=True, **settings), prepared)
    a, b = load_file(str(eager / "model.safetensors")), load_file(str(compiled / "model.safetensors"))
    assert a.keys() == b.keys()
    # Adam's normalised updates magnify float noise on near-zero gradients a little: a tolerance of 1e-4,
    # against training moves of 1e-3 and more
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    base = load_file(str(model_dir / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert (base[key] - b[key]).abs().max() > 1e-3 * settings.get("lr", 3e-3) / 3e-3
    plain, fast = read_manifest(eager)["training"], read_manifest(compiled)["training"]
    assert plain["compiled_layers"] == 0 and fast["compiled_layers"] == 2
    assert fast["valid_history"][-1]["valid_loss"] == pytest.approx(plain["valid_history"][-1]["valid_loss"], rel=1e-4)
    # compiling is no part of the checkpoint's configuration
    assert "compile" not in _config_key(tiny_config(tmp_path, model_dir, compile=True))


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path, tokenizer, prepared):
    model_dir = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    run(tiny_config(tmp_path, model_dir, max_steps=2, eval_every=2, keep_checkpoints=True), prepared)
    with pytest.raises(ValueError, match="another configuration"):
        run(tiny_config(tmp_path, model_dir, max_steps=4, lr=1e-4), prepared)


def test_profiles():
    config = apply_profile(TrainConfig(output="x"), "cpu")
    assert config.profile == "cpu" and config.max_minutes and config.template == "compact"
    with pytest.raises(ValueError, match="unknown profile"):
        apply_profile(config, "huge")


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path, tokenizer, prepared):
    model_dir = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    prepared.save(tmp_path / "data")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cli"]
    command = [*launcher, "train", "-o", str(tmp_path / "out"), "--data", str(tmp_path / "data"),
               "--model", str(model_dir), "--max-steps", "4", "--eval-every", "2", "--batch-size", "4",
               "--valid-examples", "8", "--lr", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "out")
    assert manifest["training"]["processes"] == 2 and manifest["training"]["steps"] == 4


@pytest.mark.parametrize("packed", [False, True])
def test_the_catalog_loss_is_the_causal_lm_loss_renormalised_over_the_catalogs_tokens(tokenizer, prepared, packed):
    from llmrec.prompting import PromptEncoder
    from pruning.calibration import catalog_vocabulary
    from pruning.examples import IGNORE, collate, training_examples
    from pruning.packing import pack
    from pruning.train import catalog_loss
    from recdata.prompts import get_template

    model = tiny_llama(len(tokenizer)).eval()
    encoder = PromptEncoder(tokenizer, get_template("compact"), 10)
    examples = training_examples(prepared, encoder, True, None, 6, 0)
    if packed:
        examples = pack(examples, 256, 0)
    vocabulary = catalog_vocabulary(model, encoder, prepared, examples)
    assert 1 < len(vocabulary) < len(tokenizer)
    batch = collate(examples[:4], int(tokenizer.pad_token_id))
    with torch.no_grad():
        ours = catalog_loss(model, batch, vocabulary)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "attention_mask" if packed else "")}
        logits = model(**inputs, use_cache=False).logits[:, :-1]  # the whole head at every position
        labels = batch["labels"][:, 1:]
        labelled = labels != IGNORE
        restricted = logits[labelled][:, vocabulary.ids]  # (n, U): the catalog's columns, renormalised
        expected = torch.nn.functional.cross_entropy(restricted, vocabulary.local[labels[labelled]])
        full = torch.nn.functional.cross_entropy(logits[labelled], labels[labelled])
    assert torch.allclose(ours, expected, atol=1e-5)
    assert float(ours) < float(full)  # fewer competitors: a smaller loss, the same labels


def test_finetuning_over_the_catalogs_tokens_lowers_that_loss_and_is_recorded(tmp_path, tokenizer, prepared):
    model_dir = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    out = run(tiny_config(tmp_path, model_dir, loss_vocab="catalog"), prepared)
    manifest = read_manifest(out)
    history = manifest["training"]["valid_history"]
    assert manifest["stage_config"]["loss_vocab"] == "catalog"
    assert manifest["training"]["best_valid_loss"] < 0.8 * history[0]["valid_loss"]
    full = read_manifest(run(tiny_config(tmp_path / "full", model_dir), prepared))["training"]["valid_history"]
    assert history[0]["valid_loss"] < full[0]["valid_loss"]  # the same untrained model: validated over the catalog
    assert _config_key(tiny_config(tmp_path, model_dir, loss_vocab="catalog")) != _config_key(tiny_config(tmp_path, model_dir))
