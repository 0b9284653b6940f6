"""The benchmark and the offline A/B comparison: quality, cost and speed side by side in one run.

``prunerec bench --profile cpu|gpu`` fine-tunes the dense model, runs the PruneRec stages (plus the vocab
stage), the TRSP depth variant, RecBole SASRec on the identical split and MostPop, all scored on the same
seeded test users (LOO, history 10, full catalog, 20 beams, history excluded); then serves dense, pruned and
pruned + vocab through the real HTTP service on 127.0.0.1, one server per arm (so that each arm's peak
memory is its own), at concurrency 1 and 16. Everything lands in ``bench/results/<profile>/``:
``report.json`` (the shape below), ``report.md`` and two plots. Every step is resumable (finished artifacts
and evaluations are reused).

``prunerec compare A B`` does the same for two artifacts, plus a paired test on per-user NDCG@10.

report.json::

    {"protocol": {...},
     "models": {"<name>": {"artifact", "params": {"total", "embedding", "non_embedding"}, "artifact_bytes",
                           "metrics": {"ndcg@10", "hr@10", ...}, "latency_ms": {"p50", "p99"},
                           "throughput_rps", "peak_rss_bytes", "macs_per_token"}},
     "ratios": {"retention_ndcg@10", "non_embedding_pruned_fraction", "speedup_p50", "throughput_gain"}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec.artifact import read_manifest
from recdata.prep import PreparedData

logger = logging.getLogger(__name__)

NDCG_K = 10


# ------------------------------------------------------------------------------------------------
# serving measurements
# ------------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def running_service(arms: dict[str, str], *options: str, env: dict[str, str] | None = None,
                    ready_timeout: float = 600) -> Iterator[tuple[str, subprocess.Popen]]:
    """``prunerec serve`` with these arms on a free port of 127.0.0.1, once ready: yields (base URL, process)."""
    import httpx

    port = _free_port()
    command = [sys.executable, "-m", "cli", "serve", "--port", str(port), *options]
    for name, artifact in arms.items():
        command += ["--models", f"{name}={artifact}"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + ready_timeout
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the service for {sorted(arms)} did not start")
            time.sleep(0.5)
        yield base, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


UNBOUNDED_DEADLINE = {"PRUNEREC_REQUEST_TIMEOUT_MS": "3600000", "PRUNEREC_MAX_DEADLINE_MS": "3600000"}
"""Latency is measured without shedding (the load check measures shedding)."""


def serve_and_measure(name: str, artifact: str, payloads: list[dict], levels: list[int], head: str = "catalog",
                      max_batch_size: int = 16, device: str | None = None) -> dict[str, Any]:
    """Start the service with one arm, time the payloads at each concurrency level, read its peak memory."""
    import httpx

    options = ["--max-batch-size", str(max_batch_size), *(["--device", device] if device else [])]
    with running_service({name: artifact}, *options, env={"PRUNEREC_HEAD": head, **UNBOUNDED_DEADLINE}) as (base, server):

        def one(payload: dict) -> float:
            started = time.perf_counter()
            response = httpx.post(f"{base}/v1/recommend", json=payload, timeout=900)
            response.raise_for_status()
            return (time.perf_counter() - started) * 1000

        for payload in payloads[:2]:  # warm-up
            one(payload)
        result: dict[str, Any] = {}
        for level in levels:
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=level) as pool:
                latencies = list(pool.map(one, payloads))
            wall = time.perf_counter() - started
            result[f"c{level}"] = {
                "requests": len(payloads), "latency_ms": {"p50": float(np.percentile(latencies, 50)),
                                                          "p99": float(np.percentile(latencies, 99))},
                "throughput_rps": len(payloads) / wall,
            }
            logger.info("%s c=%d: p50 %.1f ms, %.2f req/s", name, level, result[f"c{level}"]["latency_ms"]["p50"],
                        result[f"c{level}"]["throughput_rps"])
        result["peak_rss_bytes"] = _peak_rss(server.pid)
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


# ------------------------------------------------------------------------------------------------
# quality: per-user NDCG and the paired test
# ------------------------------------------------------------------------------------------------


def per_user_ndcg(ranks: list[int | None] | pd.Series, k: int = NDCG_K) -> np.ndarray:
    """1/log2(rank + 2) when the target is in the top k, else 0; ranks are 0-based (−1 or None = missed)."""
    values = np.array([-1 if r is None or (isinstance(r, float) and np.isnan(r)) else int(r) for r in ranks])
    return np.where((values >= 0) & (values < k), 1.0 / np.log2(np.clip(values, 0, None) + 2.0), 0.0)


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Paired comparison of per-user NDCG (same users, same order): mean difference (B − A) with a 95%
    bootstrap interval, Wilcoxon signed-rank p-value (zero differences split) and paired t-test p-value."""
    from scipy import stats

    if a.shape != b.shape or a.size == 0:
        raise ValueError("the paired test needs the same non-empty set of users for both models")
    difference = b - a
    rng = np.random.default_rng(0)
    resampled = difference[rng.integers(0, difference.size, size=(2000, difference.size))].mean(1)
    result: dict[str, Any] = {"users": int(a.size), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
              "mean_difference": float(difference.mean()),
              "ci95": [float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))],
              "users_better_b": int((difference > 0).sum()), "users_better_a": int((difference < 0).sum())}
    if np.any(difference != 0):
        result["wilcoxon_p"] = float(stats.wilcoxon(a, b, zero_method="zsplit").pvalue)
        result["ttest_p"] = float(stats.ttest_rel(a, b).pvalue)
    else:
        result["wilcoxon_p"] = result["ttest_p"] = 1.0
    return result


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


