"""ASGI middleware and the error answers every route shares.

:class:`BodyLimit` is plain ASGI (not ``BaseHTTPMiddleware``): it counts the body as it arrives and answers
413 as soon as the limit is passed, so a chunked upload is never buffered beyond the limit (a 200 MiB
chunked POST used to be read whole before its 413). :class:`AsciiJSONResponse` escapes non-ASCII, so no
string that reaches a response (an unknown item echoed back, say) can fail to encode.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: always encodable, even a lone surrogate becomes ``\\ud800``."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    """An error answer: status, message, optional extra body fields (see ``schemas.ErrorBody``) and headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers, extra

    def response(self) -> AsciiJSONResponse:
        return AsciiJSONResponse({"detail": self.detail, **self.extra}, status_code=self.status, headers=self.headers)


async def _send_json(send: Send, status: int, body: dict, close: bool) -> None:
    payload = AsciiJSONResponse(body).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """413 for request bodies over ``limit`` bytes, declared (Content-Length) or streamed (chunked)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = {"detail": f"request body over {self.limit} bytes"}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_json(send, 400, {"detail": "Content-Length is not a number"}, close=True)
                return
            if int(declared) > self.limit:
                await _send_json(send, 413, too_big, close=True)
                return
            await self.app(scope, receive, send)  # the server enforces the declared length
            return
        # no declared length (chunked, or no body): read up to the limit before the app sees anything
        chunks: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                await _send_json(send, 413, too_big, close=True)
                return
            chunks.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            if chunks:
                return chunks.pop(0)
            return await receive()

        await self.app(scope, replay, send)
