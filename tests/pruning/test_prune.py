"""The PruneRec stages and pipeline on tiny models: plan counts, KL falls with distillation, resume."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import save_model_dir, tiny_llama, tiny_qwen2
from safetensors.torch import load_file

from llmrec.artifact import parameter_counts, read_manifest
from llmrec.prompting import PromptEncoder
from pruning import distill, reuse
from pruning.calibration import CalibrationConfig, batches, calibration_batches, mean_kl, teacher_targets
from pruning.examples import split_examples
from pruning.plan import DEFAULT_RATIOS, KeepRatios, gradual_plans, plan_for_target, plan_from_ratios, stage_scope
from pruning.prune import PruneConfig, run
from pruning.surgery import Shape, count_parameters, shape_of, slice_mlp
from pruning.train import TrainConfig
from pruning.train import run as train
from recdata.prompts import compact_template

SMOLLM2 = Shape(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, layers=30, vocab=49152, tied=True)


def test_default_plan_for_smollm2_removes_at_least_95_percent():
    plan = plan_from_ratios(SMOLLM2, DEFAULT_RATIOS)
    assert plan.removed_fraction >= 0.95
    assert (plan.target.kv_heads, plan.target.heads, plan.target.hidden, plan.target.intermediate, plan.target.layers) == (1, 3, 288, 384, 10)
    assert count_parameters(SMOLLM2)["total"] == 134_515_008  # what torch counts on the real SmolLM2-135M
    target = plan_for_target(SMOLLM2, 0.95)
    assert target.removed_fraction >= 0.95
    looser = plan_for_target(SMOLLM2, 0.5)
    assert 0.5 <= looser.removed_fraction < target.removed_fraction
    assert "non-embedding parameters removed" in plan.describe()
    with pytest.raises(ValueError):
        KeepRatios(hidden=0.0)


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tokenizer, prepared):
    """A briefly fine-tuned tiny Qwen2 (GQA, biases, untied) as the dense teacher artifact."""
    root = tmp_path_factory.mktemp("dense")
    base = save_model_dir(root / "base", tiny_qwen2(len(tokenizer), layers=4), tokenizer)
    config = TrainConfig(output=str(root / "dense"), model=str(base), max_steps=10, eval_every=10, lr=3e-3,
                         epochs=20.0, valid_examples=16, warmup_steps=0, patience=0)
    return train(config, prepared)


def tiny_prune_config(output, teacher, **overrides) -> PruneConfig:
    values = dict(
        output=str(output), teacher=str(teacher),
        ratios=KeepRatios(kv_groups=0.5, heads_per_group=1.0, hidden=0.5, mlp=0.5, layers=0.5),
        calibration=CalibrationConfig(samples=16, batch_size=8, top_k=16),
        distill=distill.DistillConfig(examples=32, max_steps=4, eval_every=2, valid_examples=8, batch_size=8, lr=3e-3),
        evaluate=False,
    )
    values.update(overrides)
    return PruneConfig(**values)


def test_pipeline_counts_match_the_plan_and_artifacts_load(tmp_path, dense, prepared):
    paths = run(tiny_prune_config(tmp_path / "run", dense), prepared)
    assert [p.name for p in paths] == ["1-attn", "2-mlp", "3-depth"]
    plan = plan_from_ratios(shape_of_artifact(dense), KeepRatios(kv_groups=0.5, heads_per_group=1.0, hidden=0.5, mlp=0.5, layers=0.5), True)
    for path, stage in zip(paths, ["attn", "mlp", "depth"], strict=True):
        manifest = read_manifest(path)
        assert manifest["params"] == count_parameters(plan.after(stage), attention_bias=True)
        assert manifest["parent"] and manifest["distillation"]["steps"] == 4
        # the example count is recorded, never a silent cap: 32 asked for, of the split's windows
        distilled = manifest["distillation"]
        assert distilled["examples_available"] > 0 and distilled["examples_used"] == min(32, distilled["examples_available"])
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(paths[-1])
    assert final.config.num_hidden_layers == 2 and final.config.num_key_value_heads == 1
    assert final.config.head_dim == 16
    ids = torch.randint(2, 300, (1, 6))
    with torch.no_grad():
        cached = final.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = final.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def shape_of_artifact(path):
    from transformers import AutoModelForCausalLM

    return shape_of(AutoModelForCausalLM.from_pretrained(path))


def test_resumed_pipeline_gives_the_same_artifact(tmp_path, dense, prepared):
    config = tiny_prune_config(tmp_path / "run", dense, stages=["attn", "mlp"])
    first = run(config, prepared)
    reference = load_file(str(first[1] / "model.safetensors"))
    # interrupted after the first stage: the second stage's artifact is missing
    import shutil

    shutil.rmtree(first[1])
    second = run(config, prepared)
    again = load_file(str(second[1] / "model.safetensors"))
    assert reference.keys() == again.keys()
    for key in reference:
        torch.testing.assert_close(reference[key], again[key], rtol=0, atol=1e-6)


def test_distillation_lowers_kl_on_held_out_samples(tmp_path, tokenizer, prepared):
    teacher = tiny_llama(len(tokenizer), seed=1)
    student = slice_mlp(tiny_llama(len(tokenizer), seed=2), [list(range(32))] * 2)
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    held_out = calibration_batches(prepared, encoder, CalibrationConfig(samples=16, seed=7), 0)
    targets = teacher_targets(teacher, held_out, top_k=32)
    before = mean_kl(student, held_out, targets)
    examples = split_examples(prepared, encoder, "train", limit=64, seed=1)
    cache = distill.TeacherCache(teacher, examples, 0, top_k=32, temperature=1.0)
    valid = split_examples(prepared, encoder, "valid", limit=8)
    config = distill.DistillConfig(alpha=0.0, temperature=1.0, max_steps=30, eval_every=10, patience=0, lr=3e-3, epochs=10)
    student, record = distill.run(config, student, cache, valid, tmp_path / "ckpt")
    after = mean_kl(student, held_out, targets)
    assert after < 0.7 * before
    assert record["teacher_examples_computed"] == 64  # each example's teacher output computed once
    assert batches(examples[:3], 0, 2)[0].input_ids.shape[0] == 2


@pytest.mark.parametrize("operational", [{"checkpoint_minutes": 5.0}, {"compile": True}, {"prefill_batch_size": 4}])
def test_operational_settings_change_no_stage_key(tmp_path, dense, prepared, operational):
    """How often a stage's distillation writes checkpoints, or whether its layers run compiled, changes nothing
    it produces: a run that differs only in it reuses the finished stage."""
    config = tiny_prune_config(tmp_path / "run", dense, stages=["attn"])
    first = run(config, prepared)[0]
    created = read_manifest(first)["created"]
    timed = replace(config, distill=replace(config.distill, **operational))
    assert distill.result_key(timed.distill) == distill.result_key(config.distill)
    again = run(timed, prepared)[0]
    assert again == first and read_manifest(again)["created"] == created  # reused, not distilled again


def test_a_plan_sweep_reuses_the_stages_its_plans_share(tmp_path, dense, prepared):
    """Plans that differ only in the MLP width and depth share the attention stage's student: a run with
    another such plan reuses a finished attention stage, and one with another residual width does not."""
    def written(path):  # the manifest's "created" has a resolution of a second: too coarse here
        return (path / "model.safetensors").stat().st_mtime_ns

    first = run(tiny_prune_config(tmp_path / "run", dense, stages=["attn", "mlp"]), prepared)
    created = [written(path) for path in first]
    first_mlp = shape_of_artifact(first[1]).intermediate
    deeper = KeepRatios(kv_groups=0.5, heads_per_group=1.0, hidden=0.5, mlp=0.25, layers=0.75)
    second = run(tiny_prune_config(tmp_path / "run", dense, stages=["attn", "mlp"], ratios=deeper), prepared)
    assert written(second[0]) == created[0]  # the attention stage reused
    assert written(second[1]) != created[1]  # the MLP stage cut to its new width
    assert shape_of_artifact(second[1]).intermediate < first_mlp
    wider = replace(deeper, hidden=0.75)
    third = run(tiny_prune_config(tmp_path / "run", dense, stages=["attn"], ratios=wider), prepared)
    assert written(third[0]) != created[0]
    assert shape_of_artifact(third[0]).hidden > shape_of_artifact(first[1]).hidden


def test_stage_scope_keeps_what_each_cut_depends_on():
    plan = plan_from_ratios(SMOLLM2, DEFAULT_RATIOS).to_dict()
    other = plan_from_ratios(SMOLLM2, replace(DEFAULT_RATIOS, mlp=0.125, layers=0.5)).to_dict()
    assert stage_scope(plan, "attn") == stage_scope(other, "attn")
    assert stage_scope(plan, "mlp") != stage_scope(other, "mlp")
    assert stage_scope(plan, "depth")["after"]["layers"] == 10
    assert stage_scope(plan, "vocab") == plan  # outside the three cuts: the whole plan


def test_compiled_distillation_recovers_the_same_student(tmp_path, dense, prepared):
    """The student's layers compiled in place while distilling: the same student to float tolerance, recorded;
    with a hidden-state term (hooks that change every step) the layers stay eager."""
    settings = distill.DistillConfig(examples=32, max_steps=4, eval_every=2, valid_examples=8, batch_size=8, lr=3e-3)
    eager = run(tiny_prune_config(tmp_path / "eager", dense, stages=["attn"], distill=settings), prepared)[0]
    fast = run(tiny_prune_config(tmp_path / "fast", dense, stages=["attn"], distill=replace(settings, compile=True)),
               prepared)[0]
    a, b = load_file(str(eager / "model.safetensors")), load_file(str(fast / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # Adam magnifies float noise on near-zero gradients a little; training moves weights by ~1e-2
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    layers = shape_of_artifact(fast).layers
    assert read_manifest(eager)["distillation"]["compiled_layers"] == 0
    assert read_manifest(fast)["distillation"]["compiled_layers"] == layers
    hooked = replace(settings, compile=True, hidden_weight=1.0)
    hidden = run(tiny_prune_config(tmp_path / "hidden", dense, stages=["attn"], distill=hooked), prepared)[0]
    assert read_manifest(hidden)["distillation"]["compiled_layers"] == 0


def test_a_shared_teacher_cache_reuses_outputs_of_the_same_teacher_examples_and_settings_only(tokenizer, prepared):
    """shared=True keeps the teacher's distributions for the process: a second cache of the same teacher, examples
    and settings computes nothing and returns the same targets; another top_k, other weights or an unshared
    cache compute afresh, and only the last teacher's outputs are kept."""
    teacher = tiny_llama(len(tokenizer), layers=2)
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    examples = split_examples(prepared, encoder, "train", limit=12, seed=3)
    every = list(range(len(examples)))

    first = distill.TeacherCache(teacher, examples, 0, top_k=8, temperature=1.0, shared=True)
    expected = first.targets(every)
    assert (first.reused, first.computed) == (0, 12)
    second = distill.TeacherCache(teacher, examples, 0, top_k=8, temperature=1.0, shared=True)
    again = second.targets(every)
    assert (second.reused, second.computed) == (12, 0)
    assert torch.equal(again.top_index, expected.top_index) and torch.equal(again.top_logprob, expected.top_logprob)
    assert distill.TeacherCache(teacher, examples, 0, top_k=8, temperature=1.0).reused == 0  # not shared

    other_k = distill.TeacherCache(teacher, examples, 0, top_k=4, temperature=1.0, shared=True)
    assert other_k.reused == 0 and other_k.targets(every).top_index.shape[-1] == 4
    # one teacher's outputs kept at a time: the top_k=8 ones are gone
    assert distill.TeacherCache(teacher, examples, 0, top_k=8, temperature=1.0, shared=True).reused == 0
    with torch.no_grad():
        teacher.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    changed = distill.TeacherCache(teacher, examples, 0, top_k=8, temperature=1.0, shared=True)
    assert changed.reused == 0
    changed.targets(every)
    assert changed.computed == 12