def artifact_bytes(directory: str | Path) -> int:
    """Bytes on disk of what an artifact ships (evaluation outputs left out)."""
    root = Path(directory)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "eval" not in p.relative_to(root).parts)


def model_entry(artifact: str | Path, evaluation: dict, repo_root: Path | None = None) -> dict[str, Any]:
    """A report entry for an LLM artifact from its manifest and an evaluation result."""
    manifest = read_manifest(artifact)
    path = Path(artifact).resolve()
    shown = str(path.relative_to(repo_root)) if repo_root and path.is_relative_to(repo_root) else str(artifact)
    return {"artifact": shown, "params": manifest["params"], "artifact_bytes": artifact_bytes(artifact),
            "metrics": evaluation["metrics"], "vocab_size": evaluation["protocol"].get("vocab_size")}


def ratios(models: dict[str, dict], dense: str = "dense", pruned: str = "pruned") -> dict[str, float]:
    a, b = models.get(dense), models.get(pruned)
    if not a or not b:
        return {}
    out = {
        "retention_ndcg@10": b["metrics"]["ndcg@10"] / a["metrics"]["ndcg@10"] if a["metrics"]["ndcg@10"] else float("nan"),
        "non_embedding_pruned_fraction": 1 - b["params"]["non_embedding"] / a["params"]["non_embedding"],
    }
    if "latency_ms" in a and "latency_ms" in b:
        out["speedup_p50"] = a["latency_ms"]["p50"] / b["latency_ms"]["p50"]
        out["throughput_gain"] = b["throughput_rps"] / a["throughput_rps"]
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(report: dict) -> str:
    """report.md: the protocol, the quality table, the cost table and the ratios."""
    lines = [f"# prunerec benchmark: {report['protocol'].get('profile', 'compare')}", ""]
    phases = report["protocol"].get("phase_minutes", {})
    lines += ["## Protocol", ""] + [f"- {k}: {v}" for k, v in report["protocol"].items() if k != "phase_minutes"] + [""]
    if phases:
        lines += ["## Time (minutes of this run)", "", "| phase | minutes |", "| --- | ---: |"]
        lines += [f"| {name} | {minutes:.1f} |" for name, minutes in phases.items()]
        lines += [f"| total | {report['protocol'].get('minutes', sum(phases.values())):.1f} |", ""]
    lines += ["## Quality (same users)", "", "| model | NDCG@1 | NDCG@5 | NDCG@10 | NDCG@20 | HR@1 | HR@5 | HR@10 | HR@20 | MRR@20 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in report["models"].items():
        m = entry.get("metrics", {})
        cells = [m.get(f"ndcg@{k}") for k in (1, 5, 10, 20)] + [m.get(f"hr@{k}") for k in (1, 5, 10, 20)] + [m.get("mrr@20")]
        lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + " |")
    unmasked = report["models"].get("sasrec", {}).get("recbole_test_unmasked")
    if unmasked:
        lines += ["", f"SASRec by RecBole's own evaluator (every test user, past items not masked): NDCG@10 "
                      f"{_fmt(unmasked.get('ndcg@10'))}, HR@10 {_fmt(unmasked.get('hit@10'))}."]
    lines += ["", "## Cost", "", "| model | params | embedding | non-embedding | artifact MB | MACs/token | peak RSS MB "
              "| p50 ms (c1) | p99 ms (c1) | req/s (c1) | p50 ms (c16) | req/s (c16) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in report["models"].items():
        p = entry.get("params", {})
        serving = entry.get("serving", {})
        c1, c16 = serving.get("c1", {}), serving.get("c16", {})
        size = entry.get("artifact_bytes")
        rss = serving.get("peak_rss_bytes")
        cells = [p.get("total"), p.get("embedding"), p.get("non_embedding"), size / 1e6 if size else None,
                 entry.get("macs_per_token"), rss / 1e6 if rss else None,
                 c1.get("latency_ms", {}).get("p50"), c1.get("latency_ms", {}).get("p99"), c1.get("throughput_rps"),
                 c16.get("latency_ms", {}).get("p50"), c16.get("throughput_rps")]
        lines.append(f"| {name} | " + " | ".join(_fmt(c, 1) if isinstance(c, float) else _fmt(c) for c in cells) + " |")
    load = report.get("load")
    if load:
        server = load["server"]
        lines += ["", "## Overload (load check)", "",
                  f"{load['clients']} clients for {load['seconds']:.0f} s against {', '.join(load['arms'])} at equal weights, "
                  f"every request with a {load['deadline_ms']:.0f} ms deadline; {load['leavers']} of the clients give up "
                  "after 0.5 s.", "",
                  "| requests | answered 200 | late 200 | client timeouts | goodput req/s | 503 queue full | 503 deadline | 503 > deadline/10 "
                  "| client left | dropped before decoding | caller gone mid-batch | p99 ms 200 | p99 ms 503 | drain s |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                  "| " + " | ".join(_fmt(c, 1) if isinstance(c, float) else _fmt(c) for c in [
                      load["requests"], load["answered_200"], load["late_200"], load["client_timeouts"], load["goodput_rps"],
                      server["shed"]["queue_full"], server["shed"]["deadline"], load["slow_503"], server["shed"]["client_left"],
                      server["dropped_before_decoding"], sum(server["decoded_after_caller_left"].values()),
                      load["latency_ms_200"]["p99"], load["latency_ms_503"]["p99"], load["drain_s"]]) + " |"]
    if report.get("ratios"):
        lines += ["", "## Ratios (pruned vs dense)", ""] + [f"- {k}: {_fmt(v, 3)}" for k, v in report["ratios"].items()]
    if report.get("paired_test"):
        lines += ["", "## Paired test on per-user NDCG@10", ""] + [f"- {k}: {v}" for k, v in report["paired_test"].items()]
    return "\n".join(lines) + "\n"


