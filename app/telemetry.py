"""Prometheus metrics of the service, labelled by arm and model version (own registry per app)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.batching import MicroBatcher

__all__ = ["CONTENT_TYPE_LATEST", "Telemetry"]


class _BatcherCollector(Collector):
    """Queue depth and the worker's counters, read from the batchers at scrape time."""

    def __init__(self, batchers: Mapping[str, MicroBatcher]) -> None:
        self.batchers = batchers

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily("prunerec_queue_depth", "Requests waiting to be decoded", labels=["arm"])
        busy = GaugeMetricFamily("prunerec_decoding", "1 while a batch of the arm is being decoded", labels=["arm"])
        dropped = CounterMetricFamily("prunerec_dropped_before_decoding", "Queued requests never decoded (caller gone or out of time)", labels=["arm"])
        wasted = CounterMetricFamily("prunerec_decoded_after_caller_left", "Requests whose caller gave up while their "
                                     "batch was being decoded (client_left, or deadline)", labels=["arm", "reason"])
        solo = CounterMetricFamily("prunerec_started_without_wait", "Lone requests on an idle arm started without the "
                                   "gathering wait (solo_after)", labels=["arm"])
        for arm, batcher in list(self.batchers.items()):
            solo.add_metric([arm], batcher.stats.started_without_wait)
            queued.add_metric([arm], batcher.queued)
            busy.add_metric([arm], 1.0 if batcher.busy else 0.0)
            dropped.add_metric([arm], batcher.stats.dropped_before_decoding)
            for reason in ("client_left", "deadline"):
                wasted.add_metric([arm, reason], batcher.stats.finished_abandoned.get(reason, 0))
        yield from (queued, busy, dropped, wasted, solo)


class _GpuMemoryCollector(Collector):
    """GPU memory of this process per CUDA device (allocated now, and the peak since start), at scrape time."""

    def collect(self) -> Iterator[Metric]:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        allocated = GaugeMetricFamily("prunerec_gpu_memory_allocated_bytes", "GPU memory held by tensors now", labels=["device"])
        peak = GaugeMetricFamily("prunerec_gpu_memory_peak_bytes", "Most GPU memory held by tensors since the start",
                                 labels=["device"])
        for index in range(torch.cuda.device_count()):
            allocated.add_metric([str(index)], float(torch.cuda.memory_allocated(index)))
            peak.add_metric([str(index)], float(torch.cuda.max_memory_allocated(index)))
        yield from (allocated, peak)


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_GpuMemoryCollector())
        labels = ["arm", "version"]
        self.requests = Counter("prunerec_requests_total", "Recommendation requests answered", labels, registry=self.registry)
        self.errors = Counter("prunerec_errors_total", "Requests that failed", [*labels, "kind"], registry=self.registry)
        self.shed = Counter("prunerec_shed_total", "Requests answered 503 without a list (queue_full, deadline) or "
                            "abandoned by their client (client_left)", [*labels, "reason"], registry=self.registry)
        self.latency = Histogram(
            "prunerec_request_latency_seconds", "Time from request to answer", labels, registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batch_size = Histogram(
            "prunerec_batch_size", "Requests decoded together", labels, registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.feedback = Counter("prunerec_feedback_total", "Feedback events", [*labels, "event"], registry=self.registry)
        self.shadow = Counter("prunerec_shadow_requests_total", "Shadow answers computed", labels, registry=self.registry)

    def watch(self, batchers: Mapping[str, MicroBatcher]) -> None:
        """Export queue depth and drop counters of these batchers (the mapping is read at every scrape)."""
        self.registry.register(_BatcherCollector(batchers))

    def render(self) -> bytes:
        return generate_latest(self.registry)
