"""The serving measurement: which requests each concurrency level sends."""

from __future__ import annotations

import contextlib

import bench.harness as harness


def test_levels_above_one_send_the_throughput_payloads(monkeypatch):
    sent: dict[int, int] = {}

    @contextlib.contextmanager
    def fake_service(arms, *options, env=None, ready_timeout=600):
        class Server:
            pid = 0
        yield "http://test", Server()

    calls: list[tuple[int, int]] = []

    def fake_time(base, payloads, concurrency, arm=None):
        sent[concurrency] = len(payloads)
        calls.append((concurrency, len(payloads)))
        return {"requests": len(payloads), "concurrency": concurrency, "latency_ms": {"p50": 1.0, "p99": 1.0, "mean": 1.0},
                "throughput_rps": float(concurrency)}

    monkeypatch.setattr(harness, "running_service", fake_service)
    monkeypatch.setattr(harness, "time_requests", fake_time)
    monkeypatch.setattr(harness, "_peak_rss", lambda pid: None)
    monkeypatch.setattr(harness, "_scrape", lambda base: {})
    few, many = [{"user": i} for i in range(3)], [{"user": i} for i in range(8)]
    result = harness.serve_and_measure("arm", "artifact", few, [1, 4], throughput_payloads=many)
    assert sent == {1: 3, 4: 8}
    # the service's warm-up (2 at concurrency 1), level 1, then level 4 in its steady state: an untimed burst of 4
    # at that level before the timed 8
    assert calls == [(1, 2), (1, 3), (4, 4), (4, 8)]
    assert result["c4"]["requests"] == 8 and result["best_throughput_rps"] == 4.0
    sent.clear()
    harness.serve_and_measure("arm", "artifact", few, [1, 4])
    assert sent == {1: 3, 4: 3}  # without them every level sends the same requests