def plots(report: dict, directory: Path) -> list[Path]:
    """NDCG@10 against non-embedding parameters (every model), and p50 latency against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    points: dict[tuple[float, float], list[str]] = {}
    for name, entry in report["models"].items():
        params = entry.get("params", {}).get("non_embedding")
        ndcg = entry.get("metrics", {}).get("ndcg@10")
        if ndcg is None:
            continue
        if not params:  # no LLM parameter count (SASRec, MostPop): a labelled horizontal reference line
            style = {"mostpop": ":", "sasrec": "--"}.get(name, "-.")
            ax.axhline(ndcg, linestyle=style, color="grey", linewidth=1, label=f"{name} ({ndcg:.3f})")
            continue
        points.setdefault((params, ndcg), []).append(name)
    chain = [n for n in ("dense", "1-attn", "2-mlp", "pruned") if n in report["models"]]
    if len(chain) > 1 and all(report["models"][n].get("params", {}).get("non_embedding") for n in chain):
        ax.plot([report["models"][n]["params"]["non_embedding"] for n in chain],
                [report["models"][n]["metrics"]["ndcg@10"] for n in chain], color="tab:blue", alpha=0.4,
                linewidth=1, label="PruneRec stages")
    for (params, ndcg), names in points.items():  # models at the same point (pruned, pruned+vocab) share a label
        ax.scatter(params, ndcg, color="tab:orange" if any("trsp" in n for n in names) else "tab:blue", zorder=3)
        # the lower of two models of one size (TRSP under greedy depth) is labelled below its point
        below = any(x == params and y > ndcg for x, y in points)
        ax.annotate(", ".join(names), (params, ndcg), fontsize=8, xytext=(4, -11 if below else 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("NDCG@10")
    ax.set_ylim(bottom=0)
    ax.set_title("Quality against size")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    written.append(directory / "ndcg_vs_params.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    served = {n: e for n, e in report["models"].items() if e.get("serving", {}).get("c1")}
    if served:
        fig, ax = plt.subplots(figsize=(7.2, 4.6))
        levels = sorted({int(k[1:]) for e in served.values() for k in e["serving"] if k.startswith("c")})
        for level, marker in zip(levels, ("o", "s", "^", "D"), strict=False):
            xs = [e["params"]["total"] for e in served.values() if f"c{level}" in e["serving"]]
            ys = [e["serving"][f"c{level}"]["latency_ms"]["p50"] for e in served.values() if f"c{level}" in e["serving"]]
            ax.scatter(xs, ys, marker=marker, label=f"concurrency {level}", zorder=3)
        for name, entry in served.items():
            x, y = entry["params"]["total"], entry["serving"]["c1"]["latency_ms"]["p50"]
            ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (total)")
        ax.set_ylabel("top-10 latency p50, ms")
        ax.set_title("Latency against size (HTTP, 127.0.0.1)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(directory / "latency_vs_params.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write_report(report: dict, directory: Path, pair: tuple[str, str] = ("dense", "pruned")) -> list[Path]:
    """report.json, report.md and the plots; returns the paths written. ``pair`` names the models the
    ratios compare (reference first)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, entry in report["models"].items():  # the flat fields the report promises
        serving = entry.get("serving", {})
        if serving.get("c1"):
            entry["latency_ms"] = serving["c1"]["latency_ms"]
            entry["throughput_rps"] = serving.get("c16", serving["c1"])["throughput_rps"]
        logger.debug("report entry %s", name)
    report["ratios"] = ratios(report["models"], *pair)
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (directory / "report.md").write_text(markdown(report))
    return [directory / "report.json", directory / "report.md", *plots(report, directory)]


