"""The micro-batcher alone (a fake decoder on a real thread): batching, cutting to k, admission control."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batching import DEADLINE, QUEUE_FULL, MicroBatcher, Overloaded


class FakeDecoder:
    """Ranks items 100.. by a score that depends on the history only; records every batch."""

    def __init__(self, seconds: float = 0.0, fail: bool = False) -> None:
        self.seconds, self.fail = seconds, fail
        self.batches: list[list[list[int]]] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, histories, k, excludes):
        self.release.wait(10)
        self.threads.add(threading.current_thread().name)
        self.batches.append([list(h) for h in histories])
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("boom")
        return [[(100 + i, -float(i + sum(h))) for i in range(k) if 100 + i not in ex] for h, ex in zip(histories, excludes, strict=True)]


@pytest.fixture()
def executor():
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-test")
    yield pool
    pool.shutdown(wait=True)


def run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_are_batched_and_cut_to_their_k(executor):
    decoder = FakeDecoder()

    async def scenario():
        batcher = MicroBatcher(lambda: decoder, executor, max_batch_size=8, max_wait_ms=50)
        loop = asyncio.get_running_loop()
        jobs = [batcher.submit([i], 1 + i % 3, [], loop.time() + 10) for i in range(6)]
        results = await asyncio.gather(*(j.future for j in jobs))
        await batcher.stop()
        return results, batcher

    results, batcher = run(scenario())
    assert len(decoder.batches) == 1 and len(decoder.batches[0]) == 6  # one batch of all six
    assert [len(r) for r in results] == [1 + i % 3 for i in range(6)]
    alone = FakeDecoder()([[2]], 3, [[]])[0]
    assert results[2] == alone[:3]
    assert batcher.stats.decoded == 6 and batcher.stats.batches == 1
    assert decoder.threads == {"model-test_0"}


def test_a_full_queue_refuses_at_once_with_retry_after(executor):
    decoder = FakeDecoder(seconds=0.05)
    decoder.release.clear()  # hold the first batch on the model thread

    async def scenario():
        batcher = MicroBatcher(lambda: decoder, executor, max_batch_size=1, max_wait_ms=0, max_queue=2)
        loop = asyncio.get_running_loop()
        first = batcher.submit([0], 1, [], loop.time() + 30)
        await asyncio.sleep(0.05)  # the worker takes it: the queue is empty again
        queued = [batcher.submit([i], 1, [], loop.time() + 30) for i in (1, 2)]
        started = time.perf_counter()
        with pytest.raises(Overloaded) as refused:
            batcher.submit([3], 1, [], loop.time() + 30)
        refused_in = time.perf_counter() - started
        decoder.release.set()
        await asyncio.gather(first.future, *(j.future for j in queued))
        await batcher.stop()
        return refused.value, refused_in

    refused, refused_in = run(scenario())
    assert refused.reason == QUEUE_FULL and refused.retry_after >= 1 and refused_in < 0.5


def test_requests_past_their_deadline_or_abandoned_are_never_decoded(executor):
    decoder = FakeDecoder()
    decoder.release.clear()

    async def scenario():
        batcher = MicroBatcher(lambda: decoder, executor, max_batch_size=1, max_wait_ms=0, max_queue=10)
        loop = asyncio.get_running_loop()
        blocker = batcher.submit([0], 1, [], loop.time() + 30)
        await asyncio.sleep(0.05)
        late = batcher.submit([1], 1, [], loop.time() + 0.05)  # its deadline passes while the blocker runs
        left = batcher.submit([2], 1, [], loop.time() + 30)
        kept = batcher.submit([3], 1, [], loop.time() + 30)
        left.abandon("client_left")
        await asyncio.sleep(0.2)
        decoder.release.set()
        await blocker.future
        await kept.future
        with pytest.raises(Overloaded) as dropped:
            await late.future
        await batcher.stop()
        return dropped.value, batcher

    dropped, batcher = run(scenario())
    assert dropped.reason == DEADLINE
    assert [b[0] for b in decoder.batches] == [[0], [3]]  # neither the late nor the abandoned request decoded
    assert batcher.stats.dropped_before_decoding == 2


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once(executor):
    decoder = FakeDecoder(seconds=0.2)

    async def scenario():
        batcher = MicroBatcher(lambda: decoder, executor, max_batch_size=1, max_wait_ms=0)
        loop = asyncio.get_running_loop()
        await batcher.submit([0], 1, [], loop.time() + 30).future  # times one batch: ~0.2 s
        ahead = [batcher.submit([i], 1, [], loop.time() + 30) for i in range(1, 4)]
        with pytest.raises(Overloaded) as refused:
            batcher.submit([9], 1, [], loop.time() + 0.3)  # 3+ batches of 0.2 s ahead
        await asyncio.gather(*(j.future for j in ahead))
        await batcher.stop()
        return refused.value

    refused = run(scenario())
    assert refused.reason == DEADLINE and refused.retry_after > 0.3
    assert [9] not in [b[0] for b in decoder.batches]


def test_a_failing_batch_fails_each_of_its_requests_and_the_worker_goes_on(executor):
    decoder = FakeDecoder(fail=True)

    async def scenario():
        batcher = MicroBatcher(lambda: decoder, executor, max_batch_size=4, max_wait_ms=20)
        loop = asyncio.get_running_loop()
        jobs = [batcher.submit([i], 1, [], loop.time() + 10) for i in range(3)]
        outcomes = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        decoder.fail = False
        after = await batcher.submit([5], 2, [], loop.time() + 10).future
        await batcher.stop()
        return outcomes, after

    outcomes, after = run(scenario())
    assert all(isinstance(o, RuntimeError) for o in outcomes) and len(after) == 2


def test_batch_timer_predicts_from_size():
    from app.batching import BatchTimer

    timer = BatchTimer()
    assert not timer.ready and timer.predict(4) == 0.0
    timer.record(2, 1.0)
    assert timer.predict(4) == pytest.approx(2.0)  # one size seen: proportional
    for size, seconds in [(1, 0.6), (4, 1.2), (8, 2.0), (16, 3.6)]:  # 0.4 s + 0.2 s per request
        timer.record(size, seconds)
    timer.samples.popleft()
    assert timer.predict(10) == pytest.approx(2.4, rel=1e-6) and timer.predict(1) == pytest.approx(0.6, rel=1e-6)


def test_parallel_batches_split_the_waiting_requests_and_the_threads():
    """parallel=2 with 2 threads: 8 waiting requests become two batches of 4 decoding at the same time on two
    executor threads with 1 torch thread each (the decoder blocks until both are in); a lone request later gets
    both threads; the lists are those of the one-batch path."""
    started = threading.Barrier(2, timeout=5)
    applied: list[tuple[str, int]] = []
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-par")

    class Together(FakeDecoder):
        def __call__(self, histories, k, excludes):
            if len(histories) > 1:
                started.wait()  # raises BrokenBarrierError unless the two batches run at once
            return super().__call__(histories, k, excludes)

    decoder = Together()

    async def scenario():
        batcher = MicroBatcher(lambda: decoder, pool, max_batch_size=16, max_wait_ms=50, parallel=2, threads=2,
                               set_threads=lambda n: applied.append((threading.current_thread().name, n)))
        loop = asyncio.get_running_loop()
        jobs = [batcher.submit([i], 2, [], loop.time() + 10) for i in range(8)]
        results = await asyncio.gather(*(j.future for j in jobs))
        alone = await batcher.submit([42], 2, [], loop.time() + 10).future
        await batcher.stop()
        return results, alone, batcher

    try:
        results, alone, batcher = run(scenario())
    finally:
        pool.shutdown(wait=True)
    assert sorted(len(b) for b in decoder.batches) == [1, 4, 4]
    assert len(decoder.threads) == 2  # the two batches ran on the two executor threads
    assert sorted(n for _, n in applied[:2]) == [1, 1] and applied[2][1] == 2  # the lone batch: both threads
    assert results == [FakeDecoder()([[i]], 2, [[]])[0] for i in range(8)]
    assert alone == FakeDecoder()([[42]], 2, [[]])[0]
    assert batcher.stats.batches == 3 and not batcher.busy


def test_a_batch_holding_every_thread_keeps_the_next_one_waiting():
    """parallel=2, 2 threads: a lone request takes both threads, so a request arriving during it waits for it
    (no thread is free) instead of oversubscribing the cores; then it runs with both."""
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-par")
    decoder = FakeDecoder()
    decoder.release.clear()
    applied: list[int] = []

    async def scenario():
        batcher = MicroBatcher(lambda: decoder, pool, max_batch_size=16, max_wait_ms=0, parallel=2, threads=2,
                               set_threads=applied.append)
        loop = asyncio.get_running_loop()
        first = batcher.submit([1], 1, [], loop.time() + 10)
        while not batcher.busy:
            await asyncio.sleep(0.01)
        second = batcher.submit([2], 1, [], loop.time() + 10)
        await asyncio.sleep(0.1)
        waited = batcher.queued  # still queued while the first batch holds both threads
        decoder.release.set()
        await asyncio.gather(first.future, second.future)
        await batcher.stop()
        return waited

    try:
        waited = run(scenario())
    finally:
        pool.shutdown(wait=True)
    assert waited == 1 and applied == [2, 2] and [len(b) for b in decoder.batches] == [1, 1]


def test_parallel_batches_need_per_arm_model_threads():
    import pydantic

    from app.settings import Settings

    with pytest.raises(pydantic.ValidationError, match="per-arm"):
        Settings(models={"a": "x"}, parallel_batches=2, model_threads="shared")
    assert Settings(models={"a": "x"}, parallel_batches=2).parallel_batches == 2
    with pytest.raises(ValueError):
        MicroBatcher(lambda: FakeDecoder(), None, 4, 0, parallel=0)  # type: ignore[arg-type]


def test_the_wait_estimate_spreads_queued_batches_over_the_parallel_slots():
    async def estimate(parallel):
        batcher = MicroBatcher(lambda: FakeDecoder(), None, max_batch_size=2, max_wait_ms=0, parallel=parallel)  # type: ignore[arg-type]
        batcher.timer.record(1, 1.0)  # a batch takes 1 s per request
        return batcher.estimated_wait(extra=5)  # batches of 2, 2, 1

    assert run(estimate(1)) == pytest.approx(5.0)  # one after the other
    assert run(estimate(2)) == pytest.approx(3.0)  # 2 and 2 at once, then the 1 on the first free slot


async def _until(condition, seconds: float = 10.0) -> None:
    """Yield to the event loop until ``condition()`` holds (a bound, not a timing: the test fails if never)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not condition():
        assert loop.time() < end, "condition never held"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("solo_after", [0, 2])
