"""The API contract through TestClient: answers, headers, A/B, shadow, feedback, admin, bad input, metrics."""

from __future__ import annotations

import json
import math
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
    assert {"prunerec_requests", "prunerec_request_latency_seconds", "prunerec_batch_size",
            "prunerec_started_without_wait"} <= set(families)
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
    """Shared mode: loading, warm-up, decoding of both arms (one as shadow) and a reload all run on the one model thread
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
    settings = Settings(models=arms, weights={"dense": 1.0}, shadow="pruned", admin_token=TOKEN, model_threads="shared")
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


def test_parallel_batches_serve_the_lists_of_one_batch_at_a_time(arms):
    """PRUNEREC_PARALLEL_BATCHES=2 through the app: concurrent requests get the lists the one-batch service gives."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"user_id": f"u{i}", "history": [f"i{i + 1}", f"i{i + 2}"], "k": 3} for i in range(6)]
    answers = {}
    for parallel in (1, 2):
        settings = Settings(models={"pruned": arms["pruned"]}, parallel_batches=parallel, max_wait_ms=20)
        with serving(create_app(settings)) as client, ThreadPoolExecutor(max_workers=6) as pool:
            responses = list(pool.map(lambda body: client.post("/v1/recommend", json=body), bodies))
            assert all(r.status_code == 200 for r in responses)
            answers[parallel] = [[item["item_id"] for item in r.json()["items"]] for r in responses]
    assert answers[2] == answers[1]


def test_duplicate_feedback_counts_once_and_the_report_keeps_answering(client):
    served = client.post("/v1/recommend", json={"user_id": "dup", "history": ["i2"], "k": 3}).json()
    item = served["items"][0]["item_id"]
    click = {"request_id": served["request_id"], "item_id": item, "event": "click"}
    assert client.post("/v1/feedback", json=click).json()["recorded"] is True
    assert client.post("/v1/feedback", json=click).json()["recorded"] is False
    report = client.get("/v1/ab/report")
    assert report.status_code == 200
    arm = report.json()["arms"][served["arm"]]
    assert arm["clicked_lists"] <= arm["served_lists"] and 0 <= arm["ctr"] <= 1


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-Infinity", "1e308", "-1", "true", '"1"'])
def test_admin_weights_refuse_non_finite_huge_and_non_numbers(client, weight):
    auth = {"Authorization": f"Bearer {TOKEN}", **JSON}
    body = '{"weights": {"dense": WEIGHT, "pruned": 1}}'.replace("WEIGHT", weight)
    response = client.post("/admin/weights", content=body, headers=auth)
    assert response.status_code == 422, response.text
    assert client.get("/v1/models").json()["weights"] == {"dense": 0.5, "pruned": 0.5}
    zero = client.post("/admin/weights", json={"weights": {"dense": 0, "pruned": 0}}, headers=auth)
    assert zero.status_code == 422 and "zero" in zero.text


def test_a_chunked_body_over_the_limit_is_refused_without_reading_it_all(client):
    sent = []

    def chunks():
        for _ in range(10_000):  # 10 MB if it were all read
            sent.append(1)
            yield b"x" * 1024

    response = client.post("/v1/recommend", content=chunks(), headers=JSON)
    assert response.status_code == 413 and "over 65536 bytes" in response.json()["detail"]


def test_the_body_limit_reads_no_more_than_the_limit():
    import asyncio

    from app.middleware import BodyLimit

    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    async def send(message):
        sent.append(message)

    async def never_called(scope, receive, send):
        raise AssertionError("the app must not see an oversized body")

    scope = {"type": "http", "method": "POST", "headers": [(b"transfer-encoding", b"chunked")]}
    asyncio.run(BodyLimit(never_called, limit=8 * 1024)(scope, receive, send))
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert len(reads) == 9  # 8 KiB allowed, the 9th KiB passes the limit: nothing more is read


