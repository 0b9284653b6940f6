"""Dynamic micro-batching: concurrent requests to one arm are decoded together.

A worker per arm takes the first waiting request, then gathers more for up to ``max_wait_ms`` or until
``max_batch_size``, and decodes them in one constrained beam search on the executor it is given: the
service passes every arm the same single model thread (see :class:`app.main.State`), so the model is
never called concurrently. Every request gets exactly the list it would get alone: lists are computed
with the largest k in the batch and cut to each request's k, and the top-k of a search with a fixed number
of beams is a prefix of its top-(k + j) (the search's stopping rule only adds later, lower-scored items).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Ranked = list[tuple[int, float]]
DecodeFn = Callable[[Sequence[Sequence[int]], int, Sequence[Sequence[int]]], list[Ranked]]


@dataclass
class _Job:
    history: list[int]
    exclude: list[int]
    k: int
    future: asyncio.Future


class MicroBatcher:
    def __init__(self, decode: Callable[[], DecodeFn], executor: ThreadPoolExecutor, max_batch_size: int,
                 max_wait_ms: float, on_batch: Callable[[int], None] | None = None) -> None:
        """``decode`` returns the current decode function (so a reloaded model is picked up per batch);
        ``executor`` runs it (its owner shuts it down)."""
        self._decode = decode
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = executor

    def start(self) -> None:
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def submit(self, history: list[int], k: int, exclude: list[int]) -> Ranked:
        self.start()
        assert self._queue is not None
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(history, exclude, k, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            if self.on_batch:
                self.on_batch(len(batch))
            k = max(job.k for job in batch)
            decode = self._decode()
            try:
                results = await loop.run_in_executor(
                    self._executor, decode, [j.history for j in batch], k, [j.exclude for j in batch]
                )
            except Exception as exc:  # handed to every waiting request
                logger.exception("decoding a batch of %d failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, ranked in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(ranked[: job.k])
