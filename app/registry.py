"""The arms the service serves: one loaded recommender each, reloadable without downtime, and the model
threads that every model operation (loading, warm-up, reloads, decoding) runs on.

Threads: with ``model_threads="per-arm"`` (the default) each arm has its own thread, so that a small arm
never waits behind a big arm's batch, and the cores are split between the arms' torch pools (two pools of
every core each made decoding about 1.7x slower on 2 cores); with ``"shared"`` every arm uses one thread and
their batches take turns. ``parallel_batches`` gives each per-arm executor that many threads, so that many
batches of the arm decode at once (:class:`app.batching.MicroBatcher` shares the arm's torch threads between
them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.batching import DecodeFn, Ranked
from app.settings import Settings
from llmrec.recommender import Recommender

logger = logging.getLogger(__name__)


def model_version(manifest: dict[str, Any], path: str) -> str:
    """A short, human-readable version: stage and creation time of the artifact."""
    created = str(manifest.get("created", "")).replace("-", "").replace(":", "").replace("+0000", "")
    return f"{manifest.get('stage', Path(path).name)}-{created[:15]}" if created else Path(path).name


@dataclass
class Arm:
    name: str
    path: str
    recommender: Recommender
    version: str
    loaded_at: float = field(default_factory=time.time)
    last_error: str | None = None

    def describe(self, assist: bool | None = None) -> dict[str, Any]:
        manifest = self.recommender.manifest
        return {
            "arm": self.name,
            "version": self.version,
            "artifact": self.path,
            "stage": manifest.get("stage"),
            "params": manifest.get("params"),
            "metrics": manifest.get("metrics", {}),
            "catalog_items": len(self.recommender.catalog),
            "device": str(self.recommender.device),
            "assist_weight": self.recommender.assist_weight if self.recommender.uses_assistant(assist) else None,
            "last_reload_error": self.last_error,
        }


class Registry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.arms: dict[str, Arm] = {}
        self._lock = threading.Lock()
        names = list(settings.models) if settings.model_threads == "per-arm" else ["shared"]
        workers = settings.parallel_batches if settings.model_threads == "per-arm" else 1
        self._executors = {name: ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"model-{name}")
                           for name in names}
        threads = settings.threads_per_model_thread()
        self.thread_budget = threads or torch.get_num_threads()
        """torch threads of an arm (shared by its parallel batches)."""
        if threads:
            for executor in self._executors.values():
                executor.submit(torch.set_num_threads, threads).result()

    def executor(self, arm: str) -> ThreadPoolExecutor:
        """The model thread of an arm."""
        return self._executors.get(arm) or self._executors["shared"]

    def shutdown(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)

    # transformers' loading is not thread-safe (its no-init-weights switches are process-wide): two arms loaded
    # at once on two model threads came out with an untied, randomly initialised lm_head. One load at a time.
    _loading = threading.Lock()

    def _load(self, name: str, path: str) -> Arm:
        with self._loading:
            recommender = Recommender.from_artifact(path, device=self.settings.device)
        if self.settings.assist and recommender.assistant is None:
            raise ValueError(f"arm {name}: assist is required and {path} carries no assistant (prunerec assist)")
        version = model_version(recommender.manifest, path)
        if recommender.uses_assistant(self.settings.assist):  # with its assistant it ranks differently: another version
            version += f"+assist{recommender.assist_weight:g}"
        return Arm(name, path, recommender, version)

    def load(self, name: str) -> Arm:
        """Load one arm from its settings path (call on the arm's model thread) and warm it up if asked."""
        path = self.settings.models[name]
        logger.info("loading arm %s from %s", name, path)
        arm = self._load(name, path)
        if self.settings.parallel_batches > 1 and arm.recommender.device.type == "cuda":
            raise ValueError("parallel_batches > 1 is for CPU serving; on CUDA keep 1 (batches share one stream)")
        if self.settings.warmup:
            decode = self._decoder(arm.recommender)
            decode([[0]], 1, [[]])
            # a full history too: the 'graphs' step records a graph per shape (prompt length in buckets), and
            # a one-request batch of a full history is the shape the first users at concurrency 1 bring
            full = list(range(min(arm.recommender.max_history, len(arm.recommender.catalog))))
            decode([full], 1, [[]])
            if self.settings.decode_step == "compiled":
                # torch.compile specialises sizes 0 and 1: a second batch of two users with prompts of other
                # lengths makes it compile the graph for symbolic shapes now, not on a user's request
                decode([[0, 1], [2]], 2, [[], []])
        with self._lock:
            self.arms[name] = arm
        return arm

    def reload(self, name: str) -> Arm:
        """Load the arm's artifact again; on failure the old model keeps serving and the error is kept."""
        arm = self.arms[name]
        try:
            fresh = self._load(name, arm.path)
        except Exception as exc:
            arm.last_error = f"{type(exc).__name__}: {exc}"
            logger.error("reloading arm %s failed, keeping %s: %s", name, arm.version, arm.last_error)
            raise
        with self._lock:
            arm.recommender, arm.version, arm.loaded_at, arm.last_error = (
                fresh.recommender, fresh.version, fresh.loaded_at, None,
            )
        return arm

    def _decoder(self, recommender: Recommender) -> DecodeFn:
        num_beams, head, search, assist = self.settings.num_beams, self.settings.head, self.settings.search, self.settings.assist
        step = self.settings.decode_step

        def decode(histories: Sequence[Sequence[int]], k: int, excludes: Sequence[Sequence[int]]) -> list[Ranked]:
            return recommender.recommend(histories, k=k, num_beams=max(num_beams, k), exclude=excludes,
                                         batch_size=len(histories), head=head, search=search, assist=assist,
                                         step=step)

        return decode

    def decode_fn(self, name: str) -> DecodeFn:
        """The decode function of an arm's current model (a reload swaps it for the next batch only)."""
        return self._decoder(self.arms[name].recommender)