# ------------------------------------------------------------------------------------------------
# the benchmark and the comparison
# ------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """One benchmark run; the profile scales the work, never the protocol (history 10, 20 beams, full catalog)."""

    profile: str = "cpu"
    model: str = "smollm2-135m"
    """Base model to fine-tune (the embedded default, or a local HF directory)."""
    output: str | None = None
    """Report directory [bench/results/<profile>]."""
    work: str | None = None
    """Artifacts and evaluations [runs/bench-<profile>]; re-running resumes from it."""
    users: int | None = 300
    """Seeded test users for every quality number (None = all)."""
    sasrec_epochs: int = 5
    latency_requests: int = 24
    concurrency: list[int] = field(default_factory=lambda: [1, 16])
    head: str = "catalog"
    """Head mode for quality and serving (the default, catalog, was chosen from bench/results/catalog_vocab_cpu.json)."""
    peft: bool = False
    """Also compare PrunePEFT's LoRA placement with plain LoRA (q, v) at the same trainable-parameter count."""
    calibration_samples: int | None = None
    """Calibration samples of each pruning stage (None = the pruning profile's own)."""
    load_seconds: float = 60.0
    """Length of the load check: 64 clients, closed loop, against dense and pruned served at 50/50 with
    deadlines (see :class:`LoadCheck`); 0 skips it."""
    load_deadline_ms: float = 5000.0
    """Deadline of every request of the load check."""
    device: str | None = None
    seed: int = 0


BENCH_PROFILES: dict[str, dict[str, Any]] = {
    # <= 60 minutes on 2 CPU cores (the fine-tuning and compression profiles named cpu).
    # Head ablations and the greedy layer search cost passes over the calibration set: 16 samples (the pruning
    # profile has 32) keep the whole run inside the hour.
    "cpu": {"users": 300, "sasrec_epochs": 5, "latency_requests": 24, "calibration_samples": 16, "load_seconds": 45.0},
    # the full-size pipeline on one GPU: every user, SASRec to convergence.
    "gpu": {"users": None, "sasrec_epochs": 50, "latency_requests": 200, "device": "cuda", "peft": True,
            "load_seconds": 30.0, "load_deadline_ms": 2000.0},
}


