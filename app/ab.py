"""A/B assignment and reporting.

Assignment is sticky and stateless: sha256 of ``salt:user_id`` mapped to one of 10,000 buckets, buckets
split by cumulative weight (never Python's ``hash``, which is salted per process). The report gives per
arm: requests, shed requests, feedback counts, CTR with a Wilson 95% interval, latency percentiles, and the
observed traffic split beside the intended one.

CTR is the share of served lists with at least one click, so it is a proportion whatever the client sends:
feedback is idempotent per (list, item, event), and a second click on another item of a clicked list adds
a click event but not a clicked list.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field

BUCKETS = 10_000


def bucket_of(user_id: str, salt: str) -> int:
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def assign(user_id: str, weights: dict[str, float], salt: str) -> str:
    """The arm of a user under normalised weights (stable while weights and salt stay the same)."""
    if not weights:
        raise ValueError("no arms to assign to")
    point = bucket_of(user_id, salt) / BUCKETS
    cumulative = 0.0
    arms = sorted(weights)  # a fixed order, independent of dict insertion
    for arm in arms:
        cumulative += weights[arm]
        if point < cumulative:
            return arm
    return arms[-1]


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / trials`` (``0 <= successes <= trials``)."""
    if not 0 <= successes <= trials:
        raise ValueError(f"a proportion needs 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return 0.0, 0.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


@dataclass
class ArmStats:
    requests: int = 0
    errors: int = 0
    served_lists: int = 0
    clicked_lists: int = 0
    shed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    feedback: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))


@dataclass
class ServedList:
    arm: str
    version: str
    items: frozenset[str]
    events: set[tuple[str, str]] = field(default_factory=set)  # (item_id, event) recorded so far


class UnknownListError(KeyError):
    """Feedback for a request id that was never served (or was forgotten: only the newest are kept)."""


class NotInListError(ValueError):
    """Feedback for an item that was not in the served list."""


class Experiment:
    """Thread-safe counters behind the A/B report, and the served lists that feedback refers to."""

    def __init__(self, remember: int = 100_000) -> None:
        self._lock = threading.Lock()
        self.arms: dict[str, ArmStats] = defaultdict(ArmStats)
        self.shadow: dict[str, ArmStats] = defaultdict(ArmStats)
        self.remember = remember
        self.served: OrderedDict[str, ServedList] = OrderedDict()

    def record_served(self, request_id: str, arm: str, version: str, items: list[str]) -> None:
        """Keep a served list for feedback (the oldest is forgotten beyond ``remember`` lists)."""
        with self._lock:
            self.served[request_id] = ServedList(arm, version, frozenset(items))
            while len(self.served) > self.remember:
                self.served.popitem(last=False)

    def record_feedback(self, request_id: str, item_id: str, event: str) -> tuple[ServedList, bool]:
        """Count a feedback event once per (list, item, event); returns the list and whether it was new."""
        with self._lock:
            served = self.served.get(request_id)
            if served is None:
                raise UnknownListError(request_id)
            if item_id not in served.items:
                raise NotInListError(item_id)
            if (item_id, event) in served.events:
                return served, False
            stats = self.arms[served.arm]
            if event == "click" and not any(e == "click" for _, e in served.events):
                stats.clicked_lists += 1
            served.events.add((item_id, event))
            stats.feedback[event] += 1
            return served, True

    def record_shed(self, arm: str, reason: str) -> None:
        with self._lock:
            self.arms[arm].shed[reason] += 1

    def record_request(self, arm: str, latency_ms: float, ok: bool, shadow: bool = False) -> None:
        with self._lock:
            stats = (self.shadow if shadow else self.arms)[arm]
            stats.requests += 1
            if ok:
                stats.served_lists += 1
                stats.latencies_ms.append(latency_ms)
            else:
                stats.errors += 1

    def report(self, intended: dict[str, float]) -> dict:
        with self._lock:
            total = sum(s.requests for s in self.arms.values())
            arms = {}
            for name in sorted(set(intended) | set(self.arms)):
                s = self.arms[name]
                low, high = wilson_interval(s.clicked_lists, s.served_lists)
                latencies = list(s.latencies_ms)
                arms[name] = {
                    "requests": s.requests,
                    "errors": s.errors,
                    "shed": dict(s.shed),
                    "served_lists": s.served_lists,
                    "clicked_lists": s.clicked_lists,
                    "feedback": dict(s.feedback),
                    "ctr": s.clicked_lists / s.served_lists if s.served_lists else 0.0,
                    "ctr_ci95": [low, high],
                    "latency_ms": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99)},
                    "observed_share": s.requests / total if total else 0.0,
                    "intended_share": intended.get(name, 0.0),
                }
            shadow = {n: {"requests": s.requests, "errors": s.errors,
                          "latency_ms": {"p50": percentile(list(s.latencies_ms), 50)}} for n, s in self.shadow.items()}
            return {"total_requests": total, "arms": arms, "shadow": shadow}
