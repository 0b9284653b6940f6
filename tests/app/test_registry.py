"""The registry alone: loading, decoding, reload (good and bad), model threads per mode."""

from __future__ import annotations

import shutil

import pytest

from app.registry import Registry, model_version
from app.settings import Settings


def test_load_decode_and_a_failed_reload_keeps_the_old_model(arms, tmp_path):
    copy = shutil.copytree(arms["pruned"], tmp_path / "pruned")
    registry = Registry(Settings(models={"pruned": str(copy)}, warmup=False))
    try:
        arm = registry.executor("pruned").submit(registry.load, "pruned").result()
        assert arm.version.startswith("depth-") and registry.arms["pruned"] is arm
        lists = registry.decode_fn("pruned")([[0, 1], [2]], 3, [[0, 1], []])
        assert [len(r) for r in lists] == [3, 3] and not {0, 1} & {i for i, _ in lists[0]}
        before = arm.recommender
        (copy / "model.safetensors").unlink()
        with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises
            registry.reload("pruned")
        assert arm.recommender is before and arm.last_error
        assert registry.decode_fn("pruned")([[0, 1]], 3, [[0, 1]]) == lists[:1]
    finally:
        registry.shutdown()


def test_model_threads_shared_or_per_arm(arms):
    import os

    import torch

    shared = Registry(Settings(models=arms, model_threads="shared"))
    per_arm = Registry(Settings(models=arms))  # per-arm is the default
    try:
        assert shared.executor("dense") is shared.executor("pruned")
        assert per_arm.executor("dense") is not per_arm.executor("pruned")
        names = {arm: per_arm.executor(arm).submit(lambda: __import__("threading").current_thread().name).result() for arm in arms}
        assert names == {"dense": "model-dense_0", "pruned": "model-pruned_0"}
        # the cores are split between the arms' torch pools (two full pools on 2 cores decoded ~1.7x slower)
        expected = max(1, (os.cpu_count() or 1) // 2)
        assert {per_arm.executor(arm).submit(torch.get_num_threads).result() for arm in arms} == {expected}
        assert per_arm.thread_budget == expected
    finally:
        shared.shutdown()
        per_arm.shutdown()
    parallel = Registry(Settings(models={"pruned": arms["pruned"]}, parallel_batches=2))
    try:  # two model threads for the arm, sharing its threads (all of torch's, one arm)
        assert parallel.executor("pruned")._max_workers == 2
        assert parallel.thread_budget == torch.get_num_threads()
    finally:
        parallel.shutdown()


def test_model_version_names_stage_and_creation_time():
    assert model_version({"stage": "depth", "created": "2026-11-25T17:00:00+00:00"}, "/x/3-depth") == "depth-20261125T170000"
    assert model_version({}, "/x/3-depth") == "3-depth"


def test_the_service_can_rank_exactly(arms):
    from llmrec.recommender import Recommender

    registry = Registry(Settings(models={"pruned": arms["pruned"]}, warmup=False, search="exact"))
    try:
        registry.executor("pruned").submit(registry.load, "pruned").result()
        served = registry.decode_fn("pruned")([[0, 1], [2]], 3, [[0, 1], []])
    finally:
        registry.shutdown()
    expected = Recommender.from_artifact(arms["pruned"], device="cpu").recommend([[0, 1], [2]], k=3, exclude=[[0, 1], []],
                                                                                search="exact")
    assert [[i for i, _ in r] for r in served] == [[i for i, _ in r] for r in expected]


def test_an_arm_serves_its_assistant_unless_told_not_to(arms, tmp_path, prepared):
    import torch

    from llmrec.artifact import update_manifest
    from llmrec.assistant import ASSISTANT_DIR, AssistantConfig, SASRec

    plain = shutil.copytree(arms["pruned"], tmp_path / "plain")
    assisted = shutil.copytree(arms["pruned"], tmp_path / "assisted")
    torch.manual_seed(0)
    assistant = SASRec(AssistantConfig(num_items=len(prepared.catalog), hidden_size=16, layers=1,
                                       catalog_fingerprint=prepared.catalog.fingerprint()))
    with torch.no_grad():
        assistant.items.weight.mul_(50)
    assistant.save(assisted / ASSISTANT_DIR)
    update_manifest(assisted, assistant={"kind": "sasrec", "path": ASSISTANT_DIR, "weight": 5.0})
    lists = {}
    for assist in (None, False):
        registry = Registry(Settings(models={"a": str(assisted)}, warmup=False, assist=assist))
        try:
            arm = registry.executor("a").submit(registry.load, "a").result()
            assert arm.describe(assist)["assist_weight"] == (5.0 if assist is None else None)
            assert arm.version.endswith("+assist5") == (assist is None)  # the A/B logs tell the two apart
            lists[assist] = registry.decode_fn("a")([[0, 1, 2]], 5, [[0, 1, 2]])
        finally:
            registry.shutdown()
    assert lists[None] != lists[False]  # the assistant reorders the pure LLM's list
    registry = Registry(Settings(models={"p": str(plain)}, warmup=False, assist=True))
    try:
        with pytest.raises(ValueError, match="carries no assistant"):
            registry.executor("p").submit(registry.load, "p").result()
    finally:
        registry.shutdown()


def test_the_decoding_step_setting_reaches_the_search_and_keeps_the_lists(arms):
    """PRUNEREC_DECODE_STEP: the lean step (what 'auto' is on a CPU), the graphs step (its workspaces, eager
    here) and the stock one serve the same lists; the warm-up builds the packed step and, for graphs, the
    workspaces of a one-user request with a short and with a full history; an unknown value is refused."""
    import pydantic

    assert Settings(models={"a": str(arms["pruned"])}).decode_step == "auto"
    lists = {}
    for step in ("lean", "graphs", "stock"):
        registry = Registry(Settings(models={"a": str(arms["pruned"])}, warmup=True, decode_step=step))
        try:
            arm = registry.executor("a").submit(registry.load, "a").result()
            # the warm-up built the packed step for 'lean' and 'graphs' and none for 'stock'
            assert (arm.recommender._lean.get(step) is not None) == (step != "stock")
            if step == "graphs":
                shapes = list(arm.recommender._lean[step]._workspaces)
                assert [shape[0] for shape in shapes] == [1, 1] and shapes[0][2] < shapes[1][2]
            lists[step] = registry.decode_fn("a")([[0, 1, 2], [3]], 5, [[0, 1, 2], [3]])
        finally:
            registry.shutdown()
    assert [[i for i, _ in r] for r in lists["lean"]] == [[i for i, _ in r] for r in lists["stock"]]
    assert [[i for i, _ in r] for r in lists["graphs"]] == [[i for i, _ in r] for r in lists["stock"]]
    with pytest.raises(pydantic.ValidationError):
        Settings(models={"a": str(arms["pruned"])}, decode_step="fast")