def test_a_prefill_computes_every_examples_targets_as_on_first_use(tokenizer, prepared):
    """prefill() runs the teacher over every example up front, longest first in batches of its own size: the
    same distributions as computing each on first use (to float tolerance: other padding), and later targets()
    calls run nothing."""
    teacher = tiny_llama(len(tokenizer), layers=2)
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    examples = split_examples(prepared, encoder, "train", limit=10, seed=4)
    every = list(range(len(examples)))
    lazy = distill.TeacherCache(teacher, examples, 0, top_k=8, temperature=1.0)
    expected = lazy.targets(every)
    prefilled = distill.TeacherCache(teacher, examples, 0, top_k=8, temperature=1.0)
    prefilled.prefill(batch_size=3)
    assert prefilled.computed == 10 and prefilled.prefill_seconds > 0
    got = prefilled.targets(every)
    assert prefilled.computed == 10  # nothing more
    assert torch.equal(got.top_index, expected.top_index)
    assert torch.allclose(got.top_logprob, expected.top_logprob, atol=1e-5)
    assert torch.allclose(got.tail_logprob, expected.tail_logprob, atol=1e-5)
    prefilled.prefill(batch_size=3)  # complete: nothing to do
    assert prefilled.computed == 10
    with pytest.raises(ValueError, match="positive"):
        prefilled.prefill(batch_size=0)