def bench_config(profile: str, **overrides: Any) -> BenchConfig:
    if profile not in BENCH_PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(BENCH_PROFILES)}")
    values = {**BENCH_PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}}
    if str(values.get("device") or "").startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # fail now, not after the CPU has fine-tuned for the gpu profile
            raise ValueError(f"the {profile} profile runs on CUDA and none is available here; pass --device cpu to "
                             "run it on the CPU anyway (hours), or use --profile cpu")
    return BenchConfig(profile=profile, **values)


def _evaluate(artifact: Path, data: PreparedData, users: int | None, seed: int, head: str, output: Path,
              device: str | None) -> dict:
    """Evaluate (or reuse an evaluation with the same protocol written to ``output``)."""
    from pruning.evaluate import EvalConfig
    from pruning.evaluate import run as evaluate

    if output.is_file():
        cached = json.loads(output.read_text())
        if cached["config"]["users"] == users and cached["config"]["seed"] == seed and cached["config"]["head"] == head:
            return cached
    return evaluate(EvalConfig(artifact=str(artifact), users=users, seed=seed, head=head, output=str(output),
                               batch_size=16, device=device), data)


class PhaseClock:
    """Wall-clock minutes per benchmark phase, so the report shows where the time went."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.minutes: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        logger.info("bench phase: %s", name)
        try:
            yield
        finally:
            self.minutes[name] = round(self.minutes.get(name, 0.0) + (time.monotonic() - started) / 60, 2)
            logger.info("bench phase %s: %.1f min", name, self.minutes[name])

    def total(self) -> float:
        return round((time.monotonic() - self.started) / 60, 1)


def run_bench(config: BenchConfig, data: PreparedData) -> list[Path]:
    """The whole benchmark (see the module docstring); returns the report files."""
    from pruning import sasrec
    from pruning.evaluate import sample_users
    from pruning.prune import PruneConfig
    from pruning.prune import apply_profile as prune_profile
    from pruning.prune import run as prune
    from pruning.train import TrainConfig
    from pruning.train import apply_profile as train_profile
    from pruning.train import run as train

    work = Path(config.work or f"runs/bench-{config.profile}")
    output = Path(config.output or f"bench/results/{config.profile}")
    # A re-run reuses what the work directory holds; its minutes then cover only the work left to do.
    resumed = work.is_dir() and any(work.iterdir())
    clock = PhaseClock()
    dense = work / "0-dense"
    with clock.phase("fine-tune"):
        if not (dense / "prunerec.json").is_file():
            train(train_profile(TrainConfig(output=str(dense), model=config.model, seed=config.seed), config.profile), data)
    greedy_config = _prune(PruneConfig(output=str(work), teacher=str(dense), stages=["attn", "mlp", "depth", "vocab"],
                                       evaluate=False), config, prune_profile)
    trsp_config = _prune(PruneConfig(output=str(work), teacher=str(dense), stages=["attn", "mlp", "depth"],
                                     depth_method="trsp", evaluate=False), config, prune_profile)
    with clock.phase("prune (attn, mlp, greedy depth, vocab)"):
        stages = prune(greedy_config, data)
    with clock.phase("prune (trsp depth)"):
        trsp = prune(trsp_config, data)[-1]
    named = {"dense": dense, **{p.name: p for p in stages}, "pruned": stages[2], "pruned+vocab": stages[3],
             "trsp": trsp}
    named.pop(stages[2].name)
    named.pop(stages[3].name)
    repo_root = Path.cwd().resolve()
    models: dict[str, dict] = {}
    evaluations: dict[str, dict] = {}
    with clock.phase("evaluate"):
        for name, path in named.items():
            evaluations[name] = _evaluate(path, data, config.users, config.seed, config.head, work / "eval" / f"{name}.json", config.device)
            models[name] = model_entry(path, evaluations[name], repo_root)
    pairs = sample_users(data.splits["test"], config.users, config.seed)
    sasrec_config = sasrec.SASRecConfig(output=str(work / "sasrec"), epochs=config.sasrec_epochs, device=config.device or "cpu")
    with clock.phase("sasrec"):
        sasrec_result = _cached(work / "sasrec" / "result.json", {"config": asdict(sasrec_config), "users": config.users, "seed": config.seed},
                                lambda: sasrec.run(sasrec_config, data, users=pairs))
    models["sasrec"] = {"artifact": None, "params": {"total": sasrec_result["params"], "embedding": None, "non_embedding": None},
                        "metrics": sasrec_result["metrics"], "epochs_run": sasrec_result["epochs_run"],
                        # RecBole's evaluator on every test user, history not masked (see pruning.sasrec)
                        "recbole_test_unmasked": sasrec_result.get("test_recbole"),
                        "minutes": sasrec_result["minutes"]}
    if config.peft:
        with clock.phase("peft"):
            for name, path in _peft_arms(config, data, work).items():
                evaluations[name] = _evaluate(path, data, config.users, config.seed, config.head, work / "eval" / f"{name}.json", config.device)
                models[name] = model_entry(path, evaluations[name], repo_root)
    models["mostpop"] = {"artifact": None, "params": {"total": 0, "embedding": 0, "non_embedding": 0},
                         "metrics": evaluations["dense"]["mostpop"]}
    payloads = request_payloads(data, pairs[: config.latency_requests])
    with clock.phase("serve"):
        for name in ("dense", "pruned", "pruned+vocab"):
            key = {"artifact": str(named[name]), "head": config.head, "requests": len(payloads), "levels": config.concurrency,
                   "users": config.users, "seed": config.seed, "device": config.device}
            models[name]["serving"] = _cached(work / "serving" / f"{name}.json", key, lambda name=name: serve_and_measure(
                name, str(named[name]), payloads, config.concurrency, config.head, device=config.device))
            models[name]["macs_per_token"] = macs_per_token(named[name], config.head)
    load = None
    if config.load_seconds:
        check = LoadCheck(seconds=config.load_seconds, deadline_ms=config.load_deadline_ms)
        arms = {"dense": str(named["dense"]), "pruned": str(named["pruned"])}
        with clock.phase("load check"):
            load = _cached(work / "serving" / "load.json", {"arms": arms, "check": asdict(check), "head": config.head,
                                                            "device": config.device, "users": config.users},
                           lambda: load_check(arms, request_payloads(data, pairs), check, config.head, device=config.device))
    sampled = len(pairs) < len(data.splits["test"])
    report = {
        "protocol": {
            "profile": config.profile, "dataset": data.name, "split": "leave-one-out (test)", "users": len(pairs),
            "users_sampled": sampled, "seed": config.seed, "history_length": 10, "num_beams": 20,
            "ranking": "full catalog, history excluded", "head": config.head,
            "serving": f"HTTP on 127.0.0.1, one server per arm, head={config.head}, top-10, {len(payloads)} requests "
                       f"per level, concurrency {config.concurrency}",
            "compression": {"calibration": asdict(greedy_config.calibration), "distill_per_stage": asdict(greedy_config.distill),
                            "trsp": asdict(trsp_config.trsp)},
            "sasrec": f"RecBole 1.2.1, CE loss, max {config.sasrec_epochs} epochs, early stopping on valid NDCG@10",
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "minutes": clock.total(),
            "phase_minutes": clock.minutes, "resumed": resumed,
            "sample_check": sample_check(data, pairs) if sampled else None,
            "config": asdict(config),
        },
        "models": models,
        "load": load,
    }
    return write_report(report, output)


def sample_check(data: PreparedData, pairs: np.ndarray) -> dict[str, float]:
    """How representative the user sample is: MostPop (no model, so free) on the sample against every test user.

    A sample of a few hundred users can be easier or harder than the whole split (on ml-100k the cpu profile's
    300 users give MostPop NDCG@10 0.059 against 0.045 for all 943), which every absolute figure inherits;
    ratios between models scored on the same users are what the sample is for."""
    from pruning.evaluate import mostpop_metrics

    every = data.splits["test"]
    sample, _ = mostpop_metrics(data, pairs, True, [10], 20)
    whole, _ = mostpop_metrics(data, every, True, [10], 20)
    return {"mostpop_ndcg@10_sample": sample["ndcg@10"], "mostpop_ndcg@10_all_users": whole["ndcg@10"],
            "mostpop_hr@10_sample": sample["hr@10"], "mostpop_hr@10_all_users": whole["hr@10"],
            "all_users": len(every)}


def _cached(path: Path, key: dict, compute: Any) -> Any:
    """The result stored at ``path`` if it was computed with the same key, else compute and store it."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(json.dumps(key)):
            return stored["result"]
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "result": result}, default=str))
    return result


