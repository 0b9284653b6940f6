"""The API contract through TestClient: answers, headers, A/B, shadow, feedback, admin, bad input, metrics."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import BAD_INPUTS, JSON, serving
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings

TOKEN = "secret-token"


@pytest.fixture()
def client(arms):
    settings = Settings(models=arms, admin_token=TOKEN, max_history=20, max_k=10)
    with serving(create_app(settings)) as c:
        yield c


def test_health_ready_and_models(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and set(ready.json()["arms"]) == {"dense", "pruned"}
    models = client.get("/v1/models").json()
    assert {a["arm"] for a in models["arms"]} == {"dense", "pruned"}
    assert all(a["params"]["total"] > 0 for a in models["arms"])


def test_recommend_returns_k_items_with_arm_and_version(client, prepared):
    response = client.post("/v1/recommend", json={"user_id": "u1", "history": ["i1", "Babe (1995)"], "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["items"]) == 5 and len({i["item_id"] for i in body["items"]}) == 5
    assert not {"i1", "i6"} & {i["item_id"] for i in body["items"]}
    assert response.headers["X-Prunerec-Arm"] == body["arm"] and response.headers["X-Prunerec-Model-Version"] == body["model_version"]
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    forced = client.post("/v1/recommend", json={"user_id": "u1", "history": ["i1"], "k": 3}, headers={"X-Prunerec-Arm": "pruned"})
    assert forced.json()["arm"] == "pruned"
    again = client.post("/v1/recommend", json={"user_id": "u1", "history": ["i1", "Babe (1995)"], "k": 5})
    assert again.json()["arm"] == body["arm"] and again.json()["items"] == body["items"]




@pytest.mark.parametrize(("payload", "status", "needle"), BAD_INPUTS)
def test_bad_input_gets_a_4xx_that_names_the_problem(client, payload, status, needle):
    response = client.post("/v1/recommend", content=json.dumps(payload), headers=JSON)
    assert response.status_code == status
    assert needle in response.text


def test_malformed_json_oversized_body_and_unknown_arm(client):
    response = client.post("/v1/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.text
    big = {"user_id": "u", "history": ["i1"] * 20000, "k": 3}
    assert client.post("/v1/recommend", json=big).status_code == 413
    response = client.post("/v1/recommend", json={"user_id": "u", "history": ["i1"], "k": 3}, headers={"X-Prunerec-Arm": "zzz"})
    assert response.status_code == 422 and "unknown arm" in response.text


def test_feedback_and_report(client):
    served = client.post("/v1/recommend", json={"user_id": "u9", "history": ["i2"], "k": 3}).json()
    item = served["items"][0]["item_id"]
    ok = client.post("/v1/feedback", json={"request_id": served["request_id"], "item_id": item, "event": "click"})
    assert ok.status_code == 200 and ok.json()["arm"] == served["arm"]
    assert client.post("/v1/feedback", json={"request_id": "nope", "item_id": item, "event": "click"}).status_code == 404
    wrong = client.post("/v1/feedback", json={"request_id": served["request_id"], "item_id": "i999", "event": "click"})
    assert wrong.status_code == 422
    assert client.post("/v1/feedback", json={"request_id": served["request_id"], "item_id": item, "event": "like"}).status_code == 422
    report = client.get("/v1/ab/report").json()
    arm = report["arms"][served["arm"]]
    assert arm["feedback"]["click"] == 1 and arm["requests"] >= 1 and 0 <= arm["ctr_ci95"][0] <= arm["ctr"] <= arm["ctr_ci95"][1]


def test_admin_needs_the_token_and_a_failed_reload_keeps_serving(client, arms, tmp_path):
    assert client.post("/admin/weights", json={"weights": {"dense": 1, "pruned": 0}}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post("/admin/weights", json={"weights": {"dense": 1}}, headers=wrong).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/admin/weights", json={"weights": {"dense": 1, "pruned": 0}}, headers=auth).status_code == 200
    assert {client.post("/v1/recommend", json={"user_id": f"x{i}", "history": ["i1"], "k": 2}).json()["arm"] for i in range(20)} == {"dense"}
    assert client.post("/admin/weights", json={"weights": {"ghost": 1}}, headers=auth).status_code == 422
    assert client.post("/admin/reload/pruned", headers=wrong).status_code == 401
    assert client.post("/admin/reload/pruned", headers=auth).json()["reloaded"] is True
    # break the artifact on disk: the reload fails, the old model keeps answering
    state = client.app.state.prunerec
    state.registry.arms["pruned"].path = str(tmp_path / "missing")
    failed = client.post("/admin/reload/pruned", headers=auth)
    assert failed.status_code == 409 and failed.json()["reloaded"] is False
    forced = client.post("/v1/recommend", json={"user_id": "z", "history": ["i1"], "k": 2}, headers={"X-Prunerec-Arm": "pruned"})
    assert forced.status_code == 200
    models = client.get("/v1/models").json()["arms"]
    assert next(a for a in models if a["arm"] == "pruned")["last_reload_error"]
    state.registry.arms["pruned"].path = arms["pruned"]
    assert shutil  # imported for symmetry with the process tests


def test_metrics_parse_with_prometheus_parser(client):
    client.post("/v1/recommend", json={"user_id": "m", "history": ["i1"], "k": 2})
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"prunerec_requests", "prunerec_request_latency_seconds", "prunerec_batch_size"} <= set(families)
    labels = [s.labels for s in families["prunerec_requests"].samples]
    assert any("arm" in label and "version" in label for label in labels)


def test_shadow_answers_are_never_returned(arms):
    settings = Settings(models=arms, weights={"dense": 1.0}, shadow="pruned")
    with serving(create_app(settings)) as client:
        for i in range(5):
            assert client.post("/v1/recommend", json={"user_id": f"s{i}", "history": ["i1"], "k": 3}).json()["arm"] == "dense"
        import time

        for _ in range(50):
            if client.get("/v1/ab/report").json()["shadow"].get("pruned", {}).get("requests", 0) >= 5:
                break
            time.sleep(0.1)
        report = client.get("/v1/ab/report").json()
        assert report["shadow"]["pruned"]["requests"] >= 5 and report["arms"].get("pruned", {}).get("requests", 0) == 0


def test_every_model_operation_runs_on_one_thread(arms, monkeypatch):
    """Loading, warm-up, decoding of both arms (one as shadow) and a reload all run on the one model thread
    (torch ops from a second thread slowed CPU decoding ~1.7x)."""
    import threading

    from llmrec.recommender import Recommender

    threads: list[tuple[str, str]] = []
    load, recommend = Recommender.from_artifact.__func__, Recommender.recommend

    def recording_load(cls, *args, **kwargs):
        threads.append(("load", threading.current_thread().name))
        return load(cls, *args, **kwargs)

    def recording_recommend(self, *args, **kwargs):
        threads.append(("recommend", threading.current_thread().name))
        return recommend(self, *args, **kwargs)

    monkeypatch.setattr(Recommender, "from_artifact", classmethod(recording_load))
    monkeypatch.setattr(Recommender, "recommend", recording_recommend)
    settings = Settings(models=arms, weights={"dense": 1.0}, shadow="pruned", admin_token=TOKEN)
    with serving(create_app(settings)) as client:
        for i in range(3):
            assert client.post("/v1/recommend", json={"user_id": f"t{i}", "history": ["i1"], "k": 3}).status_code == 200
        assert client.post("/admin/reload/dense", headers={"Authorization": f"Bearer {TOKEN}"}).json()["reloaded"] is True
        import time

        for _ in range(50):
            if client.get("/v1/ab/report").json()["shadow"].get("pruned", {}).get("requests", 0) >= 3:
                break
            time.sleep(0.1)
    kinds = {kind for kind, _ in threads}
    names = {name for _, name in threads}
    assert kinds == {"load", "recommend"} and len([k for k, _ in threads if k == "load"]) == 3  # 2 arms + reload
    assert len(names) == 1 and names != {threading.main_thread().name}


def test_torch_threads_setting_applies_to_the_model_thread(arms):
    import torch

    settings = Settings(models=arms, torch_threads=1)
    with serving(create_app(settings)) as client:
        state = client.app.state.prunerec
        assert state.registry.executor("dense").submit(torch.get_num_threads).result() == 1
        assert client.post("/v1/recommend", json={"user_id": "u", "history": ["i1"], "k": 3}).status_code == 200
    with pytest.raises(ValueError):
        Settings(models=arms, torch_threads=0)