def test_a_prefill_out_of_gpu_memory_halves_its_batch_instead_of_failing(tokenizer, prepared, monkeypatch, caplog):
    """Arms share the card: a pass that does not fit is retried with half the examples, down to one."""
    teacher = tiny_llama(len(tokenizer), layers=1)
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    examples = split_examples(prepared, encoder, "train", limit=7, seed=4)
    cache = distill.TeacherCache(teacher, examples, 0, top_k=4, temperature=1.0)
    original = distill.TeacherCache._compute
    sizes = []

    def limited(self, missing):
        sizes.append(len(missing))
        if len(missing) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        original(self, missing)

    monkeypatch.setattr(distill.TeacherCache, "_compute", limited)
    with caplog.at_level("WARNING", logger="pruning.distill"):
        cache.prefill(batch_size=8)
    assert cache.computed == 7 and sizes[:3] == [7, 4, 2] and max(sizes[3:]) <= 2
    assert "out of GPU memory" in caplog.text
    lone = distill.TeacherCache(teacher, examples, 0, top_k=4, temperature=1.0)
    monkeypatch.setattr(distill.TeacherCache, "_compute", lambda self, missing: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        lone.prefill(batch_size=1)


def test_teacher_outputs_written_once_are_loaded_by_a_matching_run_only(tmp_path, tokenizer, prepared, caplog):
    """A teacher-outputs directory: the first cache computes and writes <key>.safetensors, a second cache of the
    same teacher, examples and settings loads it (computing nothing, the same tensors exactly), one with other
    settings writes a file of its own, and a file whose key is not the cache's is not read."""
    teacher = tiny_llama(len(tokenizer), layers=2)
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    examples = split_examples(prepared, encoder, "train", limit=9, seed=5)
    every = list(range(len(examples)))
    first = distill.TeacherCache(teacher, examples, 0, top_k=8, temperature=1.0)
    first.prefill(batch_size=4, directory=tmp_path)
    written = tmp_path / f"{first.key}.safetensors"
    assert written.exists() and first.computed == 9
    second = distill.TeacherCache(teacher, examples, 0, top_k=8, temperature=1.0)
    second.prefill(batch_size=4, directory=tmp_path)
    assert (second.computed, second.loaded) == (0, 9)
    mine, theirs = second.targets(every), first.targets(every)
    assert second.computed == 0
    for field in ("top_index", "top_logprob", "tail_logprob"):
        assert torch.equal(getattr(mine, field), getattr(theirs, field))
    assert mine.top_index.dtype == torch.int64

    other = distill.TeacherCache(teacher, examples, 0, top_k=4, temperature=1.0)
    other.prefill(batch_size=4, directory=tmp_path)
    assert other.computed == 9 and other.key != first.key
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted([written.name, f"{other.key}.safetensors"])

    # a file under this cache's name that holds another key is not trusted: computed again
    third = distill.TeacherCache(teacher, examples[:8], 0, top_k=8, temperature=1.0)
    (tmp_path / f"{third.key}.safetensors").write_bytes(written.read_bytes())
    with caplog.at_level("WARNING", logger="pruning.distill"):
        third.prefill(batch_size=4, directory=tmp_path)
    assert third.computed == 8 and third.loaded == 0 and "not this run's" in caplog.text
    fourth = distill.TeacherCache(teacher, examples[:8], 0, top_k=8, temperature=1.0)
    fourth.prefill(batch_size=4, directory=tmp_path)  # the foreign file was replaced by third's own
    assert (fourth.computed, fourth.loaded) == (0, 8)
    torn = distill.TeacherCache(teacher, examples[:7], 0, top_k=8, temperature=1.0)
    (tmp_path / f"{torn.key}.safetensors").write_bytes(written.read_bytes()[:100])  # a file cut short
    with caplog.at_level("WARNING", logger="pruning.distill"):
        torn.prefill(batch_size=4, directory=tmp_path)
    assert torn.computed == 7 and "cannot be read" in caplog.text


def test_processes_sharing_a_teacher_outputs_directory_compute_it_once(tmp_path, tokenizer, prepared, monkeypatch):
    """Two caches prefilling into one directory at once (threads here; each takes the lock through its own open
    file, as processes do): one computes while the other waits, then loads what it wrote."""
    import threading

    teacher = tiny_llama(len(tokenizer), layers=2)
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    examples = split_examples(prepared, encoder, "train", limit=6, seed=6)
    caches = [distill.TeacherCache(teacher, examples, 0, top_k=8, temperature=1.0) for _ in range(2)]
    for cache in caches:
        assert cache.key  # digested before the race (the digest reads the teacher's weights)
    computing = threading.Event()
    original = distill.TeacherCache._compute

    def slow(self, missing):
        computing.set()
        threading.Event().wait(0.2)  # long enough for the other thread to reach the lock
        original(self, missing)

    monkeypatch.setattr(distill.TeacherCache, "_compute", slow)
    threads = [threading.Thread(target=cache.prefill, kwargs={"batch_size": 6, "directory": tmp_path}) for cache in caches]
    threads[0].start()
    computing.wait(5)
    threads[1].start()
    for thread in threads:
        thread.join(30)
    assert sorted((c.computed, c.loaded) for c in caches) == [(0, 6), (6, 0)]


def test_a_stage_distils_from_prefilled_teacher_outputs_and_records_them(tmp_path, dense, prepared):
    """distill.teacher_outputs: the first run prefills and writes the teacher's distributions, a second run in a
    fresh process state loads them (no teacher pass) and distils the same student to float tolerance."""
    outputs = tmp_path / "teacher-outputs"
    settings = dict(teacher_outputs=str(outputs), prefill_batch_size=16)
    config = tiny_prune_config(tmp_path / "a", dense, stages=["attn"])
    config = replace(config, distill=replace(config.distill, **settings))
    reuse.forget()
    first = run(config, prepared)[0]
    record = read_manifest(first)["distillation"]
    used = record["examples_used"]  # the split's windows, up to the 32 asked for
    assert record["teacher_examples_computed"] == used and record["teacher_examples_loaded"] == 0
    assert len(list(outputs.glob("*.safetensors"))) == 1
    reuse.forget()  # as another process would start
    second = run(replace(config, output=str(tmp_path / "b")), prepared)[0]
    record = read_manifest(second)["distillation"]
    assert (record["teacher_examples_computed"], record["teacher_examples_loaded"]) == (0, used)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_loss_vocabulary_restricts_logits_ce_and_the_teachers_distribution(tokenizer, prepared):
    """Over a token set: the logits are the full logits' columns, the CE is the CE of the renormalised
    sub-distribution, the teacher cache's top tokens are columns of the set, and labels outside it are refused."""
    from pruning.calibration import LossVocabulary, mean_ce, response_logits, response_targets

    model = tiny_qwen2(len(tokenizer), layers=2)  # an untied head with a bias
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    batch = calibration_batches(prepared, encoder, CalibrationConfig(samples=8), 0)[0]
    labels = sorted(set(batch.targets.tolist()))
    vocab_size = model.get_output_embeddings().weight.shape[0]
    vocabulary = LossVocabulary.of([*labels, 3, 5], vocab_size)
    assert len(vocabulary) == len(set(labels) | {3, 5})
    with torch.no_grad():
        full = response_logits(model, batch)
        restricted = response_logits(model, batch, vocabulary)
    torch.testing.assert_close(restricted, full[:, vocabulary.ids])
    columns = response_targets(batch, vocabulary)
    assert torch.equal(vocabulary.ids[columns], batch.targets)
    expected = torch.nn.functional.cross_entropy(full[:, vocabulary.ids].float(), columns)
    assert mean_ce(model, [batch], vocabulary) == pytest.approx(float(expected), rel=1e-5)
    assert mean_ce(model, [batch], vocabulary) < mean_ce(model, [batch])  # fewer tokens share the mass
    from pruning.calibration import mean_ces

    # both from one forward pass: the same numbers as one pass each
    assert mean_ces(model, [batch], [None, vocabulary]) == pytest.approx([mean_ce(model, [batch]),
                                                                         mean_ce(model, [batch], vocabulary)], rel=1e-6)

    examples = split_examples(prepared, encoder, "train", limit=4, seed=1)
    cache = distill.TeacherCache(model, examples, 0, top_k=8, temperature=1.0, vocabulary=vocabulary)
    targets = cache.targets([0, 1])
    assert int(targets.top_index.max()) < len(vocabulary)
    probabilities = targets.top_logprob.exp().sum(-1) + targets.tail_logprob.exp()
    torch.testing.assert_close(probabilities, torch.ones_like(probabilities), rtol=0, atol=1e-4)

    with pytest.raises(ValueError, match="outside the loss vocabulary"):
        response_targets(batch, LossVocabulary.of([3, 5], vocab_size))
    with pytest.raises(ValueError):
        LossVocabulary.of([vocab_size], vocab_size)


def test_distilling_over_the_catalog_vocabulary_runs_and_is_recorded(tmp_path, dense, prepared):
    """vocab=catalog: the run distils over the catalog's tokens (the title tokens, the end token, any other
    label), records how many, validates on the CE over them, and keys the stages apart from the full-vocabulary
    run, whose key stays without the option (runs from before it resume)."""
    base = tiny_prune_config(tmp_path / "full", dense, stages=["attn"])
    catalog = replace(base, output=str(tmp_path / "catalog"), distill=replace(base.distill, vocab="catalog"))
    record = read_manifest(run(catalog, prepared)[0])["distillation"]
    assert isinstance(record["loss_vocabulary"], int) and 0 < record["loss_vocabulary"] < 200
    assert record["steps"] == 4 and 0 < record["best_valid_loss"] < float("inf")
    full = read_manifest(run(base, prepared)[0])
    assert full["distillation"]["loss_vocabulary"] == "full"
    assert "vocab" not in full["stage_key"]["distill"]
    assert read_manifest(tmp_path / "catalog" / "1-attn")["stage_key"]["distill"]["vocab"] == "catalog"
    with pytest.raises(ValueError, match="loss vocabulary"):
        distill.run(replace(base.distill, vocab="catalog"), tiny_qwen2(10, layers=1),
                    distill.TeacherCache(tiny_qwen2(10, layers=1), [], 0, 4, 1.0), [], tmp_path / "x")


def test_attention_stage_keeps_uniform_gqa(tmp_path, dense, prepared):
    paths = run(tiny_prune_config(tmp_path / "r", dense, stages=["attn"]), prepared)
    manifest = read_manifest(paths[0])
    groups = manifest["pruning"]["kept_kv_groups"]
    heads = manifest["pruning"]["kept_heads"]
    for g, h in zip(groups, heads, strict=True):
        assert len(g) == 1 and len(h) == 2 and all(x // 2 == g[0] for x in h)
    assert parameter_counts  # imported for the pipeline tests


# 256 rows: every candidate copy of a batch in one layer call; 8: one copy (a batch of 8) a call
@pytest.mark.parametrize(("kind", "rows"), [("llama", 256), ("qwen2-sliding", 256), ("llama", 8)])
def test_greedy_layer_search_is_greedy_removal_by_the_calibration_loss(tokenizer, prepared, kind, rows):
    """Each round removes the layer whose absence gives the lowest calibration CE, measured by running the
    model without it (the search's one pass of branching copies must give the same losses)."""
    from pruning.calibration import mean_ce
    from pruning.importance import greedy_layer_removal, layers_replaced

    vocab = len(tokenizer)
    model = tiny_llama(vocab, layers=5) if kind == "llama" else tiny_qwen2(vocab, layers=5, sliding_window=6)
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    calibration = calibration_batches(prepared, encoder, CalibrationConfig(samples=16), 0)
    assert len(calibration) == 2 and any(not bool(b.attention_mask.all()) for b in calibration)  # padded batches
    removed, losses = greedy_layer_removal(model, calibration, 3, max_rows=rows)
    layers = list(model.model.layers)
    kept, expected, expected_losses = list(range(5)), [], []
    for _ in range(3):
        trials = []
        for candidate in kept:
            with layers_replaced(model, [layers[j] for j in kept if j != candidate]):
                trials.append(mean_ce(model, calibration))
        best = min(range(len(kept)), key=trials.__getitem__)
        expected.append(kept.pop(best))
        expected_losses.append(trials[best])
    assert removed == expected
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert list(model.model.layers) == layers  # the model is left as it was
    assert greedy_layer_removal(model, calibration, 0) == ([], [])
    with pytest.raises(ValueError, match="calibration targets"):
        greedy_layer_removal(model, [], 1)


# 256 rows: every unit of a layer in one pass; 10: two units (batches of 5) a pass, in chunks
@pytest.mark.parametrize(("kind", "rows"), [("llama", 256), ("qwen2", 256), ("llama", 10)])
def test_head_scores_are_the_kl_of_each_ablation_alone(tokenizer, prepared, kind, rows, monkeypatch):
    """Each head's (and KV group's) score is the calibration KL to the teacher with that head's slice of the
    o_proj input zeroed, measured by a whole forward pass per ablation (the scorer's batched, partial passes
    must give the same)."""
    from pruning import importance
    from pruning.calibration import mean_kl

    monkeypatch.setattr(importance, "ABLATION_ROWS", rows)
    model = (tiny_llama if kind == "llama" else tiny_qwen2)(len(tokenizer), layers=2)
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    calibration = calibration_batches(prepared, encoder, CalibrationConfig(samples=12, batch_size=5), 0)
    teacher = (tiny_llama if kind == "llama" else tiny_qwen2)(len(tokenizer), seed=1, layers=2)
    targets = teacher_targets(teacher, calibration, 16)
    shape = importance.shape_of(model)
    scores = importance.head_importance(model, calibration, targets, "both")

    def ablated(layer: int, heads: list[int]) -> float:
        mask = torch.ones(shape.heads * shape.head_dim)
        for head in heads:
            mask[head * shape.head_dim : (head + 1) * shape.head_dim] = 0.0
        o_proj = model.model.layers[layer].self_attn.o_proj
        handle = o_proj.register_forward_pre_hook(lambda _m, args: (args[0] * mask,))
        try:
            return mean_kl(model, calibration, targets)
        finally:
            handle.remove()

    for layer in range(shape.layers):
        for head in range(shape.heads):
            assert float(scores["heads"][layer, head]) == pytest.approx(ablated(layer, [head]), rel=1e-4, abs=1e-7)
        for group in range(shape.kv_heads):
            members = list(range(group * shape.groups, (group + 1) * shape.groups))
            assert float(scores["groups"][layer, group]) == pytest.approx(ablated(layer, members), rel=1e-4, abs=1e-7)


def test_head_scores_are_reused_for_the_same_model_calibration_and_teacher(tokenizer, prepared, monkeypatch):
    """reused_head_importance scores once per (weights, calibration, targets): the same inputs reuse the scores
    (equal to a fresh pass), a level needing a part not yet scored computes only that part, and a change to the
    weights, the calibration set or the targets scores again."""
    from pruning import importance

    model = tiny_llama(len(tokenizer), layers=2)
    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    calibration = calibration_batches(prepared, encoder, CalibrationConfig(samples=8), 0)
    targets = teacher_targets(model, calibration, 16)
    levels: list[str] = []
    fresh = importance.head_importance
    monkeypatch.setattr(importance, "head_importance", lambda m, c, t, level: levels.append(level) or fresh(m, c, t, level))

    groups = importance.reused_head_importance(model, calibration, targets, "groups")
    both = importance.reused_head_importance(model, calibration, targets, "both")
    again = importance.reused_head_importance(model, calibration, targets, "both")
    assert levels == ["groups", "heads"]  # the second call computed only the heads
    expected = fresh(model, calibration, targets, "both")
    for part in ("groups", "heads"):
        assert torch.allclose(both[part], expected[part]) and torch.equal(again[part], both[part])
    assert set(groups) == {"groups"} and torch.equal(groups["groups"], both["groups"])
    again["groups"].zero_()  # callers get copies
    assert not torch.equal(importance.reused_head_importance(model, calibration, targets, "groups")["groups"], again["groups"])

    other_calibration = calibration_batches(prepared, encoder, CalibrationConfig(samples=8, seed=1), 0)
    importance.reused_head_importance(model, other_calibration, teacher_targets(model, other_calibration, 16), "groups")
    assert levels == ["groups", "heads", "groups"]
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] += 1.0
    importance.reused_head_importance(model, calibration, targets, "groups")
    assert levels == ["groups", "heads", "groups", "groups"]


def test_two_targets_from_one_teacher_score_its_heads_and_run_the_teacher_once(tmp_path, dense, prepared, monkeypatch):
    """The retention curve's case: two plans pruned from the same dense model in one process score the
    teacher's heads once, and the second run keeps the groups a fresh scoring would."""
    from pruning import importance

    scored: list[str] = []
    fresh = importance.head_importance
    monkeypatch.setattr(importance, "head_importance", lambda m, c, t, level: scored.append(level) or fresh(m, c, t, level))
    first = run(tiny_prune_config(tmp_path / "a", dense, stages=["attn"], distill=replace(
        tiny_prune_config(tmp_path, dense).distill, max_steps=1)), prepared)
    second = run(tiny_prune_config(tmp_path / "b", dense, stages=["attn"], distill=replace(
        tiny_prune_config(tmp_path, dense).distill, max_steps=1),
        ratios=KeepRatios(kv_groups=0.5, heads_per_group=1.0, hidden=0.75, mlp=1.0, layers=1.0)), prepared)
    assert scored == ["groups"]
    # the teacher ran once too: the second run distilled on the first one's teacher outputs
    recoveries = [read_manifest(p[0])["distillation"] for p in (first, second)]
    assert recoveries[0]["teacher_examples_reused"] == 0 and recoveries[0]["teacher_examples_computed"] > 0
    assert recoveries[1]["teacher_examples_computed"] == 0 and recoveries[1]["teacher_examples_reused"] > 0
    kept = [read_manifest(p[0])["pruning"] for p in (first, second)]
    assert kept[0]["kept_kv_groups"] == kept[1]["kept_kv_groups"]
    assert kept[0]["head_importance"] == kept[1]["head_importance"]
    reuse.forget()
    third = run(tiny_prune_config(tmp_path / "c", dense, stages=["attn"], distill=replace(
        tiny_prune_config(tmp_path, dense).distill, max_steps=1)), prepared)
    assert scored == ["groups", "groups"]
    assert read_manifest(third[0])["pruning"]["head_importance"] == kept[0]["head_importance"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_stage_runs_on_cuda_and_the_artifacts_load_on_cpu(tmp_path, dense, prepared):
    paths = run(tiny_prune_config(tmp_path / "run", dense, stages=["attn", "mlp", "depth", "vocab"], device="cuda"), prepared)
    cpu = run(tiny_prune_config(tmp_path / "cpu", dense, stages=["attn", "mlp", "depth", "vocab"], device="cpu"), prepared)
    for on_gpu, on_cpu in zip(paths, cpu, strict=True):
        assert read_manifest(on_gpu)["params"] == read_manifest(on_cpu)["params"]
    from llmrec.recommender import Recommender

    recommender = Recommender.from_artifact(paths[-1], device="cpu")
    assert len(recommender.recommend([[0, 1, 2]], k=5)[0]) == 5


def test_a_killed_stage_leaves_no_staging_behind_and_resumes_from_its_cut_student(tmp_path, dense, prepared, monkeypatch):
    """A killed prune left `.N-stage.staging-*` directories that reruns kept, and a killed stage re-ran its
    importance scoring (minutes on a real model). Now the rerun removes the leftovers and reuses the cut student."""
    from pruning import importance

    config = tiny_prune_config(tmp_path / "run", dense, stages=["attn"])
    output = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the stage dies in distillation, after the cut

    monkeypatch.setattr(distill, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        run(config, prepared)
    monkeypatch.undo()
    assert (output / ".1-attn.pruned" / "prunerec.json").is_file()
    (output / ".1-attn.staging-leftover").mkdir()  # what a kill during write_artifact leaves
    scored = []
    head_importance = importance.head_importance
    monkeypatch.setattr(importance, "head_importance", lambda *a, **k: scored.append(1) or head_importance(*a, **k))
    paths = run(config, prepared)
    assert scored == []  # the cut was reused, not recomputed
    assert read_manifest(paths[0])["pruning"]["kept_kv_groups"]
    leftovers = [p.name for p in output.iterdir() if ".staging-" in p.name or p.name.endswith(".pruned")]
    assert leftovers == []


def test_the_summary_says_how_many_users_and_why_a_stage_shows_zero():
    from pruning.prune import format_summary

    params = {"total": 10, "embedding": 2, "non_embedding": 8}
    rows = [{"name": "dense", "artifact": "d", "params": params, "ndcg@10": 0.03, "hr@10": 0.08, "non_embedding_removed": 0.0,
             "users": 50},
            {"name": "1-attn", "artifact": "a", "params": params, "ndcg@10": 0.0, "hr@10": 0.0, "non_embedding_removed": 0.5}]
    text = format_summary(rows)
    assert "on 50 seeded test users" in text and "0.020" in text
    assert "1-attn: 0.0000 means no user's next item was in that model's top 10" in text
    assert "0.0000 means" not in format_summary(rows[:1])


def test_the_summary_shows_a_stage_not_evaluated_as_such_not_as_nan():
    from pruning.prune import format_summary

    params = {"total": 10, "embedding": 2, "non_embedding": 8}
    rows = [{"name": "dense", "artifact": "d", "params": params, "ndcg@10": 0.03, "hr@10": 0.08, "non_embedding_removed": 0.0},
            {"name": "1-attn", "artifact": "a", "params": params, "non_embedding_removed": 0.5}]
    text = format_summary(rows)
    assert "nan" not in text
    attn = next(line for line in text.splitlines() if line.startswith("1-attn"))
    assert attn.split()[-3:] == ["-", "-", "-"]
    assert "not evaluated: 1-attn" in text and "not evaluated: dense" not in text


def test_a_stage_inherits_the_teachers_assistant(tmp_path, dense, prepared):
    import shutil

    from llmrec.artifact import update_manifest
    from llmrec.assistant import ASSISTANT_DIR, AssistantConfig, SASRec
    from llmrec.recommender import Recommender

    teacher = shutil.copytree(dense, tmp_path / "teacher")
    SASRec(AssistantConfig(num_items=len(prepared.catalog), hidden_size=8, layers=1,
                           catalog_fingerprint=prepared.catalog.fingerprint())).save(teacher / ASSISTANT_DIR)
    update_manifest(teacher, assistant={"kind": "sasrec", "path": ASSISTANT_DIR, "weight": 2.0,
                                        "valid_ndcg@10_by_weight": {"2.0": 0.5}})
    stage = run(tiny_prune_config(tmp_path / "r", teacher, stages=["attn"]), prepared)[0]
    entry = read_manifest(stage)["assistant"]
    assert entry["weight"] == 2.0 and entry["training"] == {"inherited": str(teacher)}
    recommender = Recommender.from_artifact(stage, device="cpu")
    assert recommender.assistant is not None and recommender.assist_weight == 2.0
    plain = run(tiny_prune_config(tmp_path / "p", dense, stages=["attn"]), prepared)[0]
    assert "assistant" not in read_manifest(plain) and not (plain / ASSISTANT_DIR).exists()


def test_the_vocab_stage_carries_its_parents_assistant_and_weight(tmp_path, dense, prepared):
    """The vocab cut keeps the catalog head's scores, so the weight chosen for its parent's LLM holds: it is
    carried as it is (not re-marked as the teacher's, which would send it back to a weight sweep)."""
    import shutil

    from llmrec.artifact import update_manifest
    from llmrec.assistant import ASSISTANT_DIR, AssistantConfig, SASRec

    teacher = shutil.copytree(dense, tmp_path / "teacher")
    SASRec(AssistantConfig(num_items=len(prepared.catalog), hidden_size=8, layers=1,
                           catalog_fingerprint=prepared.catalog.fingerprint())).save(teacher / ASSISTANT_DIR)
    update_manifest(teacher, assistant={"kind": "sasrec", "path": ASSISTANT_DIR, "weight": 2.0,
                                        "valid_ndcg@10_by_weight": {"2.0": 0.5}})
    attn, vocab = run(tiny_prune_config(tmp_path / "r", teacher, stages=["attn", "vocab"]), prepared)
    entry = read_manifest(vocab)["assistant"]
    assert entry["weight"] == 2.0
    assert entry["training"] == {"inherited": str(teacher), "carried_from": str(attn)}  # still the teacher's weight
    # a parent whose weight was chosen for its own LLM passes it on unchanged
    update_manifest(attn, assistant={**read_manifest(attn)["assistant"], "weight": 5.0, "training": {"reused": str(teacher)},
                                     "valid_ndcg@10_by_weight": {"5.0": 0.7}})
    carried = run(tiny_prune_config(tmp_path / "v", attn, stages=["vocab"]), prepared)[0]
    entry = read_manifest(carried)["assistant"]
    assert entry["weight"] == 5.0 and entry["valid_ndcg@10_by_weight"] == {"5.0": 0.7}
    assert entry["training"] == {"reused": str(teacher), "carried_from": str(attn)}
    assert (carried / ASSISTANT_DIR / "model.safetensors").is_file()


def test_the_prunerec_distillation_preset_sits_between_profile_and_options(tmp_path):
    from cli.offline import prune_config
    from pruning.distill import DISTILL_PRESETS, with_preset

    config = prune_config(tmp_path / "o", tmp_path / "t", "cpu", {}, 0, "prunerec")
    assert (config.distill.alpha, config.distill.temperature, config.distill.epochs, config.distill.patience) == (0.2, 1.0, 3.0, 1)
    assert config.distill.examples is None and config.distill.max_steps is None  # epochs, not the cpu profile's steps
    assert config.distill.max_minutes == 20.0  # the profile's safety stop stays
    assert config.distill.vocab == "full"  # PruneRec's loss over the whole vocabulary, not the cpu profile's catalog
    given = prune_config(tmp_path / "o", tmp_path / "t", "cpu", {"distill.alpha": 0.7}, 0, "prunerec")
    assert given.distill.alpha == 0.7 and given.distill.temperature == 1.0  # an option given wins
    plain = prune_config(tmp_path / "o", tmp_path / "t", "cpu", {}, 0).distill  # no preset: the profile's budget
    assert (plain.alpha, plain.temperature) == (0.2, 1.0) and (plain.epochs, plain.patience, plain.examples) != (3.0, 1, None)
    assert plain.vocab == "catalog"  # the cpu profile's, from its equal-time measurement
    # the cpu profile's rate (from its sweep) under the preset's own 3e-4 when the preset is asked for; its
    # 128 steps a stage drawn from every training window
    assert plain.lr == 1e-3 and config.distill.lr == 3e-4 and plain.max_steps == 128 and plain.examples is None
    assert with_preset(None, "prunerec") == {"distill": DISTILL_PRESETS["prunerec"]}
    with pytest.raises(ValueError, match="unknown distillation preset"):
        with_preset({}, "d3")


def test_distillation_examples_say_when_they_are_capped(tokenizer, prepared, caplog):
    from llmrec.prompting import PromptEncoder
    from pruning.calibration import distillation_examples
    from pruning.examples import training_example_count
    from recdata.prompts import compact_template

    encoder = PromptEncoder(tokenizer, compact_template(), 10)
    available = training_example_count(prepared, encoder, True)
    with caplog.at_level("INFO"):
        capped = distillation_examples(prepared, encoder, 5, 0)
    assert len(capped) == 5 and f"distilling on 5 of the {available} training packed windows" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        everything = distillation_examples(prepared, encoder, available + 100, 0)
    assert len(everything) == available and "all of them are used" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        assert len(distillation_examples(prepared, encoder, None, 0)) == available
    assert f"distilling on all {available} training packed windows" in caplog.text and "caps it" not in caplog.text


def test_distillation_can_select_and_stop_on_validation_ndcg(tmp_path, dense, prepared):
    """select_metric ndcg@10: the stage's student is checked by the evaluation protocol on seeded validation
    users at every evaluation, the best by NDCG@10 is kept, and the manifest says so."""
    settings = distill.DistillConfig(examples=32, max_steps=4, eval_every=2, valid_examples=8, batch_size=8, lr=3e-3,
                                     select_metric="ndcg@10", select_users=8)
    paths = run(tiny_prune_config(tmp_path / "run", dense, stages=["attn"], distill=settings), prepared)
    record = read_manifest(paths[0])["distillation"]
    assert 0.0 <= record["best_valid_ndcg@10"] <= 1.0
    history = record["valid_history"]
    assert len(history) >= 2 and all(0.0 <= h["valid_ndcg@10"] <= 1.0 for h in history)
    assert record["best_valid_ndcg@10"] == max(h["valid_ndcg@10"] for h in history)
    with pytest.raises(ValueError, match="ranking check"):
        distill.run(settings, None, None, [], tmp_path / "ckpt")  # type: ignore[arg-type]


def test_teacher_maps_compose_over_stages_and_hidden_state_distillation_runs(tmp_path, dense, prepared):
    """Each stage records where its layers and residual channels came from in the teacher; with a hidden-state
    weight every stage distils on that map (the term changes the students), and the term is zero when the
    student's states are the teacher's kept channels."""
    base = distill.TeacherMap(layers=[0, 1, 2, 3], channels=list(range(8)))
    after_attn = base.after({"kept_residual_channels": [0, 2, 5]})
    assert after_attn.channels == [0, 2, 5] and after_attn.layers == [0, 1, 2, 3]
    after_depth = after_attn.after({"removed_layers": [1, 3]})
    assert after_depth == distill.TeacherMap(layers=[0, 2], channels=[0, 2, 5])
    teacher_states = [torch.randn(6, 8)]
    channels = torch.tensor([0, 2, 5])
    assert float(distill.hidden_state_loss([teacher_states[0][:, channels]], teacher_states, channels)) == 0.0
    assert float(distill.hidden_state_loss([torch.zeros(6, 3)], teacher_states, channels)) == pytest.approx(1.0)

    plain = run(tiny_prune_config(tmp_path / "plain", dense), prepared)
    settings = distill.DistillConfig(examples=32, max_steps=4, eval_every=2, valid_examples=8, batch_size=8, lr=3e-3,
                                     hidden_weight=1.0)
    hidden = run(tiny_prune_config(tmp_path / "hidden", dense, distill=settings), prepared)
    teacher = shape_of_artifact(dense)
    maps = [read_manifest(p)["teacher_map"] for p in hidden]
    for path, recorded in zip(hidden, maps, strict=True):
        shape = shape_of_artifact(path)
        assert len(recorded["layers"]) == shape.layers and len(recorded["channels"]) == shape.hidden
        assert set(recorded["layers"]) <= set(range(teacher.layers)) and set(recorded["channels"]) <= set(range(teacher.hidden))
    attn_record = read_manifest(hidden[0])["pruning"]
    assert maps[0]["channels"] == attn_record["kept_residual_channels"]
    assert maps[2]["channels"] == maps[0]["channels"]  # the mlp and depth stages keep the residual width
    assert read_manifest(hidden[2])["distillation"]["steps"] == 4
    a = load_file(str(plain[0] / "model.safetensors"))
    b = load_file(str(hidden[0] / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the hidden-state term changed the recovered student


def test_gradual_plans_shrink_geometrically_and_land_on_the_plan():
    plan = plan_from_ratios(SMOLLM2, DEFAULT_RATIOS)
    attn = gradual_plans(plan, "attn", 2)
    assert [(p.target.kv_heads, p.target.heads, p.target.hidden) for p in attn] == [(2, 6, 408), (1, 3, 288)]
    assert attn[0].target.intermediate == SMOLLM2.intermediate and attn[0].target.layers == SMOLLM2.layers
    assert [p.target.intermediate for p in gradual_plans(plan, "mlp", 2)] == [768, 384]
    depth = gradual_plans(plan, "depth", 3)
    assert [p.target.layers for p in depth] == [21, 14, 10]
    assert depth[-1].target == plan.target and depth[-1].removed_fraction == plan.removed_fraction
    removed = [p.removed_fraction for stage in ("attn", "mlp", "depth") for p in gradual_plans(plan, stage, 2)]
    assert removed == sorted(removed) and len(set(removed)) == 6
    assert gradual_plans(plan, "vocab", 2) == [plan] and gradual_plans(plan, "mlp", 1) == [plan]
    with pytest.raises(ValueError, match="gradual"):
        gradual_plans(plan, "attn", 0)


def test_gradual_pruning_reaches_the_same_shape_in_more_distilled_cuts(tmp_path, dense, prepared):
    """gradual=2: six artifacts, each smaller than the last, the last of the one-cut path's shape; every cut
    distilled with half of the stage's steps (equal total), the teacher map composed over all six cuts."""
    paths = run(tiny_prune_config(tmp_path / "gradual", dense, gradual=2), prepared)
    assert [p.name for p in paths] == ["1-attn", "2-attn", "3-mlp", "4-mlp", "5-depth", "6-depth"]
    sizes = [read_manifest(p)["params"]["non_embedding"] for p in paths]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 6
    ratios = KeepRatios(kv_groups=0.5, heads_per_group=1.0, hidden=0.5, mlp=0.5, layers=0.5)
    assert shape_of_artifact(paths[-1]) == plan_from_ratios(shape_of_artifact(dense), ratios, True).target
    assert [read_manifest(p)["distillation"]["steps"] for p in paths] == [2] * 6
    assert read_manifest(paths[1])["stage_config"]["distill"]["max_steps"] == 2
    final_map = read_manifest(paths[-1])["teacher_map"]
    final_shape = shape_of_artifact(paths[-1])
    assert len(final_map["layers"]) == final_shape.layers and len(final_map["channels"]) == final_shape.hidden


def test_a_gradual_stage_splits_its_distillation_budget_over_its_cuts(tmp_path):
    from pruning.prune import split_budget

    config = tiny_prune_config(tmp_path, tmp_path, distill=distill.DistillConfig(max_steps=5, max_minutes=3.0, epochs=2.0))
    assert split_budget(config, 1) is config
    halves = split_budget(config, 2).distill
    assert (halves.max_steps, halves.max_minutes, halves.epochs) == (2, 1.5, 1.0)
    unbounded = tiny_prune_config(tmp_path, tmp_path, distill=distill.DistillConfig(max_steps=None, max_minutes=None))
    assert split_budget(unbounded, 3).distill.max_steps is None and split_budget(unbounded, 3).distill.max_minutes is None
    assert split_budget(config, 9).distill.max_steps == 1  # never zero steps


def test_stage_budget_scales_each_stages_distillation(tmp_path):
    from pruning.prune import scale_budget, stage_scales

    config = tiny_prune_config(tmp_path, tmp_path, distill=distill.DistillConfig(max_steps=64, max_minutes=4.0, epochs=1.0))
    assert stage_scales(config) == {"attn": 1.0, "mlp": 1.0, "depth": 1.0}
    leaning = replace(config, stage_budget=[0.5, 0.5, 2.0])
    assert stage_scales(leaning) == {"attn": 0.5, "mlp": 0.5, "depth": 2.0}
    doubled = scale_budget(config, 2.0).distill
    assert (doubled.max_steps, doubled.max_minutes, doubled.epochs) == (128, 8.0, 2.0)
    assert scale_budget(config, 1 / 128).distill.max_steps == 1  # never zero steps
    for wrong in ([1.0, 1.0], [1.0, 0.0, 1.0]):
        with pytest.raises(ValueError, match="one positive multiplier per stage"):
            stage_scales(replace(config, stage_budget=wrong))


def test_reconstruction_lowers_the_cut_students_loss_and_keys_the_stages(tmp_path, dense, prepared):
    runs = {}
    for reconstruct in (False, True):
        config = tiny_prune_config(tmp_path / "run", dense, stages=["attn", "mlp"], reconstruct=reconstruct)
        runs[reconstruct] = [read_manifest(p) for p in run(config, prepared)]
    for plain, refit in zip(runs[False], runs[True], strict=True):
        assert "reconstruct" not in plain["stage_key"] and refit["stage_key"]["reconstruct"]["ridge"] == 1e-3
        assert plain["pruning"]["reconstructed"] is False and refit["pruning"]["reconstructed"] is True
        # the same directory was cut again, not reused: the refit student starts from a lower validation loss
        start = [m["distillation"]["valid_history"][0]["valid_loss"] for m in (plain, refit)]
        assert start[1] < start[0]


def test_sequential_reconstruction_refits_every_stage_and_keys_it(tmp_path, dense, prepared):
    config = tiny_prune_config(tmp_path / "run", dense, reconstruct_sequential=True)
    paths = run(config, prepared)
    manifests = [read_manifest(p) for p in paths]
    for path, manifest in zip(paths, manifests, strict=True):
        assert manifest["stage_key"]["reconstruct"]["sequential"] is True
        record = manifest["pruning"]["sequential_reconstruction"]
        assert [r["layer"] for r in record] == list(range(shape_of_artifact(path).layers))
        assert set(record[0]["refits"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    depth = manifests[-1]["pruning"]
    kept = [layer for layer in range(4) if layer not in depth["removed_layers"]]
    # the depth stage's record maps each child layer to the parent layer it came from, and the sequential
    # refit replaces the depth-only down_proj refit
    assert [r["parent_layer"] for r in depth["sequential_reconstruction"]] == kept and "reconstruction" not in depth
    # without it, nothing is recorded and the key is the earlier one (earlier runs resume)
    plain = tiny_prune_config(tmp_path / "plain", dense, stages=["attn"])
    manifest = read_manifest(run(plain, prepared)[0])
    assert "sequential" not in manifest["stage_key"]["reconstruct"]
    assert manifest["pruning"].get("sequential_reconstruction") is None


def test_reconstruction_moments_use_their_own_sample_set(tmp_path, dense, prepared, monkeypatch):
    from pruning import importance, reconstruct

    seen: dict[str, list[int]] = {}

    def spy(module, name):
        original = getattr(module, name)

        def wrapped(model, batches, *args, **kwargs):
            seen.setdefault(name, []).append(sum(len(b.input_ids) for b in batches))
            return original(model, batches, *args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    for name in ("head_moments", "residual_moments", "mlp_moments"):
        spy(reconstruct, name)
    spy(importance, "head_importance")
    spy(importance, "greedy_layer_removal")
    monkeypatch.setattr(reconstruct, "refit_depth", lambda parent, child, kept, batches, ridge: seen.setdefault(
        "refit_depth", []).append(sum(len(b.input_ids) for b in batches)) or [])
    config = tiny_prune_config(tmp_path / "run", dense, reconstruct_samples=40)
    manifests = [read_manifest(p) for p in run(config, prepared)]
    # the refits' moments on the 40 samples, the importance scores on the 16 of the calibration set
    assert seen["head_moments"] == seen["residual_moments"] == seen["mlp_moments"] == seen["refit_depth"] == [40]
    assert seen["head_importance"] == [16] and seen["greedy_layer_removal"] == [16]
    assert all(m["stage_key"]["reconstruct"]["samples"] == 40 for m in manifests)
    # unset, the key stays the earlier one (earlier runs resume) and the moments use the calibration set
    seen.clear()
    plain = read_manifest(run(tiny_prune_config(tmp_path / "plain", dense, stages=["attn"]), prepared)[0])
    assert "samples" not in plain["stage_key"]["reconstruct"] and seen["head_moments"] == [16]
    with pytest.raises(ValueError, match="reconstruct_samples must be positive"):
        run(tiny_prune_config(tmp_path / "zero", dense, stages=["attn"], reconstruct_samples=0), prepared)


def test_the_pipeline_gives_each_stage_its_share_of_the_budget(tmp_path, dense, prepared):
    config = tiny_prune_config(tmp_path / "run", dense, stage_budget=[0.5, 1.0, 2.0])
    manifests = [read_manifest(p) for p in run(config, prepared)]
    assert [m["distillation"]["steps"] for m in manifests] == [2, 4, 8]
    assert [m["stage_config"]["distill"]["max_steps"] for m in manifests] == [2, 4, 8]


def test_a_pipeline_with_teacher_paths_records_them_and_keys_its_stages_apart(tmp_path, dense, prepared):
    base = tiny_prune_config(tmp_path / "plain", dense, stages=["attn"])
    with_paths = replace(base, output=str(tmp_path / "paths"), num_beams=4,
                         distill=replace(base.distill, teacher_paths=2, teacher_path_prompts=3, teacher_path_batch=2))
    plain_path = run(base, prepared)[0]
    paths_path = run(with_paths, prepared)[0]
    plain, pathed = read_manifest(plain_path), read_manifest(paths_path)
    assert pathed["distillation"]["teacher_path_examples"] == 6
    assert "teacher_path_examples" not in plain["distillation"]
    assert "teacher_paths" not in plain["stage_key"]["distill"]  # runs from before the option still resume
    assert pathed["stage_key"]["distill"]["teacher_paths"] == 2
    a, b = load_file(str(plain_path / "model.safetensors")), load_file(str(paths_path / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the path examples changed the recovered student
    assert distill.result_key(base.distill) == distill.result_key(replace(base.distill, teacher_path_prompts=99))
