"""The app's edges: errors in OpenAI's shape, a body size limit, request metrics and one JSON log line a request."""

from __future__ import annotations

import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import paths
from core.errors import ScalpelError
from serving.metrics import Metrics

log = logging.getLogger("scalpel.serving")
_SOURCES = {"body", "query", "path", "header", "cookie"}  # where a validated value came from


def _error(status: int, message: str, *, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse(
        status_code=status,
        content={
            "error": {
                "message": paths.scrub(message),
                "type": type_,
                "param": paths.scrub(param) if isinstance(param, str) else param,
                "code": code,
            }
        },
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ScalpelError)
    async def scalpel_error(_: Request, exc: ScalpelError):
        return _error(exc.status, exc.message, type_=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        def where(loc) -> str:  # "limit", not "query.limit": the name the client sent
            return ".".join(str(p) for p in loc[1 if loc and loc[0] in _SOURCES else 0 :])

        first = exc.errors()[0]
        param = where(first["loc"]) or None
        message = "; ".join(f"{where(e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        return _error(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        code = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code
        )
        type_ = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), type_=type_, code=code)


def internal_error(exc: BaseException) -> JSONResponse:
    """A bug's answer: logged with its traceback, answered without one (nor any detail of the server)."""
    log.error("unhandled error", exc_info=exc)
    return _error(500, f"internal error: {type(exc).__name__}", type_="server_error")


class BodyTooLarge(ScalpelError):
    status = 413


class Guard:
    """Plain ASGI middleware (it never buffers a stream, and lets disconnects through): a body size limit,
    request metrics, and one JSON log line per request."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        begun, status, started = time.perf_counter(), [500], [False]
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        too_large = JSONResponse(
            status_code=413,
            content=BodyTooLarge(
                f"the request body exceeds the limit of {self.max_body_bytes} bytes", code="request_too_large"
            ).to_openai(),
        )

        async def recorded_send(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        announced_too_large = length.isdigit() and int(length) > self.max_body_bytes
        buffered = None if announced_too_large else await self._chunked_body(headers, receive)
        if buffered is None:
            await too_large(scope, receive, recorded_send)
        else:
            try:
                await self.app(scope, buffered, recorded_send)
            except Exception as exc:  # a bug: answered here, so it is logged and counted like any other request
                if not started[0]:
                    await internal_error(exc)(scope, receive, recorded_send)
                else:
                    log.error("unhandled error after the response started", exc_info=exc)
        seconds = time.perf_counter() - begun
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(route, str(status[0])).inc()
        self.metrics.latency.labels(route).observe(seconds)
        log.info(
            json.dumps(
                {
                    "event": "request",
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status[0],
                    "ms": round(seconds * 1000, 1),
                }
            )
        )

    async def _chunked_body(self, headers: dict, receive):
        """The receive to hand the app. A body that did not announce its size is read here first, up to the
        limit (None beyond it), so every route answers 413 alike; an announced one streams through."""
        if b"content-length" in headers or b"chunked" not in headers.get(b"transfer-encoding", b""):
            return receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            chunks.append(message)
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
        replay = [{"type": "http.request", "body": body, "more_body": False}]
        replay += [m for m in chunks if m["type"] != "http.request"]

        async def replayed():
            return replay.pop(0) if replay else await receive()

        return replayed
