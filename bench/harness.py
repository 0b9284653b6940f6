"""The serving harness of the benchmark, `prunerec compare` and every script in bench/: start `prunerec serve`
on 127.0.0.1, time requests at concurrency levels, read peak memory, and the overload check (deadlines,
shedding, clients that leave).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recdata.prep import PreparedData

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss(pid: int) -> int | None:
    """Peak resident memory of a process (VmHWM), in bytes; None where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def request_payloads(data: PreparedData, pairs: np.ndarray, k: int = 10) -> list[dict]:
    """One /v1/recommend body per (user, position): the last 10 items as history, history excluded."""
    return [
        {"user_id": data.users[int(u)], "k": k, "exclude_history": True,
         "history": [data.catalog.item_ids[i] for i in data.history(int(u), int(p))[-10:]]}
        for u, p in pairs
    ]


def wait_ready(base: str, timeout: float, alive: Callable[[], bool] = lambda: True, poll: float = 0.2) -> bool:
    """Poll ``/readyz`` until it answers 200 (True), or until ``timeout`` seconds pass or ``alive()`` turns
    false (False). The port may not be open yet: connection errors count as not ready."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    return False


@contextlib.contextmanager
def running_service(arms: dict[str, str], *options: str, env: dict[str, str] | None = None,
                    ready_timeout: float = 600) -> Iterator[tuple[str, subprocess.Popen]]:
    """``prunerec serve`` with these arms on a free port of 127.0.0.1, once ready: yields (base URL, process)."""
    port = _free_port()
    command = [sys.executable, "-m", "cli", "serve", "--port", str(port), *options]
    for name, artifact in arms.items():
        command += ["--models", f"{name}={artifact}"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(base, ready_timeout, alive=lambda: server.poll() is None):
            raise RuntimeError(f"the service for {sorted(arms)} did not start")
        yield base, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


UNBOUNDED_DEADLINE = {"PRUNEREC_REQUEST_TIMEOUT_MS": "3600000", "PRUNEREC_MAX_DEADLINE_MS": "3600000"}
"""Latency is measured without shedding (the load check measures shedding)."""


def time_requests(base: str, payloads: list[dict], concurrency: int, arm: str | None = None) -> dict[str, Any]:
    """Send the payloads to a running service with ``concurrency`` clients (to one arm when given, by the
    forcing header): latency percentiles per request and throughput (requests / wall time). Each client keeps
    its connection alive, as real clients do (before 2026-11-26 every request opened a new one)."""
    import threading

    import httpx

    headers = {"X-Prunerec-Arm": arm} if arm else {}
    local = threading.local()
    clients: list[httpx.Client] = []

    def one(payload: dict) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=900)
            clients.append(local.client)
        started = time.perf_counter()
        local.client.post(f"{base}/v1/recommend", json=payload, headers=headers).raise_for_status()
        return (time.perf_counter() - started) * 1000

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            latencies = list(pool.map(one, payloads))
    finally:
        for client in clients:
            client.close()
    wall = time.perf_counter() - started
    return {"requests": len(payloads), "concurrency": concurrency,
            "latency_ms": {"p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
                           "mean": float(np.mean(latencies))},
            "throughput_rps": len(payloads) / wall}


def measure_level(base: str, payloads: list[dict], concurrency: int, arm: str | None = None) -> dict[str, Any]:
    """:func:`time_requests` at one concurrency level, in its steady state: above 1, one untimed burst of
    ``concurrency`` requests at that level first. Without it the first timed batch is the service's transition
    out of single requests (after ``SOLO_AFTER`` lone batches the first request of a burst starts alone and the
    rest wait behind it): one extra single-request batch, a few percent of a run of 64 requests (about the time of
    one request at concurrency 1 against that of four full batches), for either model."""
    if concurrency > 1:
        time_requests(base, payloads[:concurrency], concurrency, arm)
    return time_requests(base, payloads, concurrency, arm)


def serve_and_measure(name: str, artifact: str, payloads: list[dict], levels: list[int], head: str = "catalog",
                      max_batch_size: int = 16, device: str | None = None, assist: bool | None = None,
                      throughput_payloads: list[dict] | None = None) -> dict[str, Any]:
    """Start the service with one arm, time the payloads at each concurrency level, read its peak memory.
    ``assist``: the service's --assist (None: its default, the artifact's assistant when it carries one).
    ``throughput_payloads``: what the levels above 1 send instead (more requests than clients × a few, so that
    the throughput is the steady state's, not that of the first and last partial batches)."""
    options = ["--max-batch-size", str(max_batch_size), *(["--device", device] if device else []),
               *([] if assist is None else ["--assist" if assist else "--no-assist"])]
    with running_service({name: artifact}, *options, env={"PRUNEREC_HEAD": head, **UNBOUNDED_DEADLINE}) as (base, server):
        time_requests(base, payloads[:2], 1)  # warm-up
        result: dict[str, Any] = {}
        for level in levels:
            result[f"c{level}"] = measure_level(base, throughput_payloads if throughput_payloads and level > 1 else payloads,
                                                level)
            logger.info("%s c=%d: p50 %.1f ms, %.2f req/s", name, level, result[f"c{level}"]["latency_ms"]["p50"],
                        result[f"c{level}"]["throughput_rps"])
        result["peak_rss_bytes"] = _peak_rss(server.pid)
        result["best_throughput_rps"] = max(result[f"c{level}"]["throughput_rps"] for level in levels)
        gpu = [v for k, v in _scrape(base).items() if k.startswith("prunerec_gpu_memory_peak_bytes")]
        result["gpu_peak_bytes"] = max(gpu) if gpu else None  # None: served on the CPU
        return result


def emit_json(result: Any, output: Path | None) -> None:
    """What the scripts in bench/ end with: the result as JSON on stdout, and in ``output`` when given."""
    text = json.dumps(result, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    print(text)


def _scrape(base: str) -> dict[str, float]:
    """The service's /metrics as {"name{label=value,...}": value} (labels sorted)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "version")
            key = f"{sample.name}{{{labels}}}"
            values[key] = values.get(key, 0.0) + sample.value
    return values


def _metric_total(metrics: dict[str, float], name: str, **labels: str) -> float:
    wanted = [f"{k}={v}" for k, v in labels.items()]
    return sum(v for key, v in metrics.items()
               if key.split("{")[0] == name and all(w in key.split("{")[1].rstrip("}").split(",") for w in wanted))


@dataclass
class LoadCheck:
    """Closed-loop overload: ``clients`` threads send requests back to back for ``seconds``; every request
    carries ``deadline_ms``; one client in ``leaver_every`` gives up after ``leave_after_s`` (to show that
    requests of departed clients are not decoded)."""

    clients: int = 64
    seconds: float = 60.0
    deadline_ms: float = 5000.0
    leaver_every: int = 8
    leave_after_s: float = 0.5
    honour_retry_after: bool = True
    """Clients wait Retry-After after a 503 (False: they retry at once, a flood of 503s)."""
    slack_ms: float = 500.0
    """A 200 later than deadline + slack counts as late (the slack covers HTTP and scheduling)."""


def load_check(arms: dict[str, str], payloads: list[dict], check: LoadCheck, head: str = "catalog",
               max_batch_size: int = 16, device: str | None = None, options: tuple[str, ...] = ()) -> dict[str, Any]:
    """Overload the service (see :class:`LoadCheck`): goodput, answers by status and reason, late answers,
    and from /metrics the shed counts, the requests dropped before decoding and those decoded for a departed
    client, and how long the service kept decoding after the load stopped (drain)."""
    import httpx

    cli = ["--max-batch-size", str(max_batch_size), *(["--device", device] if device else []), *options]
    with running_service(arms, *cli, env={"PRUNEREC_HEAD": head}) as (base, _server):
        outcomes: list[tuple[str, float, bool]] = []  # (status or "client-timeout" / "gave-up", ms, leaver)
        stop_at = time.time() + check.seconds

        def client(index: int) -> None:
            leaver = check.leaver_every > 0 and index % check.leaver_every == 0
            timeout = check.leave_after_s if leaver else check.deadline_ms / 1000 + 10
            with httpx.Client(timeout=timeout) as session:
                sent = 0
                while time.time() < stop_at:
                    payload = {**payloads[(index * 7919 + sent) % len(payloads)], "deadline_ms": check.deadline_ms,
                               "user_id": f"load-{index}-{sent}"}
                    sent += 1
                    started = time.perf_counter()
                    try:
                        response = session.post(f"{base}/v1/recommend", json=payload)
                        status = str(response.status_code)
                        if response.status_code == 503:
                            status += ":" + str(response.json().get("reason"))
                    except httpx.TimeoutException:
                        status = "gave-up" if leaver else "client-timeout"
                    outcomes.append((status, (time.perf_counter() - started) * 1000, leaver))
                    if status.startswith("503") and check.honour_retry_after:  # a well-behaved client backs off
                        time.sleep(min(float(response.headers.get("Retry-After", 1)), max(0.0, stop_at - time.time())))

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=check.clients) as pool:
            list(pool.map(client, range(check.clients)))
        wall = time.perf_counter() - started
        ended = time.perf_counter()
        while True:  # how long the model keeps working once every client has its answer or has left
            metrics = _scrape(base)
            if (_metric_total(metrics, "prunerec_queue_depth") == 0 and _metric_total(metrics, "prunerec_decoding") == 0) \
                    or time.perf_counter() - ended > 600:
                break
            time.sleep(0.1)
        drain = time.perf_counter() - ended
        metrics = _scrape(base)

    stayers = [(s, ms) for s, ms, leaver in outcomes if not leaver]
    ok = [ms for s, ms in stayers if s == "200"]
    on_time = [ms for ms in ok if ms <= check.deadline_ms + check.slack_ms]
    by_status: dict[str, int] = {}
    for status, _ms, _leaver in outcomes:
        by_status[status] = by_status.get(status, 0) + 1
    shed_ms = [ms for s, ms in stayers if s.startswith("503")]
    fast_shed_ms = [ms for s, ms in stayers if s in ("503:queue_full",)]
    return {
        "arms": sorted(arms), "clients": check.clients, "seconds": wall, "deadline_ms": check.deadline_ms,
        "leavers": sum(1 for i in range(check.clients) if check.leaver_every > 0 and i % check.leaver_every == 0),
        "requests": len(outcomes), "by_status": by_status,
        "goodput_rps": len(on_time) / wall,
        "answered_200": len(ok), "late_200": len(ok) - len(on_time),
        "client_timeouts": by_status.get("client-timeout", 0),
        "latency_ms_200": {"p50": float(np.percentile(ok, 50)) if ok else None, "p99": float(np.percentile(ok, 99)) if ok else None},
        "latency_ms_503": {"p50": float(np.percentile(shed_ms, 50)) if shed_ms else None,
                           "p99": float(np.percentile(shed_ms, 99)) if shed_ms else None},
        "latency_ms_503_queue_full": {"p99": float(np.percentile(fast_shed_ms, 99)) if fast_shed_ms else None},
        # a 503 is "fast" within a tenth of the deadline; the slow ones were admitted, then missed it
        "slow_503": sum(1 for ms in shed_ms if ms > check.deadline_ms / 10),
        "server": {
            "shed": {reason: _metric_total(metrics, "prunerec_shed_total", reason=reason)
                     for reason in ("queue_full", "deadline", "client_left")},
            "dropped_before_decoding": _metric_total(metrics, "prunerec_dropped_before_decoding_total"),
            "decoded_after_caller_left": {reason: _metric_total(metrics, "prunerec_decoded_after_caller_left_total", reason=reason)
                                          for reason in ("client_left", "deadline")},
            "decoded": _metric_total(metrics, "prunerec_batch_size_sum"),
        },
        "drain_s": drain,
    }
