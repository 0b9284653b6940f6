"""Latency and throughput of served arms, measured side by side through the real HTTP service.

Starts ``prunerec serve`` on 127.0.0.1 with every arm given, then for each arm (forced by header) and each
concurrency level sends the same requests (ml-100k test users: their last 10 items, top-10, history
excluded) and records client-side latency per request and throughput (requests / wall time).

    python bench/serve_latency.py --arm dense=runs/dense --arm pruned=runs/pruned/3-depth \
        --requests 48 --concurrency 1 --concurrency 16 --output bench/results/serve_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from recdata.prep import prepare
from recdata.sources import read_ml100k


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(arms: dict[str, str], port: int, max_batch_size: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "cli", "serve", "--port", str(port), "--max-batch-size", str(max_batch_size)]
    for name, path in arms.items():
        command += ["--models", f"{name}={path}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError("the server exited before it was ready")
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not become ready")


def measure(base: str, arm: str, payloads: list[dict], concurrency: int) -> dict:
    def one(payload: dict) -> float:
        started = time.perf_counter()
        response = httpx.post(f"{base}/v1/recommend", json=payload, headers={"X-Prunerec-Arm": arm}, timeout=600)
        response.raise_for_status()
        return (time.perf_counter() - started) * 1000

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = list(pool.map(one, payloads))
    wall = time.perf_counter() - started
    return {
        "requests": len(payloads),
        "concurrency": concurrency,
        "latency_ms": {"p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
                       "mean": float(np.mean(latencies))},
        "throughput_rps": len(payloads) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, help="NAME=ARTIFACT_DIR; repeat")
    parser.add_argument("--requests", type=int, default=48, help="requests per arm and concurrency level")
    parser.add_argument("--concurrency", type=int, action="append", help="levels (default 1 and 16)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("bench/results/serve_latency.json"))
    args = parser.parse_args()
    arms = dict(a.split("=", 1) for a in args.arm)
    levels = args.concurrency or [1, 16]

    data = prepare(read_ml100k())
    rng = np.random.default_rng(args.seed)
    pairs = data.splits["test"][rng.choice(len(data.splits["test"]), size=args.requests, replace=False)]
    payloads = [
        {"user_id": data.users[int(u)], "k": args.k, "exclude_history": True,
         "history": [data.catalog.item_ids[i] for i in data.history(int(u), int(p))[-10:]]}
        for u, p in pairs
    ]
    port = free_port()
    server = start_server(arms, port, args.max_batch_size)
    base = f"http://127.0.0.1:{port}"
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "k": args.k,
                     "num_beams": 20, "arms": {}}
    try:
        for name in arms:
            measure(base, name, payloads[:2], 1)  # warm-up outside the measurement
            results["arms"][name] = {f"c{c}": measure(base, name, payloads, c) for c in levels}
            for c in levels:
                r = results["arms"][name][f"c{c}"]
                print(f"{name:>10} c={c:<3} p50 {r['latency_ms']['p50']:9.1f} ms  p99 {r['latency_ms']['p99']:9.1f} ms"
                      f"  {r['throughput_rps']:7.2f} req/s", flush=True)
        models = httpx.get(f"{base}/v1/models").json()
        results["params"] = {a["arm"]: a["params"] for a in models["arms"]}
    finally:
        server.terminate()
        server.wait(timeout=30)
    names = list(arms)
    if len(names) >= 2:
        a, b = names[0], names[1]
        results["ratios"] = {
            f"c{c}": {
                "speedup_p50": results["arms"][a][f"c{c}"]["latency_ms"]["p50"] / results["arms"][b][f"c{c}"]["latency_ms"]["p50"],
                "throughput_gain": results["arms"][b][f"c{c}"]["throughput_rps"] / results["arms"][a][f"c{c}"]["throughput_rps"],
            }
            for c in levels
        }
        print(json.dumps(results["ratios"], indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
