"""Fuzz the API from its own OpenAPI document (schemathesis): no server errors, every response as documented.

The cases come from the schema of an app with this test's limits; they are sent over HTTP to a uvicorn server,
in a thread of this process, of an app with the same limits whose arms are loaded (schemathesis's own ASGI
transport would not run the app's lifespan, and its checks send probes of their own, e.g. without the token). Admin routes get the bearer token in positive cases
(negative ones may leave it out on purpose: 401 is then the answer). Seeded and bounded, so CI runs the same cases every time.
"""

from __future__ import annotations

import pytest
import schemathesis
from conftest import TITLES
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from app.settings import Settings

TOKEN = "fuzz-token"
LIMITS = {"max_k": 10, "max_history": 20, "max_deadline_ms": 30_000, "request_timeout_ms": 20_000}



ARMS = {"dense": "unused", "pruned": "unused"}  # the schema names the arms; nothing is loaded for it
DOCUMENT = create_app(Settings(models=ARMS, **LIMITS)).openapi()
# History items narrowed to references of the test catalog (tests/conftest.py: ids i0..i19 and its titles)
# and one unknown item, so that the fuzzer reaches decoding rather than only the unknown-item 422.
DOCUMENT["components"]["schemas"]["RecommendRequest"]["properties"]["history"]["items"] = {
    "enum": [*(f"i{n}" for n in range(20)), *TITLES[:5], 7, "no-such-item"],
}
schema = schemathesis.openapi.from_dict(DOCUMENT)

# A schema-valid request may still be refused for what only the data can tell: history items that are not in
# the catalog, a k above what is left once the history is excluded, all-zero weights, feedback for an item
# that was not served. schemathesis's positive_data_acceptance check would count those 422s as mismatches;
# it is replaced by this stricter rule: a schema-valid request gets 422 only with one of these reasons.
# Likewise not_a_server_error counts every 5xx; a deadline_ms shorter than decoding takes (the fuzzer likes
# 5e-324) is answered 503 with Retry-After by design, so the rule here is: no 5xx but that documented 503.
SEMANTIC_422 = ("unknown items in history", "k is larger than the number of items", "must not all be zero",
                "was not in the list served")


@pytest.fixture(scope="module")
def base_url(arms):
    import socket
    import threading

    import uvicorn

    from bench.harness import wait_ready

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(Settings(models=arms, admin_token=TOKEN, **LIMITS))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    assert wait_ready(url, 120, alive=thread.is_alive, poll=0.05), "the server did not become ready"
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@schema.parametrize()
@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_answers_as_documented(case, base_url):
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if case.path.startswith("/admin") and positive:  # negative cases may leave the token out on purpose
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
    response = case.call_and_validate(base_url=base_url, excluded_checks=[positive_data_acceptance, not_a_server_error])
    if response.status_code >= 500:  # only the documented overload answer: a deadline too short to decode in
        assert response.status_code == 503 and response.headers.get("retry-after"), response.text
        assert response.json()["reason"] in ("deadline", "queue_full"), response.text
    if positive and response.status_code == 422:
        assert response.json()["detail"].startswith(SEMANTIC_422) or any(r in response.json()["detail"] for r in SEMANTIC_422), \
            f"schema-valid request refused: {response.text}"
