"""The service's state and the dependencies routes take from it (FastAPI full-stack template's ``deps``)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Annotated

import torch
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.ab import Experiment
from app.batching import MicroBatcher
from app.middleware import ApiError
from app.registry import Registry
from app.settings import Settings
from app.telemetry import Telemetry

logger = logging.getLogger(__name__)


class State:
    """Everything one running service holds: settings, arms, batchers, counters, readiness."""

    def __init__(self, settings: Settings, on_load_failure: Callable[[BaseException], None] | None = None) -> None:
        self.settings = settings
        self.registry = Registry(settings)
        self.telemetry = Telemetry()
        self.experiment = Experiment()
        self.weights = settings.effective_weights() if settings.models else {}
        self.batchers: dict[str, MicroBatcher] = {}
        self.ready = False
        self.load_error: str | None = None
        self.on_load_failure = on_load_failure
        self.background: set[asyncio.Task] = set()  # loading and shadow tasks, kept referenced until done
        self.telemetry.watch(self.batchers)

    def batcher(self, arm: str) -> MicroBatcher:
        if arm not in self.batchers:
            version = lambda: self.registry.arms[arm].version  # noqa: E731
            self.batchers[arm] = MicroBatcher(
                lambda: self.registry.decode_fn(arm),
                self.registry.executor(arm),
                self.settings.max_batch_size,
                self.settings.max_wait_ms,
                self.settings.max_queue,
                on_batch=lambda n: self.telemetry.batch_size.labels(arm, version()).observe(n),
                parallel=self.settings.parallel_batches,
                # with one batch at a time the model thread keeps the threads set at start
                threads=self.registry.thread_budget if self.settings.parallel_batches > 1 else None,
                set_threads=torch.set_num_threads,
                solo_after=self.settings.solo_after,
            )
        return self.batchers[arm]

    def spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def load(self) -> None:
        """Load (and warm up) every arm on its model thread; ready when all are in. Runs after start-up, so
        the port answers (``/readyz`` 503) while the models load."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*(loop.run_in_executor(self.registry.executor(name), self.registry.load, name)
                                   for name in self.settings.models))
        except asyncio.CancelledError:  # the service stopped while loading
            raise
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("loading the arms failed: %s", self.load_error)
            if self.on_load_failure is not None:
                self.on_load_failure(exc)
            return
        self.ready = True
        logger.info("ready: arms %s, weights %s, shadow %s", list(self.registry.arms), self.weights, self.settings.shadow)

    async def close(self) -> None:
        for task in list(self.background):
            task.cancel()
        for batcher in self.batchers.values():
            await batcher.stop()
        self.registry.shutdown()


def get_state(request: Request) -> State:
    return request.app.state.prunerec


StateDep = Annotated[State, Depends(get_state)]

bearer = HTTPBearer(auto_error=False, description="The admin token (PRUNEREC_ADMIN_TOKEN / --admin-token).")


def require_admin(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None,
) -> None:
    token = state.settings.admin_token
    if not token:
        raise ApiError(403, "admin routes are disabled: no admin token is configured")
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise ApiError(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def require_ready(state: StateDep) -> None:
    if not state.ready:
        detail = f"the models failed to load: {state.load_error}" if state.load_error else "the service is still loading its models"
        raise ApiError(503, detail, headers={"Retry-After": "5"})
