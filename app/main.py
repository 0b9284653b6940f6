"""The FastAPI application: recommendation, feedback, A/B report, admin, health and metrics (DESIGN.md §6).

    GET  /healthz             alive
    GET  /readyz              200 once every arm is loaded and warmed up, 503 before
    POST /v1/recommend        {user_id, history, k, exclude_history} -> items, arm, model version
    POST /v1/feedback         {request_id, item_id, event} for a served list
    GET  /v1/models           arms with parameter counts and offline metrics
    GET  /v1/ab/report        per-arm counts, CTR with a 95% interval, latency percentiles, split
    POST /admin/weights       change traffic weights        (bearer token)
    POST /admin/reload/{arm}  reload an arm's artifact      (bearer token)
    GET  /metrics             Prometheus
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.middleware.base import BaseHTTPMiddleware

from app.ab import Experiment, assign
from app.batching import MicroBatcher
from app.registry import Registry
from app.settings import Settings
from app.telemetry import CONTENT_TYPE_LATEST, Telemetry
from recdata.catalog import UnknownItemsError

logger = logging.getLogger(__name__)

FORCE_ARM_HEADER = "X-Prunerec-Arm"


class RecommendRequest(BaseModel):
    user_id: str = Field(min_length=1, max_length=256, description="Stable user id (drives A/B assignment).")
    history: list[str | int] = Field(description="Past items, oldest first: catalog item ids or exact titles.")
    k: int = Field(10, description="Items to return.")
    exclude_history: bool = Field(True, description="Never recommend an item of the history.")


class Item(BaseModel):
    item_id: str
    title: str
    score: float


class RecommendResponse(BaseModel):
    request_id: str
    user_id: str
    arm: str
    model_version: str
    items: list[Item]


class FeedbackRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=64)
    item_id: str = Field(min_length=1, max_length=256)
    event: Literal["click", "purchase"]


class WeightsRequest(BaseModel):
    weights: dict[str, float]


class State:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings)
        self.telemetry = Telemetry()
        self.experiment = Experiment()
        self.weights = settings.effective_weights() if settings.models else {}
        self.batchers: dict[str, MicroBatcher] = {}
        self.ready = False
        self.served: OrderedDict[str, tuple[str, str, set[str]]] = OrderedDict()  # request -> (arm, version, items)
        self.shadow_tasks: set[asyncio.Task] = set()
        # Every model operation of the process (loading, warm-up, reloads, decoding of every arm) runs on this
        # one thread. With torch's CPU thread pool, a second thread running torch ops made decoding about
        # 1.7x slower (measured on 2 cores: pruned model, top-10, 20 beams: 232 ms on one thread, 400-470
        # ms once another thread had run the model); one thread also means arms never compete for the cores.
        # A reload therefore holds back decoding while it loads.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def batcher(self, arm: str) -> MicroBatcher:
        if arm not in self.batchers:
            version = lambda: self.registry.arms[arm].version  # noqa: E731
            self.batchers[arm] = MicroBatcher(
                lambda: self.registry.decode_fn(arm),
                self.model_thread,
                self.settings.max_batch_size,
                self.settings.max_wait_ms,
                on_batch=lambda n: self.telemetry.batch_size.labels(arm, version()).observe(n),
            )
        return self.batchers[arm]

    def remember(self, request_id: str, arm: str, version: str, items: list[str]) -> None:
        self.served[request_id] = (arm, version, set(items))
        while len(self.served) > 100_000:
            self.served.popitem(last=False)


class BodyLimit(BaseHTTPMiddleware):
    """413 for bodies over the limit (declared or streamed)."""

    def __init__(self, app, limit: int) -> None:
        super().__init__(app)
        self.limit = limit

    async def dispatch(self, request: Request, call_next):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        if request.method in ("POST", "PUT", "PATCH") and declared is None:
            body = await request.body()
            if len(body) > self.limit:
                return JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        return await call_next(request)


def get_state(request: Request) -> State:
    return request.app.state.prunerec


StateDep = Annotated[State, Depends(get_state)]


def require_admin(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> None:
    token = state.settings.admin_token
    if not token:
        raise HTTPException(403, "admin routes are disabled: no admin token is configured")
    if authorization != f"Bearer {token}":
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = State(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(state.model_thread, state.registry.load_all)
        if settings.warmup:
            await loop.run_in_executor(state.model_thread, state.registry.warm_up)
        state.ready = True
        logger.info("ready: arms %s, weights %s, shadow %s", list(state.registry.arms), state.weights, settings.shadow)
        yield
        for batcher in state.batchers.values():
            await batcher.stop()
        state.model_thread.shutdown(wait=False)

    app = FastAPI(title="prunerec", version="0.1.0", lifespan=lifespan)
    app.state.prunerec = state
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"where": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]} for e in exc.errors()]
        return JSONResponse({"detail": "invalid request", "problems": problems}, status_code=422)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz(state: StateDep) -> JSONResponse:
        body = {"ready": state.ready, "arms": {n: a.version for n, a in state.registry.arms.items()}}
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(
        body: RecommendRequest, response: Response, state: StateDep,
        x_prunerec_arm: Annotated[str | None, Header()] = None,
    ) -> RecommendResponse:
        if not state.ready:
            raise HTTPException(503, "the service is still loading its models")
        s = state.settings
        if not 1 <= body.k <= s.max_k:
            raise HTTPException(422, f"k must be between 1 and {s.max_k}, got {body.k}")
        if not body.history:
            raise HTTPException(422, "history is empty: send at least one past item")
        if len(body.history) > s.max_history:
            raise HTTPException(422, f"history has {len(body.history)} items, at most {s.max_history} are accepted")
        if x_prunerec_arm is not None:
            if x_prunerec_arm not in state.registry.arms:
                raise HTTPException(422, f"unknown arm {x_prunerec_arm!r} in {FORCE_ARM_HEADER}; arms: {sorted(state.registry.arms)}")
            arm_name = x_prunerec_arm
        else:
            arm_name = assign(body.user_id, state.weights, s.salt)
        arm = state.registry.arms[arm_name]
        catalog = arm.recommender.catalog
        try:
            history = catalog.resolve(str(h) for h in body.history)
        except UnknownItemsError as exc:
            raise HTTPException(422, {"message": "unknown items in history", "unknown": exc.missing}) from None
        if body.k > len(catalog) - (len(set(history)) if body.exclude_history else 0):
            raise HTTPException(422, "k is larger than the number of items that can be recommended")
        exclude = history if body.exclude_history else []
        version = arm.version
        started = time.perf_counter()
        try:
            ranked = await state.batcher(arm_name).submit(history, body.k, exclude)
        except Exception:
            state.telemetry.errors.labels(arm_name, version, "decode").inc()
            state.experiment.record_request(arm_name, 0.0, ok=False)
            raise
        elapsed = time.perf_counter() - started
        state.telemetry.requests.labels(arm_name, version).inc()
        state.telemetry.latency.labels(arm_name, version).observe(elapsed)
        state.experiment.record_request(arm_name, elapsed * 1000, ok=True)
        request_id = uuid.uuid4().hex
        items = [Item(item_id=catalog.item_ids[i], title=catalog.titles[i], score=score) for i, score in ranked]
        state.remember(request_id, arm_name, version, [i.item_id for i in items])
        if s.shadow and s.shadow != arm_name and s.shadow in state.registry.arms:
            task = asyncio.create_task(_shadow(state, s.shadow, body))
            state.shadow_tasks.add(task)
            task.add_done_callback(state.shadow_tasks.discard)
        response.headers[FORCE_ARM_HEADER] = arm_name
        response.headers["X-Prunerec-Model-Version"] = version
        response.headers["X-Request-Id"] = request_id
        return RecommendResponse(request_id=request_id, user_id=body.user_id, arm=arm_name, model_version=version, items=items)

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, state: StateDep) -> dict:
        served = state.served.get(body.request_id)
        if served is None:
            raise HTTPException(404, f"no served list with request_id {body.request_id!r}")
        arm, version, items = served
        if body.item_id not in items:
            raise HTTPException(422, f"item {body.item_id!r} was not in the list served as {body.request_id!r}")
        state.experiment.record_feedback(arm, body.event)
        state.telemetry.feedback.labels(arm, version, body.event).inc()
        return {"recorded": True, "arm": arm}

    @app.get("/v1/models")
    async def models(state: StateDep) -> dict:
        return {"arms": [a.describe() for a in state.registry.arms.values()], "weights": state.weights,
                "shadow": state.settings.shadow}

    @app.get("/v1/ab/report")
    async def report(state: StateDep) -> dict:
        return {**state.experiment.report(state.weights), "salt": state.settings.salt}

    @app.post("/admin/weights", dependencies=[Depends(require_admin)])
    async def set_weights(body: WeightsRequest, state: StateDep) -> dict:
        unknown = set(body.weights) - set(state.registry.arms)
        if unknown:
            raise HTTPException(422, f"unknown arms: {sorted(unknown)}")
        if any(w < 0 for w in body.weights.values()) or sum(body.weights.values()) <= 0:
            raise HTTPException(422, "weights must be non-negative and not all zero")
        total = sum(body.weights.values())
        state.weights = {a: w / total for a, w in body.weights.items()}
        return {"weights": state.weights}

    @app.post("/admin/reload/{arm}", dependencies=[Depends(require_admin)])
    async def reload(arm: str, state: StateDep) -> JSONResponse:
        if arm not in state.registry.arms:
            raise HTTPException(404, f"unknown arm {arm!r}")
        loop = asyncio.get_running_loop()
        try:
            reloaded = await loop.run_in_executor(state.model_thread, state.registry.reload, arm)
        except Exception as exc:
            current = state.registry.arms[arm]
            return JSONResponse(
                {"reloaded": False, "error": f"{type(exc).__name__}: {exc}", "serving": current.version},
                status_code=409,
            )
        return JSONResponse({"reloaded": True, "version": reloaded.version})

    @app.get("/metrics")
    async def metrics(state: StateDep) -> Response:
        return Response(state.telemetry.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _shadow(state: State, arm_name: str, body: RecommendRequest) -> None:
    """The challenger answers a copy of the request; the answer is logged and counted, never returned."""
    arm = state.registry.arms[arm_name]
    started = time.perf_counter()
    try:
        history = arm.recommender.catalog.resolve(str(h) for h in body.history)
        ranked = await state.batcher(arm_name).submit(history, body.k, history if body.exclude_history else [])
    except Exception:
        state.experiment.record_request(arm_name, 0.0, ok=False, shadow=True)
        logger.exception("shadow arm %s failed", arm_name)
        return
    elapsed = (time.perf_counter() - started) * 1000
    state.experiment.record_request(arm_name, elapsed, ok=True, shadow=True)
    state.telemetry.shadow.labels(arm_name, arm.version).inc()
    logger.info("shadow %s user=%s items=%s", arm_name, body.user_id, [arm.recommender.catalog.item_ids[i] for i, _ in ranked])
