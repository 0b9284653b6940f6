"""The one training engine: every optimisation loop of prunerec runs through :class:`Engine`.

Fine-tuning (:mod:`pruning.train`), distillation after a pruning stage (:mod:`pruning.distill`), TRSP's gate
and identity stages (:mod:`pruning.trsp`) and PrunePEFT's search rounds (:mod:`pruning.peft_search`) differ
in their loss and their data; what they share lives here once:

- the schedule: epochs over a seeded order (one permutation per epoch), step / time budgets, warm-up,
  gradient accumulation, gradient clipping;
- validation every ``eval_every`` steps (and at step 0, so that a useless run keeps its starting weights),
  early stopping after ``patience`` evaluations without an improvement of ``min_delta``, an optional
  target ("stop once the validation value satisfies this"), best weights kept and restored;
- checkpoints (weights, optimiser, scheduler, progress) written at every evaluation, and resume from them:
  a resumed run is the same run as an uninterrupted one (same batches, same updates), and a checkpoint made
  with another configuration is refused or ignored;
- progress (a tqdm bar with the running loss) and the record that lands in the artifact's manifest;
- :func:`compiled_layers`: the decoder layers compiled in place for a loop's duration (regional compilation).

With an ``accelerate.Accelerator`` (fine-tuning, so that ``accelerate launch`` spreads it over processes)
the engine uses its ``backward`` / ``accumulate`` / ``save_state``; without one (the compression stages, run
inside one process on one device) the same loop runs on plain torch. Accelerate's process-wide state cannot
be re-created with other settings in one process, which is why the compression stages do not make one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
BEST_FILE = "best.safetensors"


@dataclass
class Schedule:
    """When a loop steps, validates, stops and saves. Built by each stage from its own config."""

    batch_size: int = 8
    """Examples per micro-batch (per process)."""
    epochs: float = 1.0
    """Passes over the data (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps."""
    max_minutes: float | None = None
    """Stop after this much training time (summed over resumed runs)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    warmup_steps: int = 0
    """Linear warm-up of the learning rate over this many steps, then the peak rate as ``lr_decay`` says."""
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    """After the warm-up: the peak rate throughout (constant), or decayed towards 0 at the last planned step
    (linear, cosine), the plan being the step and epoch budget (a stop on minutes or early stopping ends it
    sooner, with the rate not yet decayed)."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping (None or 0: none)."""
    eval_every: int | None = None
    """Optimiser steps between validations and checkpoints (None: only at the start and the end)."""
    patience: int = 0
    """Validations without improvement before early stopping (0: never)."""
    min_delta: float = 1e-4
    """The smallest decrease of the validation value that counts as an improvement."""
    seed: int = 0
    """Seed of the data order (epoch e uses seed + e)."""
    checkpoint_minutes: float | None = None
    """Least minutes of training between two checkpoints (None: one at every validation, and the best
    weights written at every improvement). A checkpoint of SmolLM2 (weights and AdamW state, 1.6 GB) takes
    3-6 s on the 2-core machine, and the best weights another 2-4 s: where validations come tens of seconds
    apart, as on a GPU, writing them at each would take a large share of the run. With a value, the best
    weights stay in memory and go to disk with the next checkpoint; a run killed between two checkpoints
    resumes from the last one, as ever (its steps since are done again, to the same result)."""
    log_every: int = 10
    """Steps between loss read-outs for the progress bar: reading a loss waits for the device, so the loop
    does it every so many steps, not every step."""

    def total_steps(self, examples: int, processes: int = 1) -> int:
        """Optimiser steps over ``examples`` data items split over ``processes`` (sys.maxsize: unbounded)."""
        per_epoch = math.ceil(examples / (self.batch_size * processes * self.grad_accum))
        total = math.ceil(per_epoch * self.epochs) if math.isfinite(self.epochs) else sys.maxsize
        return min(total, self.max_steps) if self.max_steps is not None else total


@dataclass
class EngineState:
    """Progress that a checkpoint restores."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed."""
    best: float = math.inf
    """Best validation value so far (the lowest, or the highest for a metric to maximise)."""
    bad_evals: int = 0
    elapsed: float = 0.0
    """Seconds of training so far, over every resumed run."""
    history: list[dict[str, float]] = field(default_factory=list)


class LearningRateFactor:
    """The learning rate's multiplier at each optimiser step: a linear warm-up over ``warmup`` steps, then 1
    (constant) or decayed towards 0 at ``total`` planned steps (linear, cosine). ``total`` may be set after the
    scheduler is built (the engine sets it when it knows the data); until then, and with an unbounded plan,
    there is no decay."""

    def __init__(self, warmup: int, decay: str = "constant", total: int | None = None):
        if decay not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_decay must be constant, linear or cosine, got {decay!r}")
        self.warmup, self.decay, self.total = max(warmup, 0), decay, total

    def __call__(self, step: int) -> float:
        factor = min(1.0, (step + 1) / (self.warmup + 1))
        if self.decay == "constant" or not self.total:
            return factor
        # step counts the optimiser steps taken: the last planned one (total - 1) still moves the weights
        progress = min(max(step - self.warmup, 0) / max(self.total - self.warmup, 1), 1.0)
        remaining = 1.0 - progress if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return factor * remaining


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, decay: str = "constant",
                     total_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler of :class:`LearningRateFactor` (its factor is ``scheduler.lr_lambdas[0]``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LearningRateFactor(warmup_steps, decay, total_steps))


def adamw(parameters: list[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel (one launch for every tensor) when the parameters are on a GPU."""
    fused = bool(parameters) and all(p.is_cuda for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of every tensor of the state dict (tied weights become separate copies, which
    ``save_file`` requires)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


class Engine:
    """One optimisation loop over ``module``'s parameters in ``optimizer``.

    ``module`` is what the checkpoints and the best weights hold (the model being trained, or TRSP's gates);
    the loss function closes over whatever it needs. ``fit`` may be called several times (rounds): each call
    goes on from where the last stopped, in the same data order.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        *,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        accelerator: Any = None,
        checkpoint_dir: Path | None = None,
        config_key: dict[str, Any] | None = None,
        resume: bool = True,
        on_mismatch: Literal["raise", "restart"] = "raise",
        desc: str = "train",
        metric: str = "valid_loss",
        keep_best: bool = True,
        autocast: bool = False,
        maximize: bool = False,
    ):
        self.module = module
        self.optimizer = optimizer
        self.schedule = schedule
        self.scheduler = scheduler if scheduler is not None else warmup_scheduler(optimizer, schedule.warmup_steps,
                                                                                  schedule.lr_decay)
        self.accelerator = accelerator
        self.checkpoint_dir = checkpoint_dir
        self.config_key = config_key or {}
        self.desc = desc
        self.metric = metric
        """Name of the validation value in the history records."""
        self.keep_best = keep_best
        """Keep a copy of the best validated weights (False: the loop's result is its last state)."""
        self.maximize = maximize
        """The validation value is better when higher (a ranking metric) rather than lower (a loss)."""
        self.autocast = autocast
        """Without an accelerator: run the loss in bf16 autocast on CUDA (fp32 master weights and optimiser
        state, bf16 matmuls); ignored on the CPU. With one, the accelerator's mixed precision applies."""
        self.state = EngineState(best=-math.inf if maximize else math.inf)
        self.stop_reason: str | None = None
        self._best_in_memory: dict[str, torch.Tensor] | None = None
        self._best_unsaved = False
        """The best weights in memory are newer than the checkpoint directory's."""
        self._saved_at = 0.0
        """state.elapsed at the last checkpoint."""
        self._progress: Any = None
        self._micro = 0
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        if checkpoint_dir is not None and resume and (checkpoint_dir / STATE_FILE).is_file():
            self._restore(on_mismatch)
        if (device := self._device()) is not None and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # record()'s peak is this run's (the teacher's weights included)

    # -- properties of the run ------------------------------------------------------------------------

    @property
    def processes(self) -> int:
        return int(self.accelerator.num_processes) if self.accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process) if self.accelerator is not None else True

    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.module) if self.accelerator is not None else self.module

    def total_steps(self, examples: int) -> int:
        """Optimiser steps of the schedule over ``examples`` data items."""
        return self.schedule.total_steps(examples, self.processes)

    # -- the loop ---------------------------------------------------------------------------------------

    def fit(
        self,
        data: Sequence[Any],
        collate: Callable[[list[Any]], Any],
        loss_fn: Callable[[Any], torch.Tensor],
        validate: Callable[[], float] | None = None,
        *,
        stop_when: Callable[[float], bool] | None = None,
        target_reason: str = "target reached",
        after_backward: Callable[[], None] | None = None,
        until_step: int | None = None,
    ) -> str:
        """Train until the schedule, early stopping, ``stop_when`` (on a validation value) or ``until_step``
        (a pause: call again to go on) says stop; returns the reason.

        ``loss_fn`` gets a collated batch and returns the scalar loss; ``validate`` returns a value to
        minimise (to maximise with ``maximize=True``); ``after_backward`` runs after each backward pass (PrunePEFT's gradient statistics).
        """
        if not data:
            raise ValueError(f"{self.desc}: no training data")
        total = self.total_steps(len(data))
        factor = getattr(self.scheduler, "lr_lambdas", [None])[0]
        if self.accelerator is None and isinstance(factor, LearningRateFactor) and factor.total is None:
            factor.total = total if total < sys.maxsize else None  # the decay's horizon: the planned steps
        if self._progress is None:
            self._progress = tqdm(total=total if total < sys.maxsize else None, initial=self.state.step, desc=self.desc, unit="step",
                                  disable=not self.is_main)
        if validate is not None and self.state.step == 0 and not self.state.history:
            if self._evaluate(validate, stop_when):  # the starting point, so that a useless run keeps it
                self.stop_reason = target_reason
                self.close()
                return target_reason
            if self.schedule.checkpoint_minutes is None:
                self._save()
        self.module.train()
        started = time.monotonic() - self.state.elapsed
        reason = self._stop_reason(total, until_step)
        while reason is None:
            for batch in self._epoch_batches(data, collate):
                self.state.batches_in_epoch += 1
                loss, synced = self._micro_step(batch, loss_fn, after_backward)
                if not synced:
                    continue
                self.state.step += 1
                self.state.elapsed = time.monotonic() - started
                # the loss stays on the device; it is read (a host synchronisation) every log_every steps
                detached = loss.detach()
                self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
                self._loss_count += 1
                self._progress.update(1)
                if self.state.step % max(self.schedule.log_every, 1) == 0:
                    self._show_loss()
                reason = self._stop_reason(total, until_step)
                every = self.schedule.eval_every
                finished = reason is not None and reason != "pause"
                if validate is not None and ((every and self.state.step % every == 0) or finished):
                    stop = self._evaluate(validate, stop_when)
                    if reason is None or reason == "pause":
                        if stop_when is not None and stop == "target":
                            reason = target_reason
                        elif stop == "patience":
                            reason = "early stopping"
                    if self._checkpoint_due(reason):
                        self._save()
                if reason is not None:
                    break
            else:  # the epoch ended without a stop
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
                reason = self._stop_reason(total, until_step)
        if reason != "pause":
            self.stop_reason = reason
            self.close()
            logger.info("%s stopped (%s) at step %d after %.1f min", self.desc, reason, self.state.step,
                        self.state.elapsed / 60)
        return reason

    def _checkpoint_due(self, reason: str | None) -> bool:
        """Whether the validation just done is followed by a checkpoint (see ``Schedule.checkpoint_minutes``)."""
        every = self.schedule.checkpoint_minutes
        if every is None or reason == "pause":
            return True
        return self.state.elapsed - self._saved_at >= every * 60

    def _show_loss(self) -> None:
        if self._loss_sum is not None and self._progress is not None:
            self._progress.set_postfix(loss=f"{float(self._loss_sum) / self._loss_count:.3f}")
        self._loss_sum, self._loss_count = None, 0

    def close(self) -> None:
        if self._progress is not None:
            self._show_loss()
            self._progress.close()
            self._progress = None

    def _epoch_batches(self, data: Sequence[Any], collate: Callable[[list[Any]], Any]) -> Iterator[Any]:
        """The current epoch's batches in its seeded order, past those already consumed."""
        generator = torch.Generator().manual_seed(self.schedule.seed + self.state.epoch)
        # pinned batches, so that the accelerator's copies to a GPU do not wait for its queued work
        pin = self.accelerator is not None and self.accelerator.device.type == "cuda"
        loader: Any = DataLoader(data, batch_size=self.schedule.batch_size, shuffle=True,  # type: ignore[arg-type]
                                 generator=generator, collate_fn=collate, pin_memory=pin)
        if self.accelerator is not None:
            loader = self.accelerator.prepare(loader)
        if self.state.batches_in_epoch:
            from accelerate import skip_first_batches

            loader = skip_first_batches(loader, self.state.batches_in_epoch)
        return iter(loader)

    def _micro_step(self, batch: Any, loss_fn: Callable[[Any], torch.Tensor],
                    after_backward: Callable[[], None] | None) -> tuple[torch.Tensor, bool]:
        """Forward and backward of one micro-batch; the optimiser steps when the accumulation is complete.
        Returns the loss and whether an optimiser step happened."""
        clip = self.schedule.max_grad_norm
        if self.accelerator is not None:
            with self.accelerator.accumulate(self.module):
                loss = loss_fn(batch)
                self.accelerator.backward(loss)
                if after_backward is not None:
                    after_backward()
                if self.accelerator.sync_gradients and clip:
                    self.accelerator.clip_grad_norm_(self.module.parameters(), clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            return loss, bool(self.accelerator.sync_gradients)
        self._micro += 1
        accumulate = max(self.schedule.grad_accum, 1)
        with self.mixed_precision():
            loss = loss_fn(batch)
        (loss / accumulate).backward()
        if after_backward is not None:
            after_backward()
        if self._micro % accumulate:
            return loss, False
        if clip:
            parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return loss, True

    def _device(self) -> torch.device | None:
        """Where the optimised parameters live."""
        return next((p.device for group in self.optimizer.param_groups for p in group["params"]), None)

    def mixed_precision(self) -> Any:
        """The autocast context of the loss (bf16 on CUDA when asked for), usable around validation too."""
        device = self._device()
        if self.autocast and device is not None and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _stop_reason(self, total: int, until_step: int | None) -> str | None:
        if self.schedule.max_steps is not None and self.state.step >= self.schedule.max_steps:
            return "max steps"
        if self.state.step >= total:
            return "epochs"
        if self.schedule.max_minutes is not None and self.state.elapsed >= self.schedule.max_minutes * 60:
            return "time budget"
        if until_step is not None and self.state.step >= until_step:
            return "pause"
        return None

    # -- validation and the best weights ----------------------------------------------------------------

    def _evaluate(self, validate: Callable[[], float], stop_when: Callable[[float], bool] | None) -> str | None:
        """Validate, keep the best weights; 'target' or 'patience' when the loop should stop, else None."""
        value = float(validate())
        self.module.train()
        self.state.history.append({"step": self.state.step, self.metric: value})
        delta = self.schedule.min_delta
        improved = value > self.state.best + delta if self.maximize else value < self.state.best - delta
        if improved:
            self.state.best, self.state.bad_evals = value, 0
            if self.keep_best:
                self._keep_best()
        else:
            self.state.bad_evals += 1
        logger.info("%s step %d: %s %.4f (best %.4f)", self.desc, self.state.step, self.metric, value, self.state.best)
        if stop_when is not None and stop_when(value):
            return "target"
        if self.schedule.patience > 0 and self.state.bad_evals >= self.schedule.patience:
            return "patience"
        return None

    def _keep_best(self) -> None:
        weights = cpu_state(self.unwrapped())
        if self.checkpoint_dir is None or self.schedule.checkpoint_minutes is not None:
            self._best_in_memory, self._best_unsaved = weights, True  # to disk with the next checkpoint
        elif self.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            save_file(weights, str(self.checkpoint_dir / BEST_FILE))

    def best_weights(self) -> dict[str, torch.Tensor] | None:
        """The best validated weights: this run's (in memory), else the checkpoint directory's."""
        if self._best_in_memory is not None:
            return self._best_in_memory
        if self.checkpoint_dir is not None and (self.checkpoint_dir / BEST_FILE).is_file():
            return load_file(str(self.checkpoint_dir / BEST_FILE))
        return None

    def restore_best(self, module: nn.Module | None = None) -> None:
        """Load the best validated weights into ``module`` (default: the unwrapped trained module)."""
        weights = self.best_weights()
        if weights is not None:
            (module if module is not None else self.unwrapped()).load_state_dict(weights)

    # -- checkpoints -----------------------------------------------------------------------------------

    def _save(self) -> None:
        if self.checkpoint_dir is None:
            return
        self._saved_at = self.state.elapsed
        if self._best_unsaved and self._best_in_memory is not None and self.is_main:
            # before the state file: a checkpoint's state never points at best weights not yet written
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            save_file(self._best_in_memory, str(self.checkpoint_dir / BEST_FILE))
        self._best_unsaved = False
        directory = self.checkpoint_dir / "state"
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(directory))
        else:
            directory.mkdir(parents=True, exist_ok=True)
            save_file(cpu_state(self.module), str(directory / "model.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       directory / "optimizer.pt")
        if self.is_main:
            payload = {"config": self.config_key, "state": asdict(self.state)}
            tmp = self.checkpoint_dir / f"{STATE_FILE}.tmp"
            tmp.write_text(json.dumps(payload, indent=2))
            tmp.replace(self.checkpoint_dir / STATE_FILE)

    def _restore(self, on_mismatch: str) -> None:
        assert self.checkpoint_dir is not None
        saved = json.loads((self.checkpoint_dir / STATE_FILE).read_text())
        if saved.get("config") != self.config_key:
            if on_mismatch == "raise":
                raise ValueError(f"checkpoint {self.checkpoint_dir} was made with another configuration; pass "
                                 "--no-resume or another --checkpoint-dir")
            logger.warning("%s: ignoring the checkpoint in %s (another configuration)", self.desc, self.checkpoint_dir)
            return
        directory = self.checkpoint_dir / "state"
        if self.accelerator is not None:
            self.accelerator.load_state(str(directory))
        else:
            self.module.load_state_dict(load_file(str(directory / "model.safetensors")))
            states = torch.load(directory / "optimizer.pt", weights_only=True)
            self.optimizer.load_state_dict(states["optimizer"])
            self.scheduler.load_state_dict(states["scheduler"])
        self.state = EngineState(**saved["state"])
        self._saved_at = self.state.elapsed
        logger.info("%s resumed from %s at step %d", self.desc, self.checkpoint_dir, self.state.step)

    def record(self) -> dict[str, Any]:
        """What the manifests record of a finished run; ``peak_gpu_mb``: the most device memory this process held
        since the engine was made (None off CUDA), what sizes a batch for runs sharing a card."""
        device = self._device()
        peak = round(torch.cuda.max_memory_allocated(device) / 2**20) if device is not None and device.type == "cuda" else None
        return {"steps": self.state.step, "stop_reason": self.stop_reason, "minutes": round(self.state.elapsed / 60, 2),
                f"best_{self.metric}": self.state.best, f"{self.metric.split('_')[0]}_history": self.state.history,
                "peak_gpu_mb": peak}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder layers of a causal LM (under a peft wrapper too); empty when it has none."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return list(getattr(decoder, "layers", None) or [])


@contextlib.contextmanager
def compiled_layers(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block every decoder layer of ``model`` runs compiled (``torch.compile``, inductor); after it,
    eagerly again. Yields the number of layers compiled (0 when not ``enabled``).

    Why: a training step of a small model on a GPU waits for the host, which launches each layer's dozens
    of small operations one by one (a step of SmolLM2's 30 layers with 4k tokens took ~240 ms on an H100
    against ~10-20 ms of arithmetic); compiling fuses a layer's element-wise work into a few kernels. One
    layer's graph serves them all (regional compilation: the layers share code and shapes, so the compile
    costs seconds, not the minutes of the whole model), and compiling in place (``nn.Module.compile``) keeps
    the module tree, its parameters and its state-dict keys: checkpoints, best weights and artifacts are
    unchanged. A second row length recompiles once with symbolic shapes (torch's automatic dynamic shapes);
    later lengths reuse it (``dynamic=True`` from the start compiled slower here and still recompiled).
    Measured on the 2-core CPU (a 30-layer Llama of width 64, 2 packed rows of 64 tokens, where a step is all
    host overhead): 148-192 ms eager, 125-134 ms with the layers compiled after ~12 s of compiling, 86 ms with
    the whole model compiled after ~6 minutes."""
    layers = decoder_layers(model) if enabled else []
    for layer in layers:
        layer.compile()
    try:
        yield len(layers)
    finally:
        for layer in layers:  # nn.Module.compile has no inverse; this is what it sets (and what pickling drops)
            layer._compiled_call_impl = None


@contextlib.contextmanager
def eager_layers(model: nn.Module) -> Iterator[None]:
    """Inside the block the layers of ``model`` compiled by :func:`compiled_layers` run eagerly: validation
    and decoding, whose cached and no-grad calls would each need graphs of their own."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if m._compiled_call_impl is not None]
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in compiled:
            module._compiled_call_impl = call


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No gradients for ``module``'s parameters inside the block (their flags are restored after)."""
    flags = {p: p.requires_grad for p in module.parameters()}
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