def test_a_reload_whose_config_does_not_match_its_weights_fails_and_keeps_serving(arms, tmp_path):
    import json as jsonlib

    copy = shutil.copytree(arms["pruned"], tmp_path / "pruned")
    settings = Settings(models={"dense": arms["dense"], "pruned": str(copy)}, admin_token=TOKEN)
    with serving(create_app(settings)) as client:
        before = client.post("/v1/recommend", json={"user_id": "z", "history": ["i1"], "k": 3}, headers={"X-Prunerec-Arm": "pruned"}).json()
        config = jsonlib.loads((copy / "config.json").read_text())
        config["num_hidden_layers"] += 2
        if "layer_types" in config:
            config["layer_types"] += config["layer_types"][:2]
        (copy / "config.json").write_text(jsonlib.dumps(config))
        failed = client.post("/admin/reload/pruned", headers={"Authorization": f"Bearer {TOKEN}"})
        assert failed.status_code == 409 and "do not match" in failed.json()["error"]
        assert failed.json()["serving"] == before["model_version"]
        after = client.post("/v1/recommend", json={"user_id": "z", "history": ["i1"], "k": 3}, headers={"X-Prunerec-Arm": "pruned"}).json()
        assert after["items"] == before["items"]


def test_readiness_is_503_while_loading_and_requests_get_503_with_retry_after(arms, monkeypatch):
    import threading

    from fastapi.testclient import TestClient

    from llmrec.recommender import Recommender

    gate = threading.Event()
    load = Recommender.from_artifact.__func__

    def slow_load(cls, *args, **kwargs):
        gate.wait(30)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Recommender, "from_artifact", classmethod(slow_load))
    with TestClient(create_app(Settings(models=arms))) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        early = client.post("/v1/recommend", json={"user_id": "u", "history": ["i1"], "k": 3})
        assert early.status_code == 503 and early.headers["Retry-After"] and "loading" in early.json()["detail"]
        gate.set()
        for _ in range(300):
            if client.get("/readyz").status_code == 200:
                break
            import time

            time.sleep(0.05)
        assert client.post("/v1/recommend", json={"user_id": "u", "history": ["i1"], "k": 3}).status_code == 200


def test_a_failed_load_is_reported_by_readyz_and_the_callback(arms, tmp_path):
    from fastapi.testclient import TestClient

    failures = []
    settings = Settings(models={"dense": str(tmp_path / "missing")})
    with TestClient(create_app(settings, on_load_failure=failures.append)) as client:
        import time

        for _ in range(200):
            if failures:
                break
            time.sleep(0.02)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "missing" in ready.json()["error"] and len(failures) == 1


def _slow_decoding(monkeypatch, seconds: float):
    import time

    from llmrec.recommender import Recommender

    recommend = Recommender.recommend

    def slow(self, *args, **kwargs):
        time.sleep(seconds)
        return recommend(self, *args, **kwargs)

    monkeypatch.setattr(Recommender, "recommend", slow)


def test_overload_gets_503_with_retry_after_and_is_counted(arms, monkeypatch):
    """A full queue and a deadline the queue cannot meet both get 503 at once; neither is decoded."""
    from concurrent.futures import ThreadPoolExecutor

    settings = Settings(models={"pruned": arms["pruned"]}, max_queue=1, max_batch_size=1, max_wait_ms=0, warmup=False)
    with serving(create_app(settings)) as client:
        _slow_decoding(monkeypatch, 0.5)
        body = {"user_id": "u", "history": ["i1"], "k": 3}
        assert client.post("/v1/recommend", json=body).status_code == 200  # times a batch: ~0.5 s
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(lambda i: client.post("/v1/recommend", json={**body, "deadline_ms": 300 if i == 0 else 20_000}), range(6)))
        statuses = [a.status_code for a in answers]
        assert statuses[0] == 503 and answers[0].json()["reason"] in ("queue_full", "deadline")  # 0.3 s < one batch
        assert 200 in statuses and statuses.count(503) >= 3  # one decoding, one queued, the rest refused
        for answer in answers:
            if answer.status_code == 503:
                assert int(answer.headers["Retry-After"]) >= 1 and answer.json()["reason"] in ("queue_full", "deadline")
        batcher = client.app.state.prunerec.batchers["pruned"]
        assert batcher.stats.decoded == 1 + statuses.count(200) and not batcher.stats.finished_abandoned
        text = client.get("/metrics").text
        assert 'prunerec_shed_total{arm="pruned"' in text and "prunerec_queue_depth" in text
        report = client.get("/v1/ab/report").json()["arms"]["pruned"]
        assert sum(report["shed"].values()) == statuses.count(503)


