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
