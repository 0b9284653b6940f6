"""Prometheus metrics of the service, labelled by arm and model version (own registry per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Telemetry"]


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["arm", "version"]
        self.requests = Counter("prunerec_requests_total", "Recommendation requests answered", labels, registry=self.registry)
        self.errors = Counter("prunerec_errors_total", "Requests that failed", [*labels, "kind"], registry=self.registry)
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
