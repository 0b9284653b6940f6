"""A real uvicorn process on 127.0.0.1: concurrency and batching, stickiness, bad input, auth, reload, metrics."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import BAD_INPUTS, JSON
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "t0ken"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(arms: dict[str, str], *extra: str):
    port = free_port()
    command = [sys.executable, "-m", "cli", "serve", "--port", str(port), "--admin-token", TOKEN,
               "--max-batch-size", "16", "--max-wait-ms", "50", *extra]
    for name, path in arms.items():
        command += ["--models", f"{name}={path}"]
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
    return process, base


def stop(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def server(arms, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    pruned = shutil.copytree(arms["pruned"], root / "pruned")  # a copy this test may break
    # the longest default deadline: these tests are about batching and answers, and the 30-second default could
    # refuse some of 64 concurrent requests on a CI machine starved by other work (seen once, 2026-11-27); the
    # refusal itself is tested below with a deadline asked for
    process, base = launch({"dense": arms["dense"], "pruned": str(pruned)}, "--request-timeout-ms", "120000")
    yield {"base": base, "pruned": pruned}
    stop(process)


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
    for payload, status, needle in BAD_INPUTS:
        if payload.get("k") == 11 or payload.get("history") == ["i1"] * 21:
            continue  # these limits differ in this server's settings (max_k 50, max_history 200)
        response = httpx.post(f"{base}/v1/recommend", content=json.dumps(payload), headers=JSON, timeout=60)
        assert response.status_code == status and needle in response.text, (payload, response.text)
    assert httpx.post(f"{base}/v1/recommend", json={"user_id": "u", "history": ["i1"], "k": 51}).status_code == 422
    too_long = httpx.post(f"{base}/v1/recommend", json={"user_id": "u", "history": ["i1"] * 201, "k": 3})
    assert too_long.status_code == 422 and "at most 200" in too_long.text
    bad = httpx.post(f"{base}/v1/recommend", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 422
    huge = httpx.post(f"{base}/v1/recommend", content=b"x" * 70000, headers={"content-type": "application/json"})
    assert huge.status_code == 413
    assert httpx.post(f"{base}/admin/weights", json={"weights": {"dense": 1}}).status_code == 401
    wrong = httpx.post(f"{base}/admin/weights", json={"weights": {"dense": 1}}, headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401


def test_failed_reload_keeps_the_old_model(server):
    base = server["base"]
    before = recommend(base, "r", ["i1"], 3, arm="pruned").json()
    (server["pruned"] / "model.safetensors").unlink()
    failed = httpx.post(f"{base}/admin/reload/pruned", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert failed.status_code == 409 and failed.json()["serving"] == before["model_version"]
    after = recommend(base, "r", ["i1"], 3, arm="pruned").json()
    assert after["items"] == before["items"]


def test_shadow_answers_are_logged_never_returned(arms):
    process, base = launch(arms, "--weights", "dense=1", "--weights", "pruned=0", "--shadow", "pruned")
    try:
        answers = [recommend(base, f"sh{i}", ["i1", "i2"], 3).json() for i in range(10)]
        assert {a["arm"] for a in answers} == {"dense"}
        deadline = time.time() + 30
        while time.time() < deadline:
            report = httpx.get(f"{base}/v1/ab/report").json()
            if report["shadow"].get("pruned", {}).get("requests", 0) >= 10:
                break
            time.sleep(0.2)
        assert report["shadow"]["pruned"]["requests"] >= 10
        assert report["arms"].get("pruned", {}).get("requests", 0) == 0
        pruned_alone = recommend(base, "sh0", ["i1", "i2"], 3, arm="pruned").json()
        assert pruned_alone["arm"] == "pruned" and answers[0]["model_version"] != pruned_alone["model_version"]
    finally:
        stop(process)


def test_a_lone_surrogate_gets_422_and_the_connection_stays_usable(server):
    """It once gave 500 and a connection dropped without `Connection: close`, failing the client's next request."""
    base = server["base"]
    with httpx.Client(timeout=60) as client:  # one keep-alive connection
        bad = client.post(f"{base}/v1/recommend", content=b'{"user_id": "u", "history": ["\\ud800"], "k": 3}', headers=JSON)
        assert bad.status_code == 422 and "surrogate" in bad.text
        again = client.post(f"{base}/v1/recommend", json={"user_id": "u", "history": ["i1"], "k": 3})
        assert again.status_code == 200


def test_admission_counters_reach_metrics_over_http(server):
    base = server["base"]
    refused = httpx.post(f"{base}/v1/recommend", json={"user_id": "d", "history": ["i1"], "k": 3, "deadline_ms": 1e-9}, timeout=60)
    assert refused.status_code == 503 and refused.headers["Retry-After"] and refused.json()["reason"] == "deadline"
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
    shed = [s for s in families["prunerec_shed"].samples if s.labels.get("reason") == "deadline"]
    assert sum(s.value for s in shed) >= 1 and "prunerec_queue_depth" in families
