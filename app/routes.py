"""The routes (DESIGN.md §6): recommendation, feedback, A/B report, models, admin, health and metrics.

The recommendation route is built per service (:func:`api_router`) because its request model carries the
service's limits (see :mod:`app.schemas`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.responses import PlainTextResponse

from app.ab import NotInListError, UnknownListError, assign
from app.batching import CLIENT_LEFT, DEADLINE, Overloaded
from app.deps import State, StateDep, require_admin, require_ready
from app.middleware import ApiError, AsciiJSONResponse
from app.schemas import (
    ABReport,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    ModelsResponse,
    Readiness,
    RecommendResponse,
    ReloadFailure,
    ReloadResponse,
    WeightsResponse,
    error_responses,
    recommend_request_model,
    weights_request_model,
)
from app.settings import Settings, check_weights
from app.telemetry import CONTENT_TYPE_LATEST
from recdata.catalog import UnknownItemsError

logger = logging.getLogger(__name__)

FORCE_ARM_HEADER = "X-Prunerec-Arm"


def _overloaded(exc: Overloaded) -> ApiError:
    return ApiError(503, str(exc), headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))}, reason=exc.reason)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _decode(state: State, arm: str, request: Request, history: list[int], k: int, exclude: list[int],
                  deadline: float) -> list[tuple[int, float]]:
    """Queue a request and wait for its list, its deadline or its client leaving, whichever comes first."""
    version = state.registry.arms[arm].version
    loop = asyncio.get_running_loop()
    try:
        job = state.batcher(arm).submit(history, k, exclude, deadline)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({job.future, gone}, timeout=max(0.0, deadline - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():
            reason = CLIENT_LEFT if gone.done() and not gone.cancelled() else DEADLINE
            job.abandon(reason)
            raise Overloaded(reason, "the deadline passed before the list was ready" if reason == DEADLINE else
                             "the client left", retry_after=state.batcher(arm).estimated_wait())
        return job.future.result()
    except Overloaded as exc:
        state.telemetry.shed.labels(arm, version, exc.reason).inc()
        state.experiment.record_shed(arm, exc.reason)
        raise _overloaded(exc) from None


def api_router(settings: Settings) -> APIRouter:
    router = APIRouter()
    arm_enum: Any = {"enum": sorted(settings.models)} if settings.models else None
    ArmName = Annotated[str, Path(min_length=1, max_length=256, json_schema_extra=arm_enum)]
    ForceArm = Annotated[str | None, Header(description="Force an arm (debugging); default: sticky A/B assignment.",
                                            json_schema_extra=arm_enum)]
    WeightsRequest = weights_request_model(list(settings.models))
    RecommendRequest = recommend_request_model(settings.max_k, settings.max_history, settings.request_timeout_ms,
                                               settings.max_deadline_ms)

    @router.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> dict:
        """Alive (answers while the models load, too)."""
        return {"status": "alive"}

    @router.get("/readyz", response_model=Readiness, tags=["ops"],
                responses={503: {"model": Readiness, "description": "Still loading, or loading failed"}})
    async def readyz(state: StateDep) -> AsciiJSONResponse:
        """200 once every arm is loaded and warmed up; 503 before (the port is open while loading)."""
        body = {"ready": state.ready, "arms": {n: a.version for n, a in state.registry.arms.items()}, "error": state.load_error}
        return AsciiJSONResponse(body, status_code=200 if state.ready else 503)

    async def recommend(
        body: Any,  # RecommendRequest of this service: set below, as a local class is not resolvable by name
        request: Request, response: Response, state: StateDep,
        x_prunerec_arm: Any = None,  # ForceArm: set below
    ) -> RecommendResponse:
        """Top-k next items for a history: real catalog items, best first, from the user's A/B arm."""
        s = state.settings
        if x_prunerec_arm is not None:
            if x_prunerec_arm not in state.registry.arms:
                raise ApiError(422, f"unknown arm {x_prunerec_arm!r} in {FORCE_ARM_HEADER}; arms: {sorted(state.registry.arms)}")
            arm_name = x_prunerec_arm
        else:
            arm_name = assign(body.user_id, state.weights, s.salt)
        arm = state.registry.arms[arm_name]
        catalog = arm.recommender.catalog
        try:
            history = catalog.resolve(body.history)
        except UnknownItemsError as exc:
            raise ApiError(422, f"unknown items in history: {exc.missing[:5]!r}", unknown=exc.missing) from None
        if body.k > len(catalog) - (len(set(history)) if body.exclude_history else 0):
            raise ApiError(422, "k is larger than the number of items that can be recommended")
        exclude = history if body.exclude_history else []
        version = arm.version
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        deadline = loop.time() + (body.deadline_ms or s.request_timeout_ms) / 1000
        try:
            ranked = await _decode(state, arm_name, request, history, body.k, exclude, deadline)
        except ApiError:
            raise
        except Exception:
            state.telemetry.errors.labels(arm_name, version, "decode").inc()
            state.experiment.record_request(arm_name, 0.0, ok=False)
            raise
        elapsed = time.perf_counter() - started
        state.telemetry.requests.labels(arm_name, version).inc()
        state.telemetry.latency.labels(arm_name, version).observe(elapsed)
        state.experiment.record_request(arm_name, elapsed * 1000, ok=True)
        request_id = uuid.uuid4().hex
        items = [{"item_id": catalog.item_ids[i], "title": catalog.titles[i], "score": score} for i, score in ranked]
        state.experiment.record_served(request_id, arm_name, version, [catalog.item_ids[i] for i, _ in ranked])
        if s.shadow and s.shadow != arm_name and s.shadow in state.registry.arms:
            state.spawn(_shadow(state, s.shadow, body.user_id, list(body.history), body.k, body.exclude_history))
        response.headers[FORCE_ARM_HEADER] = arm_name
        response.headers["X-Prunerec-Model-Version"] = version
        response.headers["X-Request-Id"] = request_id
        return RecommendResponse.model_validate(
            {"request_id": request_id, "user_id": body.user_id, "arm": arm_name, "model_version": version, "items": items}
        )

    # the request model and the header carry this service's limits and arms: local objects, which FastAPI
    # cannot resolve from the (postponed, string) annotations, so they are set here
    recommend.__annotations__.update(body=RecommendRequest, x_prunerec_arm=ForceArm)
    router.add_api_route("/v1/recommend", recommend, methods=["POST"], response_model=RecommendResponse, tags=["recommend"],
                         dependencies=[Depends(require_ready)], responses=error_responses(400, 413, 422, 503))

    @router.post("/v1/feedback", response_model=FeedbackResponse, tags=["recommend"], responses=error_responses(400, 404, 413, 422))
    async def feedback(body: FeedbackRequest, state: StateDep) -> dict:
        """A click or purchase on an item of a served list; the same event twice counts once."""
        try:
            served, new = state.experiment.record_feedback(body.request_id, body.item_id, body.event)
        except UnknownListError:
            raise ApiError(404, f"no served list with request_id {body.request_id!r}") from None
        except NotInListError:
            raise ApiError(422, f"item {body.item_id!r} was not in the list served as {body.request_id!r}") from None
        if new:
            state.telemetry.feedback.labels(served.arm, served.version, body.event).inc()
        return {"recorded": new, "arm": served.arm}

    @router.get("/v1/models", response_model=ModelsResponse, tags=["ab"])
    async def models(state: StateDep) -> dict:
        """The loaded arms: version, artifact, parameter counts, offline metrics; weights and shadow."""
        return {"arms": [a.describe(state.settings.assist) for a in state.registry.arms.values()], "weights": state.weights,
                "shadow": state.settings.shadow}

    @router.get("/v1/ab/report", response_model=ABReport, tags=["ab"])
    async def report(state: StateDep) -> dict:
        """Per arm: requests, shed, feedback, CTR with a Wilson 95% interval, latency, observed vs intended split."""
        return {**state.experiment.report(state.weights), "salt": state.settings.salt}

    async def set_weights(body: Any, state: StateDep) -> dict:  # body: this service's WeightsRequest, set below
        """Change the traffic weights (normalised; arms left out get 0)."""
        unknown = set(body.weights) - set(state.registry.arms)
        if unknown:
            raise ApiError(422, f"unknown arms: {sorted(unknown)}")
        try:
            check_weights(body.weights)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        total = math.fsum(body.weights.values())
        state.weights = {a: w / total for a, w in body.weights.items()}
        return {"weights": state.weights}

    set_weights.__annotations__["body"] = WeightsRequest
    router.add_api_route("/admin/weights", set_weights, methods=["POST"], response_model=WeightsResponse, tags=["admin"],
                         dependencies=[Depends(require_admin)], responses=error_responses(400, 401, 403, 413, 422))

    async def reload(arm: Any, state: StateDep) -> Any:  # arm: ArmName, set below
        """Load an arm's artifact again (e.g. after a new version was written to its directory)."""
        if arm not in state.registry.arms:
            raise ApiError(404, f"unknown arm {arm!r}")
        loop = asyncio.get_running_loop()
        try:
            reloaded = await loop.run_in_executor(state.registry.executor(arm), state.registry.reload, arm)
        except Exception as exc:
            current = state.registry.arms[arm]
            return AsciiJSONResponse(
                {"reloaded": False, "error": f"{type(exc).__name__}: {exc}", "serving": current.version}, status_code=409,
            )
        return {"reloaded": True, "version": reloaded.version}

    reload.__annotations__["arm"] = ArmName
    router.add_api_route("/admin/reload/{arm}", reload, methods=["POST"], response_model=ReloadResponse, tags=["admin"],
                         dependencies=[Depends(require_admin)],
                         responses={**error_responses(400, 401, 403, 404, 422, 503),
                                    409: {"model": ReloadFailure, "description": "The reload failed; the old model keeps serving"}})

    @router.get("/metrics", response_class=PlainTextResponse, tags=["ops"],
                responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                 "description": "Prometheus text exposition format"}})
    async def metrics(state: StateDep) -> Response:
        """Prometheus metrics, labelled by arm and model version."""
        return Response(state.telemetry.render(), media_type=CONTENT_TYPE_LATEST)

    return router


async def _shadow(state: State, arm_name: str, user_id: str, history_refs: list[str], k: int, exclude_history: bool) -> None:
    """The challenger answers a copy of the request; the answer is logged and counted, never returned."""
    arm = state.registry.arms[arm_name]
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        history = arm.recommender.catalog.resolve(history_refs)
        job = state.batcher(arm_name).submit(history, k, history if exclude_history else [],
                                             loop.time() + state.settings.request_timeout_ms / 1000)
        ranked = await job.future
    except Overloaded as exc:
        state.telemetry.shed.labels(arm_name, arm.version, exc.reason).inc()
        state.experiment.record_request(arm_name, 0.0, ok=False, shadow=True)
        return
    except Exception:
        state.experiment.record_request(arm_name, 0.0, ok=False, shadow=True)
        logger.exception("shadow arm %s failed", arm_name)
        return
    elapsed = (time.perf_counter() - started) * 1000
    state.experiment.record_request(arm_name, elapsed, ok=True, shadow=True)
    state.telemetry.shadow.labels(arm_name, arm.version).inc()
    logger.info("shadow %s user=%r items=%s", arm_name, user_id, [arm.recommender.catalog.item_ids[i] for i, _ in ranked])
