"""Service settings from the environment (``PRUNEREC_*``) or the command line (pydantic-settings)."""

from __future__ import annotations

import math
import os
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MAX_WEIGHT = 1e6
"""Largest traffic weight accepted: weights are normalised, and sums of huge floats overflow to infinity."""


def check_weights(value: dict[str, float]) -> dict[str, float]:
    """Finite, in [0, MAX_WEIGHT], not all zero when given. Raises ValueError naming the bad arm."""
    for arm, weight in value.items():
        if not math.isfinite(weight) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"traffic weight of arm {arm!r} must be a finite number in [0, {MAX_WEIGHT:g}], got {weight!r}")
    if value and sum(value.values()) <= 0:
        raise ValueError("traffic weights must not all be zero")
    return value


class Settings(BaseSettings):
    """Everything the service needs; artifact paths come from here, never from a request."""

    model_config = SettingsConfigDict(env_prefix="PRUNEREC_", env_nested_delimiter="__")

    models: dict[str, str] = Field(default_factory=dict)
    """Arm name -> artifact directory, e.g. PRUNEREC_MODELS='{"dense": "runs/dense", "pruned": "runs/pruned"}'."""
    weights: dict[str, float] = Field(default_factory=dict)
    """Traffic share per arm (normalised); default: equal shares."""
    salt: str = "prunerec"
    """Salt of the sticky assignment hash (change it to reshuffle users)."""
    shadow: str | None = None
    """An arm that answers a copy of every request off the response path (logged, never returned)."""
    admin_token: str | None = None
    """Bearer token for /admin routes; admin routes are disabled without one."""
    device: str | None = None
    """cpu or cuda (default: cuda when available, in bf16; else cpu, fp32)."""
    torch_threads: int | None = Field(default=None, ge=1)
    """CPU threads of torch's intra-op pool on each model thread (default: shared mode, torch's choice, one
    per core; per-arm mode, the cores split between the arms, at least one each)."""
    model_threads: Literal["shared", "per-arm"] = "per-arm"
    """'per-arm': each arm has its own model thread, so a small arm never waits behind a big arm's batch (they
    share the cores); 'shared': every arm decodes on one model thread, batches of the arms taking turns. On 2
    cores with a dense and a pruned arm loaded by 8 clients each, the pruned arm's p50 was 968 ms per-arm vs
    7,825 ms shared (bench/serve_arms.py; the README's "Arms side by side")."""
    parallel_batches: int = Field(default=1, ge=1)
    """Batches of one arm that may decode at once (per-arm model threads, CPU): the waiting requests are split
    evenly over the free slots, each batch on its own model thread with its part of the arm's torch threads; a
    batch that finds every slot free gets all of them. Small models gain (app.batching); on CUDA it must stay 1
    (one stream; the graphs step's buffers are per shape, not per thread)."""
    num_beams: int = Field(default=20, ge=1)
    """Beams per request (the list a request gets is the top-k of this search)."""
    head: Literal["full", "catalog", "catalog-fullnorm", "trie"] = "catalog"
    """Next-token normalisation while decoding: 'full' (exact), 'catalog' (LM head over catalog tokens only),
    'catalog-fullnorm' (a check of 'full') or 'trie' (over each title prefix's continuations: log P(item) over the
    catalog; a title with one way left costs no model call)."""
    search: Literal["beam", "exact"] = "beam"
    """How a list is made: 'beam' (constrained beam search with num_beams) or 'exact' (every catalog title
    scored exactly, one user at a time: minutes per request on a CPU; for a GPU)."""
    decode_step: Literal["auto", "lean", "compiled", "graphs", "stock"] = "auto"
    """How beam search runs a decoding step: 'auto' ('graphs' on a CUDA device, else 'lean'), 'lean' (packed
    weights, a preallocated beam cache, fewer and larger operations; llmrec.fast_step), 'compiled' (the lean
    step through torch.compile, compiled during the warm-up at start), 'graphs' (the lean step recorded once
    per shape as a CUDA graph and replayed; for a GPU) or 'stock' (the model's own forward). Same lists and
    scores to float tolerance."""
    assist: bool | None = None
    """D3's assisted decoding (`prunerec assist`): None mixes in an arm's assistant when its artifact carries
    one, False serves the pure LLM, True refuses to load an arm without one."""
    max_k: int = Field(default=50, ge=1)
    """Largest k a request may ask for."""
    max_history: int = Field(default=200, ge=1)
    """Longest history a request may send (the prompt uses the artifact's last N items)."""
    max_batch_size: int = Field(default=16, ge=1)
    """Requests decoded together per arm."""
    max_wait_ms: float = Field(default=5.0, ge=0)
    """How long a batch waits for more requests after the first arrives."""
    solo_after: int = Field(default=4, ge=0)
    """After this many single-request batches in a row, a request that finds its arm idle and alone starts at
    once instead of waiting ``max_wait_ms`` for companions (traffic without concurrency pays no wait; the
    first burst after it is split once, then batches form again). 0: always wait."""
    max_queue: int = Field(default=64, ge=1)
    """Requests waiting per arm (not counting the batch being decoded); one more gets 503 with Retry-After."""
    request_timeout_ms: float = Field(default=30_000, gt=0)
    """Default deadline of a request: not answered by then, it gets 503 and is never decoded later."""
    max_deadline_ms: float = Field(default=120_000, gt=0)
    """Longest deadline a request may ask for (``deadline_ms``)."""
    max_body_bytes: int = Field(default=65536, ge=1024)
    """Largest request body; a bigger one gets 413 before it is read whole (declared or chunked)."""
    warmup: bool = True
    """Run one request per arm before reporting ready."""

    @field_validator("weights")
    @classmethod
    def _valid_weights(cls, value: dict[str, float]) -> dict[str, float]:
        return check_weights(value)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        unknown = (set(self.weights) | ({self.shadow} if self.shadow else set())) - set(self.models)
        if unknown:
            raise ValueError(f"weights/shadow name arms without a model: {sorted(unknown)}")
        if self.parallel_batches > 1 and self.model_threads == "shared":
            raise ValueError("parallel_batches > 1 needs model_threads 'per-arm' (a shared model thread is one batch at a time)")
        if self.request_timeout_ms > self.max_deadline_ms:
            raise ValueError("request_timeout_ms must not exceed max_deadline_ms")
        if self.models:
            self.effective_weights()
        return self

    def threads_per_model_thread(self) -> int | None:
        """torch intra-op threads for each model thread (None: leave torch's default)."""
        if self.torch_threads or self.model_threads == "shared" or len(self.models) < 2:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // len(self.models))

    def effective_weights(self) -> dict[str, float]:
        """Normalised weights of the arms that take traffic (every arm but the shadow)."""
        arms = [a for a in self.models if a != self.shadow] or list(self.models)
        weights = {a: self.weights.get(a, 1.0 if not self.weights else 0.0) for a in arms}
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"the traffic weights give no share to any serving arm ({sorted(arms)})")
        return {a: w / total for a, w in weights.items()}
