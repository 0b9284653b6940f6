"""Dynamic micro-batching with admission control: concurrent requests to one arm are decoded together.

A worker per arm takes the waiting requests (up to ``max_batch_size``, gathering for at most
``max_wait_ms`` after the first) and decodes them in one constrained beam search on the executor it is
given. Traffic without concurrency does not pay the gathering wait: once ``solo_after`` batches in a row were
single requests, a request that finds the arm idle and nothing else queued starts at once (the first burst
after such a run is split once: its first request alone, the rest gathered behind it; a batch of several
requests turns the wait back on). With ``parallel`` > 1, up to that many batches of the arm decode at once, each on its own executor
thread with its part of the arm's torch threads: the waiting requests are split evenly over the free slots,
and a batch that finds every slot free has all the threads (a lone request is as fast as before). In process
two half batches on one thread each beat one batch on two threads (the benchmark's pruned model, 16 users:
about 23 against 18-21 users/s, `bench.parallel_batches`); through the service on 2 cores the gain did not
stand out of the noise, so the service's default is 1.

Every request gets exactly the list it would get alone: lists are computed with the largest k in the batch
and cut to each request's k, and the top-k of a search with a fixed number of beams is a prefix of its
top-(k + j) (the search's stopping rule only adds later, lower-scored items).

Admission control (so that overload means fast 503s, not minutes of queueing):

- the queue of an arm is bounded (``max_queue`` waiting requests); one more is refused at once;
- every request has a deadline; it is refused at once when the work queued ahead of it (the batch being
  decoded, the queued batches and its own, at the time :class:`BatchTimer` predicts for their sizes) cannot
  finish by then, and dropped before decoding when, by the time its batch is formed, its deadline would
  pass before that batch could finish;
- a request whose caller gave up (client gone, or the caller's own deadline timer fired) is marked
  abandoned and is never decoded.

Refusals raise :class:`Overloaded` with a reason and a Retry-After estimate; the service counts them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

Ranked = list[tuple[int, float]]
DecodeFn = Callable[[Sequence[Sequence[int]], int, Sequence[Sequence[int]]], list[Ranked]]

QUEUE_FULL = "queue_full"
DEADLINE = "deadline"
CLIENT_LEFT = "client_left"


class Overloaded(Exception):
    """A request refused or dropped without decoding; ``retry_after`` is a hint in seconds."""

    def __init__(self, reason: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    history: list[int]
    exclude: list[int]
    k: int
    deadline: float  # event-loop time
    future: asyncio.Future
    abandoned: str | None = field(default=None)  # why the caller gave up (never decoded from then on)

    def abandon(self, reason: str) -> None:
        self.abandoned = reason
        if not self.future.done():
            self.future.cancel()


class BatchTimer:
    """Predicts the decoding time of a batch of n requests as ``a + b·n``, least squares over the recent
    batches (one size seen: time proportional to n). Big and small batches of one arm differ several-fold, so
    one moving average of batch times would over-admit behind big batches and over-refuse behind small ones."""

    def __init__(self, window: int = 32) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def record(self, size: int, seconds: float) -> None:
        self.samples.append((size, seconds))

    @property
    def ready(self) -> bool:
        return bool(self.samples)

    def predict(self, size: int) -> float:
        """Seconds to decode a batch of ``size`` (0 before any batch was timed)."""
        if not self.samples or size <= 0:
            return 0.0
        sizes = [n for n, _ in self.samples]
        times = [t for _, t in self.samples]
        mean_n, mean_t = sum(sizes) / len(sizes), sum(times) / len(times)
        spread = sum((n - mean_n) ** 2 for n in sizes)
        if spread == 0:
            return mean_t * size / mean_n
        slope = max(0.0, sum((n - mean_n) * (t - mean_t) for n, t in self.samples) / spread)
        intercept = max(0.0, mean_t - slope * mean_n)
        return intercept + slope * size


@dataclass
class BatcherStats:
    """What the worker saw; read by tests and the telemetry gauges."""

    batches: int = 0
    decoded: int = 0
    dropped_before_decoding: int = 0  # abandoned or out of time when their batch was formed
    started_without_wait: int = 0  # lone requests on an idle arm started at once (``solo_after``)
    finished_abandoned: dict[str, int] = field(default_factory=dict)  # decoded, but the caller gave up mid-batch, by reason


class MicroBatcher:
    def __init__(self, decode: Callable[[], DecodeFn], executor: Executor, max_batch_size: int, max_wait_ms: float,
                 max_queue: int = 64, on_batch: Callable[[int], None] | None = None, parallel: int = 1,
                 threads: int | None = None, set_threads: Callable[[int], None] | None = None,
                 solo_after: int = 0) -> None:
        """``decode`` returns the current decode function (so a reloaded model is picked up per batch);
        ``executor`` runs it (its owner shuts it down; it needs ``parallel`` workers). ``threads``: the arm's
        torch threads, shared by the batches that run at once (each gets its part, applied by ``set_threads``
        on the executor thread before it decodes); None leaves the threads alone. ``solo_after``: after that many
        single-request batches in a row, a lone request on an idle arm skips the ``max_wait_ms`` gathering (0:
        always gather)."""
        if parallel < 1 or (threads is not None and threads < 1):
            raise ValueError(f"parallel and threads must be positive, got {parallel} and {threads}")
        if solo_after < 0:
            raise ValueError(f"solo_after must be >= 0, got {solo_after}")
        self._decode = decode
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.parallel = parallel
        self.solo_after = solo_after
        self._singles = 0  # single-request batches in a row
        self.threads = threads
        self._set_threads = set_threads
        self.stats = BatcherStats()
        self.timer = BatchTimer()
        """Every batch's time; the per-thread-count timers below are preferred once they have samples."""
        self._timers: dict[int, BatchTimer] = {}
        # batches being decoded: id -> (torch threads, predicted end in event-loop time)
        self._running: dict[int, tuple[int | None, float]] = {}
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._pending: deque[Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    @property
    def busy(self) -> bool:
        """Whether a batch is being decoded."""
        return bool(self._running)

    def _predict(self, size: int, threads: int | None) -> float:
        timer = self._timers.get(threads) if threads is not None else None
        return (timer if timer is not None and timer.ready else self.timer).predict(size)

    def _share(self, batches: int) -> int | None:
        """Threads of each of ``batches`` batches run at once (None: threads not managed)."""
        return None if self.threads is None else max(1, self.threads // batches)

    def _threads_free(self) -> int | None:
        if self.threads is None:
            return None
        return self.threads - sum(threads or 0 for threads, _ in self._running.values())

    def _free_slots(self) -> int:
        """Batches that may start now: free executor slots, each with at least one free thread."""
        slots = self.parallel - len(self._running)
        free_threads = self._threads_free()
        return max(0, slots if free_threads is None else min(slots, free_threads))

    def _time_to_first_end(self, now: float) -> float:
        return min((max(0.0, end - now) for _, end in self._running.values()), default=0.0)

    # ---- admission ------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return sum(1 for job in self._pending if job.abandoned is None)

    def estimated_wait(self, extra: int = 1) -> float:
        """Seconds until ``extra`` more requests would be answered: the rest of the batch being decoded, then
        the queued batches and theirs, at the predicted time per batch (0 before any batch was timed)."""
        if not self.timer.ready:
            return 0.0
        now = asyncio.get_running_loop().time()
        full, rest = divmod(self.queued + extra, self.max_batch_size)
        sizes = [self.max_batch_size] * full + ([rest] if rest else [])
        # list scheduling: each queued batch starts on the slot that frees first, at the time a batch takes
        # when every slot is busy; the last batch holds the new requests
        free_at = [max(0.0, end - now) for _, end in self._running.values()]
        free_at += [0.0] * (self.parallel - len(free_at))
        heapq.heapify(free_at)
        share, finish = self._share(self.parallel), 0.0
        for size in sizes:
            finish = heapq.heappop(free_at) + self._predict(size, share)
            heapq.heappush(free_at, finish)
        return finish

    def submit(self, history: list[int], k: int, exclude: list[int], deadline: float) -> Job:
        """Queue a request (``deadline`` in event-loop time) or raise :class:`Overloaded` at once."""
        loop = asyncio.get_running_loop()
        self._start(loop)
        # Retry-After: when the same request would be admitted again, not when the whole backlog is gone
        # (clients that wait out the whole backlog leave the model idle)
        if self.queued >= self.max_queue:
            ahead = self._time_to_first_end(loop.time())
            raise Overloaded(QUEUE_FULL, f"the queue of this arm is full ({self.max_queue} requests waiting)",
                             retry_after=ahead or self.timer.predict(self.max_batch_size) or 1.0)
        wait = self.estimated_wait()
        if loop.time() + wait > deadline:
            raise Overloaded(DEADLINE, f"the work queued ahead (about {wait:.1f} s) would not finish before the deadline",
                             retry_after=loop.time() + wait - deadline)
        if len(self._pending) > 2 * self.max_queue:  # forget abandoned jobs early when callers keep leaving
            live = deque(job for job in self._pending if job.abandoned is None)
            self.stats.dropped_before_decoding += len(self._pending) - len(live)
            self._pending = live
        job = Job(history, exclude, k, deadline, loop.create_future())
        self._pending.append(job)
        assert self._arrived is not None
        self._arrived.set()
        return job

    # ---- the worker -----------------------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is None:
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(Overloaded(QUEUE_FULL, "the service is shutting down", retry_after=1.0))
        self._pending.clear()

    def _take_batch(self, now: float, size: int, threads: int | None) -> list[Job]:
        """Up to ``size`` live jobs; abandoned ones, and ones whose deadline would pass before a batch of this
        size could finish, are dropped (never decoded)."""
        batch: list[Job] = []
        while self._pending and len(batch) < size:
            job = self._pending.popleft()
            if job.abandoned is not None:
                self.stats.dropped_before_decoding += 1
            elif now + self._predict(len(batch) + 1, threads) > job.deadline:
                self.stats.dropped_before_decoding += 1
                if not job.future.done():
                    job.future.set_exception(Overloaded(DEADLINE, "the deadline would pass before decoding could finish",
                                                        retry_after=self.estimated_wait()))
            else:
                batch.append(job)
        return batch

    async def _run(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending or not self._free_slots():  # a finished batch sets _arrived too
                self._arrived.clear()
                await self._arrived.wait()
            gather_until = loop.time() + self.max_wait
            if self._alone_on_idle_arm():
                self.stats.started_without_wait += 1
                gather_until = loop.time()
            while self.queued < self.max_batch_size and loop.time() < gather_until:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), gather_until - loop.time())
                except asyncio.TimeoutError:
                    break
            # the waiting requests spread evenly over the batches that may start now, the free threads over them
            free, threads_free = self._free_slots(), self._threads_free()
            count = max(1, min(free, self.queued))
            size = max(1, min(self.max_batch_size, -(-self.queued // count)))  # 1 still clears abandoned jobs
            for index in range(count):
                threads = None if threads_free is None else threads_free // count + (index < threads_free % count)
                batch = self._take_batch(loop.time(), size, threads)
                if not batch:
                    break
                self._dispatch(batch, threads)

    def _alone_on_idle_arm(self) -> bool:
        """Whether to start the one waiting request now: nothing decoding, nothing else queued, and the last
        ``solo_after`` batches were single requests (so no companion is likely within ``max_wait_ms``)."""
        return bool(self.solo_after) and self._singles >= self.solo_after and not self._running and self.queued == 1

    def _dispatch(self, batch: list[Job], threads: int | None) -> None:
        loop = asyncio.get_running_loop()
        self._singles = self._singles + 1 if len(batch) == 1 else 0
        if self.on_batch:
            self.on_batch(len(batch))
        key = next(self._ids)
        self._running[key] = (threads, loop.time() + self._predict(len(batch), threads))
        task = loop.create_task(self._decode_batch(key, batch, threads))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _call(self, decode: DecodeFn, threads: int | None, histories: list[list[int]], k: int,
              excludes: list[list[int]]) -> list[Ranked]:
        """On the executor thread: the batch's share of the threads, then the decoding."""
        if threads is not None and self._set_threads is not None:
            self._set_threads(threads)
        return decode(histories, k, excludes)

    async def _decode_batch(self, key: int, batch: list[Job], threads: int | None) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        k = max(job.k for job in batch)
        decode = self._decode()
        started = loop.time()
        try:
            results = await loop.run_in_executor(self._executor, self._call, decode, threads,
                                                 [j.history for j in batch], k, [j.exclude for j in batch])
        except asyncio.CancelledError:  # the service is stopping
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(Overloaded(QUEUE_FULL, "the service is shutting down", retry_after=1.0))
            raise
        except Exception as exc:  # handed to every waiting request
            logger.exception("decoding a batch of %d failed", len(batch))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            del self._running[key]
            self._arrived.set()  # a slot is free: the worker may start the next batch
        seconds = loop.time() - started
        self.timer.record(len(batch), seconds)
        if threads is not None:  # batches on fewer threads take longer: timed apart
            self._timers.setdefault(threads, BatchTimer()).record(len(batch), seconds)
        self.stats.batches += 1
        self.stats.decoded += len(batch)
        for job, ranked in zip(batch, results, strict=True):
            if job.abandoned is not None:
                self.stats.finished_abandoned[job.abandoned] = self.stats.finished_abandoned.get(job.abandoned, 0) + 1
            elif not job.future.done():
                job.future.set_result(ranked[: job.k])
