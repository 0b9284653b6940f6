"""The arms the service serves: one loaded recommender each, reloadable without downtime."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.batching import MicroBatcher, Ranked
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
    batcher: MicroBatcher | None = None

    def describe(self) -> dict[str, Any]:
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
            "last_reload_error": self.last_error,
        }


class Registry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.arms: dict[str, Arm] = {}
        self._lock = threading.Lock()

    def _load(self, name: str, path: str) -> Arm:
        recommender = Recommender.from_artifact(path, device=self.settings.device)
        return Arm(name, path, recommender, model_version(recommender.manifest, path))

    def load_all(self) -> None:
        """Load every arm; called on the model thread, whose torch thread count is set here."""
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        for name, path in self.settings.models.items():
            logger.info("loading arm %s from %s", name, path)
            self.arms[name] = self._load(name, path)

    def warm_up(self) -> None:
        for arm in self.arms.values():
            self.decode_fn(arm.name)([[0]], 1, [[]])

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

    def decode_fn(self, name: str):
        arm = self.arms[name]
        num_beams, head = self.settings.num_beams, self.settings.head
        recommender = arm.recommender  # bound now: a reload swaps it for the next batch only

        def decode(histories: Sequence[Sequence[int]], k: int, excludes: Sequence[Sequence[int]]) -> list[Ranked]:
            return recommender.recommend(histories, k=k, num_beams=max(num_beams, k), exclude=excludes,
                                         batch_size=len(histories), head=head)

        return decode
