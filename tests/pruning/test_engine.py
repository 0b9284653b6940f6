"""The one training engine: resume equals an uninterrupted run, pauses continue the same order, early
stopping restores the best weights, a target stops at once, accumulation counts optimiser steps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pruning.engine import Engine, Schedule, compiled_layers, decoder_layers, eager_layers

# a regression problem small enough to train in milliseconds: y = x @ w_true
GENERATOR = torch.Generator().manual_seed(0)
INPUTS = torch.randn(64, 4, generator=GENERATOR)
TARGETS = INPUTS @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
DATA = list(range(64))


def collate(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return INPUTS[indices], TARGETS[indices]


def make(schedule: Schedule, checkpoint_dir=None, **kwargs) -> tuple[nn.Linear, Engine]:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    return model, Engine(model, optimizer, schedule, checkpoint_dir=checkpoint_dir, **kwargs)


def loss_of(model: nn.Module):
    return lambda batch: nn.functional.mse_loss(model(batch[0]), batch[1])


def validation(model: nn.Module):
    return lambda: float(nn.functional.mse_loss(model(INPUTS), TARGETS).detach())


# checkpoint_minutes 0: the best weights deferred to each checkpoint; a linear decay: its horizon restored
@pytest.mark.parametrize(("checkpoint_minutes", "lr_decay"), [(None, "constant"), (0.0, "constant"), (None, "linear")])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, checkpoint_minutes, lr_decay):
    schedule = Schedule(batch_size=8, epochs=3, eval_every=5, max_grad_norm=1.0, warmup_steps=3,
                        checkpoint_minutes=checkpoint_minutes, lr_decay=lr_decay)
    straight, engine = make(schedule)
    engine.fit(DATA, collate, loss_of(straight), validation(straight))
    assert engine.state.step == 24 and engine.stop_reason == "epochs"

    # the same run, interrupted after 10 steps (mid-epoch 2), then resumed by a new engine from its checkpoint
    # (a pause, not max_steps: that would plan a shorter run, with another decay)
    first, engine = make(schedule, checkpoint_dir=tmp_path, config_key={"a": 1})
    assert engine.fit(DATA, collate, loss_of(first), validation(first), until_step=10) == "pause"
    saved = json.loads((tmp_path / "trainer_state.json").read_text())
    assert saved["state"]["step"] == 10 and saved["state"]["batches_in_epoch"] == 2
    resumed, engine = make(schedule, checkpoint_dir=tmp_path, config_key={"a": 1})
    assert engine.state.step == 10
    engine.fit(DATA, collate, loss_of(resumed), validation(resumed))
    assert engine.state.step == 24
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_checkpoints_follow_checkpoint_minutes_and_the_best_weights_go_with_them(tmp_path, monkeypatch):
    """With checkpoint_minutes, a validation is followed by a checkpoint only once that much training time has
    passed since the last one; the best weights stay in memory until then, and restore_best gives them."""
    from pruning import engine as engine_module

    clock = iter(range(0, 10**6, 20))  # every read of the clock: 20 s later
    monkeypatch.setattr(engine_module.time, "monotonic", lambda: float(next(clock)))
    model, engine = make(Schedule(batch_size=8, epochs=1, eval_every=1, checkpoint_minutes=1.0), checkpoint_dir=tmp_path,
                         config_key={"a": 1})
    saved: list[int] = []
    save = engine._save
    monkeypatch.setattr(engine, "_save", lambda: saved.append(engine.state.step) or save())
    values = iter([9.0, 8.0, 1.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])  # the best at step 2, never beaten
    snapshots = []

    def validate() -> float:
        snapshots.append(model.weight.detach().clone())
        return next(values)

    engine.fit(DATA, collate, loss_of(model), validate)
    assert saved == [3, 6]  # steps at 20 s each: 60 s of training between checkpoints, none at the start
    best = load_file(str(tmp_path / "best.safetensors"))  # written with the checkpoint at step 3
    torch.testing.assert_close(best["weight"], snapshots[2])
    engine.restore_best()
    torch.testing.assert_close(model.weight, snapshots[2])
    assert json.loads((tmp_path / "trainer_state.json").read_text())["state"]["step"] == 6


def test_the_learning_rate_warms_up_then_stays_or_decays_over_the_planned_steps():
    from pruning.engine import LearningRateFactor

    constant, linear, cosine = (LearningRateFactor(2, decay, total=12) for decay in ("constant", "linear", "cosine"))
    assert [constant(step) for step in (0, 1, 2, 11)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert [linear(step) for step in (0, 2, 7, 11, 20)] == pytest.approx([1 / 3, 1.0, 0.5, 0.1, 0.0])
    assert [cosine(step) for step in (2, 7, 12)] == pytest.approx([1.0, 0.5, 0.0])
    assert LearningRateFactor(2, "linear")(50) == 1.0  # no horizon: no decay
    with pytest.raises(ValueError, match="lr_decay"):
        LearningRateFactor(0, "step")

    # through the engine: the horizon is the schedule's planned steps (2 epochs of 8 batches)
    model, engine = make(Schedule(batch_size=8, epochs=2, lr_decay="linear"))
    rates: list[float] = []
    loss = loss_of(model)
    engine.fit(DATA, collate, lambda batch: rates.append(engine.optimizer.param_groups[0]["lr"]) or loss(batch))
    assert len(rates) == 16 and rates[0] == pytest.approx(0.05)
    assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(0.05 / 16)


def test_a_checkpoint_of_another_configuration_is_refused_or_ignored(tmp_path):
    model, engine = make(Schedule(batch_size=8, max_steps=2, eval_every=2), checkpoint_dir=tmp_path, config_key={"lr": 1})
    engine.fit(DATA, collate, loss_of(model), validation(model))
    with pytest.raises(ValueError, match="another configuration"):
        make(Schedule(batch_size=8), checkpoint_dir=tmp_path, config_key={"lr": 2})
    _, restarted = make(Schedule(batch_size=8), checkpoint_dir=tmp_path, config_key={"lr": 2}, on_mismatch="restart")
    assert restarted.state.step == 0


def test_pauses_continue_the_same_order_as_one_run():
    schedule = Schedule(batch_size=8, epochs=2)
    whole, engine = make(schedule)
    engine.fit(DATA, collate, loss_of(whole))
    paused, engine = make(schedule)
    reasons = [engine.fit(DATA, collate, loss_of(paused), until_step=engine.state.step + 3) for _ in range(6)]
    assert reasons[:5] == ["pause"] * 5 and reasons[5] == "epochs"  # 6 x 3 steps = 2 epochs of 8 batches + 2
    assert engine.state.step == 16
    for a, b in zip(whole.parameters(), paused.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_early_stopping_restores_the_best_weights():
    values = iter([5.0, 4.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    model, engine = make(Schedule(batch_size=8, epochs=10, eval_every=2, patience=2))
    snapshots = []

    def validate() -> float:
        snapshots.append(model.weight.detach().clone())
        return next(values)

    reason = engine.fit(DATA, collate, loss_of(model), validate)
    assert reason == "early stopping" and engine.state.step == 8  # evaluations at 0, 2, 4 (best), 6, 8
    assert engine.state.best == 1.0
    engine.restore_best()
    torch.testing.assert_close(model.weight, snapshots[2])
    assert [h["step"] for h in engine.state.history] == [0, 2, 4, 6, 8]


def test_a_target_met_at_the_start_trains_nothing():
    model, engine = make(Schedule(batch_size=8, epochs=1, eval_every=1))
    before = model.weight.detach().clone()
    reason = engine.fit(DATA, collate, loss_of(model), lambda: 0.0, stop_when=lambda value: value <= 0.01,
                        target_reason="good enough")
    assert reason == "good enough" and engine.state.step == 0
    assert torch.equal(model.weight, before)


def test_gradient_accumulation_counts_optimiser_steps_and_calls_after_backward():
    model, engine = make(Schedule(batch_size=8, epochs=1, grad_accum=2))
    calls = []
    engine.fit(DATA, collate, loss_of(model), after_backward=lambda: calls.append(1))
    assert len(calls) == 8 and engine.state.step == 4  # 8 micro-batches, one optimiser step per two
    assert engine.total_steps(len(DATA)) == 4


def test_an_empty_dataset_is_an_error():
    model, engine = make(Schedule())
    with pytest.raises(ValueError, match="no training data"):
        engine.fit([], collate, loss_of(model))


def test_adamw_is_the_fused_kernel_only_on_a_gpu():
    from pruning.engine import adamw

    assert not adamw(list(nn.Linear(2, 2).parameters()), lr=0.1).defaults["fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_loss_runs_in_bf16_autocast_with_the_fused_optimiser():
    from pruning.engine import adamw

    model = nn.Linear(4, 1).cuda()
    engine = Engine(model, adamw(list(model.parameters()), lr=0.01), Schedule(batch_size=8, max_steps=2), autocast=True)
    dtypes = []

    def loss(batch):
        out = model(batch[0].cuda())
        dtypes.append(out.dtype)
        return nn.functional.mse_loss(out.float(), batch[1].cuda())

    engine.fit(DATA, collate, loss)
    assert dtypes == [torch.bfloat16] * 2 and engine.optimizer.defaults["fused"]
    assert model.weight.dtype == torch.float32  # fp32 master weights
    assert engine.record()["peak_gpu_mb"] is not None  # the run's peak, for batches of runs sharing a card


def test_the_record_says_the_runs_steps_and_no_device_peak_off_a_gpu():
    model, engine = make(Schedule(batch_size=8, epochs=1, eval_every=2))
    engine.fit(DATA, collate, loss_of(model), lambda: 1.0)
    record = engine.record()
    assert record["steps"] == engine.state.step > 0 and record["stop_reason"] == "epochs"
    assert record[f"{engine.metric.split('_')[0]}_history"] == engine.state.history
    assert record["peak_gpu_mb"] is None  # CPU: no device peak


def test_compiled_layers_compute_the_same_loss_and_gradients():
    from helpers import tiny_llama

    model = tiny_llama(64, layers=2).train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    # two packed examples a row: positions restart, as the fine-tuning batches
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.cat([torch.arange(5), torch.arange(7)]).repeat(2, 1),
             "use_cache": False}

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    keys = list(model.state_dict())
    eager_loss, eager_grads = loss_and_grads()
    with compiled_layers(model) as count:
        assert count == 2 and all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
        assert list(model.state_dict()) == keys  # in place: the same module tree and state-dict keys
        loss, grads = loss_and_grads()
        with eager_layers(model):
            assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
        assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)
    with compiled_layers(model, enabled=False) as count:
        assert count == 0 and all(layer._compiled_call_impl is None for layer in decoder_layers(model))