def test_a_request_past_its_deadline_is_answered_at_the_deadline_and_never_decoded(arms, monkeypatch):
    import time

    settings = Settings(models={"pruned": arms["pruned"]}, max_batch_size=1, max_wait_ms=0, warmup=False)
    with serving(create_app(settings)) as client:
        _slow_decoding(monkeypatch, 1.0)
        from concurrent.futures import ThreadPoolExecutor

        body = {"user_id": "u", "history": ["i1"], "k": 3}
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(client.post, "/v1/recommend", json=body)  # no batch timed yet: admitted, decodes 1 s
            time.sleep(0.2)
            second = client.post("/v1/recommend", json={**body, "deadline_ms": 400})
            answered_first = not first.done()  # at its deadline, before the batch ahead of it ended
            assert first.result().status_code == 200
        assert second.status_code == 503 and second.json()["reason"] == "deadline" and answered_first
        time.sleep(1.2)
        assert client.app.state.prunerec.batchers["pruned"].stats.decoded == 1


def test_the_openapi_document_states_the_limits_and_every_status():
    settings = Settings(max_k=7, max_history=30)
    schema = create_app(settings).openapi()
    components = schema["components"]["schemas"]
    request = components["RecommendRequest"]["properties"]
    assert request["k"]["maximum"] == 7 and request["k"]["minimum"] == 1
    assert request["history"]["minItems"] == 1 and request["history"]["maxItems"] == 30
    assert components["RecommendRequest"]["additionalProperties"] is False
    recommend = schema["paths"]["/v1/recommend"]["post"]["responses"]
    assert {"200", "400", "413", "422", "503"} <= set(recommend)
    assert recommend["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert components["ErrorBody"]["properties"]["detail"]["type"] == "string"
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    reload = schema["paths"]["/admin/reload/{arm}"]["post"]["responses"]
    assert {"200", "401", "403", "404", "409"} <= set(reload)
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_per_arm_model_threads_load_both_arms_intact_and_decode_apart(arms, monkeypatch):
    """Per-arm threads: each arm decodes on its own thread; loading stays one at a time (two concurrent
    loads once left a tied lm_head randomly initialised, which the loader now refuses)."""
    import threading

    from llmrec.recommender import Recommender

    threads: dict[str, set[str]] = {}
    recommend = Recommender.recommend

    def recording(self, *args, **kwargs):
        threads.setdefault(self.manifest["stage"], set()).add(threading.current_thread().name)
        return recommend(self, *args, **kwargs)

    monkeypatch.setattr(Recommender, "recommend", recording)
    with serving(create_app(Settings(models=arms, model_threads="per-arm"))) as client:
        for arm in ("dense", "pruned"):
            answer = client.post("/v1/recommend", json={"user_id": "u", "history": ["i1"], "k": 3}, headers={"X-Prunerec-Arm": arm})
            assert answer.status_code == 200
    assert threads == {"finetune": {"model-dense_0"}, "depth": {"model-pruned_0"}}


def test_a_service_under_the_trie_head_answers_with_item_probabilities(arms):
    """PRUNEREC_HEAD=trie: k distinct items whose scores are log-probabilities over the catalog (each ≤ 0, their
    probabilities summing to at most 1)."""
    settings = Settings(models=arms, head="trie", max_history=20, max_k=10)
    with serving(create_app(settings)) as c:
        response = c.post("/v1/recommend", json={"user_id": "u1", "history": ["i1", "Babe (1995)"], "k": 5})
    assert response.status_code == 200, response.text
    scores = [item["score"] for item in response.json()["items"]]
    assert len(scores) == 5 and all(s <= 1e-6 for s in scores)
    assert sum(math.exp(s) for s in scores) <= 1 + 1e-4