def _peft_arms(config: BenchConfig, data: PreparedData, work: Path) -> dict[str, Path]:
    """Plain LoRA on q/v and PrunePEFT's placement at the same trainable-parameter count, same training."""
    from peft import LoraConfig, get_peft_model

    from llmrec.model import load_model
    from pruning.peft_search import PeftSearchConfig, search
    from pruning.train import TrainConfig
    from pruning.train import apply_profile as train_profile
    from pruning.train import run as train

    base = load_model(config.model, device="cpu").model
    plain = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    budget = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    searched = work / "peft" / "search.json"
    if not searched.is_file():
        search(PeftSearchConfig(output=str(searched), model=config.model, budget_params=budget, seed=config.seed), data,
               device=config.device)
    targets = json.loads(searched.read_text())["target_modules"]
    arms = {"lora": (["q_proj", "v_proj"]), "lora-prunepeft": targets}
    paths = {}
    for name, modules in arms.items():
        path = work / "peft" / name
        if not (path / "prunerec.json").is_file():
            settings = train_profile(TrainConfig(output=str(path), model=config.model, seed=config.seed), config.profile)
            settings.method, settings.lora_r, settings.lora_alpha, settings.lora_targets = "lora", 8, 16, list(modules)
            settings.lr = max(settings.lr, 1e-3)  # LoRA wants a higher rate than full fine-tuning
            train(settings, data)
        paths[name] = path
    return paths


