"""The app's edges: errors in OpenAI's shape, a body size limit, request metrics and one JSON log line a request."""

from __future__ import annotations

import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ScalpelError
from serving.metrics import Metrics

log = logging.getLogger("scalpel.serving")


def _error(status: int, message: str, *, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ScalpelError)
    async def scalpel_error(_: Request, exc: ScalpelError):
        return JSONResponse(status_code=exc.status, content=exc.to_openai())

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return _error(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        code = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code
        )
        type_ = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), type_=type_, code=code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
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
        begun, status, received = time.perf_counter(), [500], [0]
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        too_large = BodyTooLarge(
            f"the request body exceeds the limit of {self.max_body_bytes} bytes", code="request_too_large"
        )

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_body_bytes:  # a chunked body that did not announce its size
                    raise too_large
            return message

        async def recorded_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if length.isdigit() and int(length) > self.max_body_bytes:
            await JSONResponse(status_code=413, content=too_large.to_openai())(scope, receive, recorded_send)
        else:
            await self.app(scope, counted_receive, recorded_send)
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
