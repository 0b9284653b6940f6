"""The FastAPI application (DESIGN.md §6); routes in :mod:`app.routes`, schemas in :mod:`app.schemas`.

    GET  /healthz             alive
    GET  /readyz              200 once every arm is loaded and warmed up, 503 before
    POST /v1/recommend        {user_id, history, k, exclude_history, deadline_ms} -> items, arm, model version
    POST /v1/feedback         {request_id, item_id, event} for a served list
    GET  /v1/models           arms with parameter counts and offline metrics
    GET  /v1/ab/report        per-arm counts, CTR with a 95% interval, latency percentiles, split
    POST /admin/weights       change traffic weights        (bearer token)
    POST /admin/reload/{arm}  reload an arm's artifact      (bearer token)
    GET  /metrics             Prometheus
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from app.deps import State
from app.middleware import ApiError, AsciiJSONResponse, BodyLimit
from app.routes import FORCE_ARM_HEADER, api_router
from app.settings import Settings

__all__ = ["FORCE_ARM_HEADER", "create_app"]

logger = logging.getLogger(__name__)


def _problems(exc: RequestValidationError) -> list[dict[str, str]]:
    return [{"where": ".".join(str(p) for p in e["loc"]), "problem": str(e["msg"])} for e in exc.errors()]


def create_app(settings: Settings | None = None, on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The service; its arms load in the background after start-up (``/readyz`` says when they are in).
    ``on_load_failure`` is called if loading fails (the CLI stops the server then)."""
    settings = settings or Settings()
    state = State(settings, on_load_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.spawn(state.load())
        yield
        await state.close()

    app = FastAPI(title="prunerec", version="0.1.0", lifespan=lifespan, default_response_class=AsciiJSONResponse)
    app.state.prunerec = state
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.include_router(api_router(settings))

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> AsciiJSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> AsciiJSONResponse:
        problems = _problems(exc)
        summary = "; ".join(f"{p['where']}: {p['problem']}" for p in problems[:3])
        return AsciiJSONResponse({"detail": f"invalid request: {summary}", "problems": problems}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> AsciiJSONResponse:
        return AsciiJSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> AsciiJSONResponse:
        logger.error("unhandled error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return AsciiJSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    return app