def _prune(config: Any, bench: BenchConfig, apply: Any) -> Any:
    config = apply(config, bench.profile)
    config.eval_users = bench.users
    config.device = bench.device
    if bench.calibration_samples:
        config.calibration.samples = bench.calibration_samples
    return config


def macs_per_token(artifact: str | Path | Any, head: str, context: int = 64) -> int:
    """Multiply-adds of one cached decoding step at ``context`` tokens (projections counted by torch's
    FlopCounterMode; CPU SDPA kernels are not counted) plus the LM-head rows the head mode uses × hidden
    size. ``artifact`` is a directory or a loaded :class:`llmrec.recommender.Recommender`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from llmrec.recommender import Recommender

    recommender = artifact if isinstance(artifact, Recommender) else Recommender.from_artifact(artifact, device="cpu")
    model = recommender.model
    ids = torch.full((1, context), int(recommender.encoder.end_id), dtype=torch.long)
    with torch.no_grad():
        cache = model.model(input_ids=ids, use_cache=True).past_key_values
        counter = FlopCounterMode(display=False)
        with counter:
            model.model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    rows = model.config.vocab_size if head == "full" else int(recommender.trie.vocabulary.numel())
    return int(counter.get_total_flops() // 2 + rows * model.config.hidden_size)


def compare(a: str, b: str, data: PreparedData, output: Path, users: int | None = 300, seed: int = 0,
            head: str = "full", latency_requests: int = 24, concurrency: list[int] | None = None,
            serve: bool = True, device: str | None = None) -> dict:
    """Offline A/B of two artifacts: quality on the same users, a paired test on per-user NDCG@10, cost."""
    from pruning.evaluate import sample_users

    names = {"A": Path(a), "B": Path(b)}
    models: dict[str, dict] = {}
    ndcg: dict[str, np.ndarray] = {}
    for name, path in names.items():
        result = _evaluate(path, data, users, seed, head, output / "eval" / f"{name}.json", device)
        models[name] = model_entry(path, result, Path.cwd().resolve())
        ranks = pd.read_csv((output / "eval" / f"{name}.json").with_suffix(".ranks.csv"))
        ndcg[name] = per_user_ndcg(ranks["rank"].tolist())
    pairs = sample_users(data.splits["test"], users, seed)
    if serve:
        payloads = request_payloads(data, pairs[:latency_requests])
        for name, path in names.items():
            models[name]["serving"] = serve_and_measure(name, str(path), payloads, concurrency or [1, 16], head, device=device)
    report = {
        "protocol": {"compare": {"A": str(a), "B": str(b)}, "dataset": data.name, "users": len(pairs), "seed": seed,
                     "history_length": 10, "num_beams": 20, "head": head, "ranking": "full catalog, history excluded"},
        "models": models,
        "paired_test": paired_test(ndcg["A"], ndcg["B"]),
    }
    write_report(report, output, ("A", "B"))
    return report
