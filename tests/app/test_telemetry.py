"""GPU memory in /metrics: absent on a CPU-only process, read per device at scrape time on CUDA."""

from __future__ import annotations

import torch
from prometheus_client.parser import text_string_to_metric_families

from app.telemetry import Telemetry


def families(telemetry: Telemetry) -> dict:
    return {f.name: f for f in text_string_to_metric_families(telemetry.render().decode())}


def test_no_gpu_metrics_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not [name for name in families(Telemetry()) if name.startswith("prunerec_gpu")]


def test_gpu_memory_per_device_when_cuda_is_in_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 1000 * (index + 1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: 5000 * (index + 1))
    found = families(Telemetry())
    peak = {s.labels["device"]: s.value for s in found["prunerec_gpu_memory_peak_bytes"].samples}
    allocated = {s.labels["device"]: s.value for s in found["prunerec_gpu_memory_allocated_bytes"].samples}
    assert peak == {"0": 5000.0, "1": 10000.0} and allocated == {"0": 1000.0, "1": 2000.0}