def test_lone_requests_skip_the_gathering_wait_after_a_run_of_single_batches(executor, solo_after):
    """solo_after=2: after two single-request batches a lone request on an idle arm starts at once; a burst
    after the run is split once (its first request alone, the rest gathered into one batch) and the batch of
    several turns the wait back on. solo_after=0 always gathers. Lists are the same either way."""
    decoder = FakeDecoder()

    async def scenario():
        batcher = MicroBatcher(lambda: decoder, executor, max_batch_size=8, max_wait_ms=30, solo_after=solo_after)
        loop = asyncio.get_running_loop()
        lists = [await batcher.submit([i], 3, [], loop.time() + 10).future for i in range(4)]  # one at a time
        alone = batcher.stats.started_without_wait
        decoder.release.clear()  # hold the burst's first batch on the model thread
        first = batcher.submit([10], 3, [], loop.time() + 10)
        await _until(lambda: batcher.busy)
        after_first = batcher.stats.started_without_wait
        rest = [batcher.submit([11 + i], 3, [], loop.time() + 10) for i in range(3)]
        decoder.release.set()
        await asyncio.gather(first.future, *(job.future for job in rest))
        await batcher.submit([20], 3, [], loop.time() + 10).future  # after a batch of several: gathers again
        await batcher.stop()
        return lists, alone, after_first, batcher.stats.started_without_wait

    lists, alone, after_first, final = run(scenario())
    assert lists == [FakeDecoder()([[i]], 3, [[]])[0] for i in range(4)]
    if solo_after:
        assert alone == 2  # the third and fourth single requests
        assert after_first == 3  # the burst's first request started at once
        assert [len(batch) for batch in decoder.batches[4:6]] == [1, 3]
        assert final == 3  # the batch of three turned the wait back on
    else:
        assert alone == after_first == final == 0
    with pytest.raises(ValueError):
        MicroBatcher(lambda: decoder, executor, 4, 0, solo_after=-1)
