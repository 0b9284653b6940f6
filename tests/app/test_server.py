"""A real uvicorn process on 127.0.0.1: concurrency and batching, stickiness, bad input, auth, reload, metrics."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "t0ken"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(arms, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    pruned = shutil.copytree(arms["pruned"], root / "pruned")  # a copy this test may break
    port = free_port()
    command = [sys.executable, "-m", "pruning.cli", "serve", "--models", f"dense={arms['dense']}", "--models",
               f"pruned={pruned}", "--port", str(port), "--admin-token", TOKEN, "--max-batch-size", "16",
               "--max-wait-ms", "50"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(process.stdout.read() if process.stdout else "server died")
        time.sleep(0.3)
    else:
        process.kill()
        raise RuntimeError("server did not become ready")
    yield {"base": base, "pruned": pruned}
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def recommend(base, user, history, k=5, arm=None):
    headers = {"X-Prunerec-Arm": arm} if arm else {}
    return httpx.post(f"{base}/v1/recommend", json={"user_id": user, "history": history, "k": k}, headers=headers, timeout=60)


def test_64_concurrent_requests_are_batched_and_answered_as_alone(server):
    base = server["base"]
    requests = [(f"c{i}", [f"i{i % 20}", f"i{(i * 7) % 20}"], 1 + i % 5) for i in range(64)]
    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(lambda r: recommend(base, *r), requests))
    assert all(a.status_code == 200 for a in answers)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
    counts = {s.labels["arm"]: s.value for s in families["prunerec_batch_size"].samples if s.name.endswith("_count")}
    sums = {s.labels["arm"]: s.value for s in families["prunerec_batch_size"].samples if s.name.endswith("_sum")}
    assert sum(sums.values()) >= 64 and any(sums[a] / counts[a] > 1.5 for a in counts)  # batches of several requests
    for (user, history, k), answer in zip(requests, answers, strict=True):
        body = answer.json()
        alone = recommend(base, user, history, k, arm=body["arm"]).json()
        assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in alone["items"]]
        assert len(body["items"]) == k


def test_assignment_is_sticky_and_split_near_intended(server):
    base = server["base"]
    arms = [recommend(base, f"user-{i}", ["i1"], 1).json()["arm"] for i in range(200)]
    assert abs(arms.count("pruned") / 200 - 0.5) < 0.12
    assert [recommend(base, f"user-{i}", ["i3"], 1).json()["arm"] for i in range(20)] == arms[:20]
    report = httpx.get(f"{base}/v1/ab/report").json()
    assert report["arms"]["dense"]["intended_share"] == 0.5


def test_bad_input_and_auth_over_http(server):
    base = server["base"]
    assert recommend(base, "u", ["ghost-item"]).status_code == 422
    assert "ghost-item" in recommend(base, "u", ["ghost-item"]).text
    bad = httpx.post(f"{base}/v1/recommend", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 422
    assert httpx.post(f"{base}/admin/weights", json={"weights": {"dense": 1}}).status_code == 401


def test_failed_reload_keeps_the_old_model(server):
    base = server["base"]
    before = recommend(base, "r", ["i1"], 3, arm="pruned").json()
    (server["pruned"] / "model.safetensors").unlink()
    failed = httpx.post(f"{base}/admin/reload/pruned", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert failed.status_code == 409 and failed.json()["serving"] == before["model_version"]
    after = recommend(base, "r", ["i1"], 3, arm="pruned").json()
    assert after["items"] == before["items"]
