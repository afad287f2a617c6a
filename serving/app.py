"""The FastAPI app: OpenAI's chat, completion and model routes plus the plan's adapter routes, errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import threading
import time
import uuid
from typing import AsyncIterator, Callable

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scalpel import adapter_store, version_diff
from scalpel.errors import NotFoundError, ScalpelError
from scalpel.job_store import JobStore
from serving.engine import AdapterSet, Engine, GenerationParams, Piece
from serving.metrics import Metrics
from serving.queue import Ticket
from serving.schemas import (ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, RollbackRequest,
                             SamplingFields, VersionRequest)
from serving.training_routes import training_router
from training.runner import JobRunner

log = logging.getLogger("scalpel.serving")
MAX_BODY_BYTES = 4 * 1024 * 1024


def _error(status: int, message: str, *, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ScalpelError)
    async def scalpel_error(_: Request, exc: ScalpelError):
        return JSONResponse(status_code=exc.status, content=exc.to_openai())

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                            for e in exc.errors())
        return _error(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        code = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                413: "request_too_large"}.get(exc.status_code)
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
        too_large = BodyTooLarge(f"the request body exceeds the limit of {self.max_body_bytes} bytes",
                                 code="request_too_large")

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
        log.info(json.dumps({"event": "request", "method": scope["method"], "path": scope["path"],
                             "status": status[0], "ms": round(seconds * 1000, 1)}))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(engine: Engine, *, api_keys: set[str] | frozenset[str] = frozenset(), host: str = "127.0.0.1",
               max_body_bytes: int = MAX_BODY_BYTES, runner: JobRunner | None = None,
               default_dataset: str | None = None) -> FastAPI:
    """`host` is where the server listens: beyond loopback, the admin routes always need a key.

    Training jobs run in worker processes started by `runner` (by default one over the home's job
    database), from when the app starts until it stops.
    """
    runner = runner or JobRunner(JobStore())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        runner.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(runner.stop)

    app = FastAPI(title="scalpel", version="0.1.0", lifespan=lifespan)
    _install_error_handlers(app)
    metrics = Metrics(engine)
    started = int(time.time())
    default_scales: dict[str, float] = {}  # adapter name -> scale set by /api/adapters/{name}/load

    app.add_middleware(Guard, metrics=metrics, max_body_bytes=max_body_bytes)

    def check_key(request: Request, *, admin: bool) -> None:
        if not api_keys:
            if admin and not is_loopback(host):
                raise StarletteHTTPException(401, f"the admin routes need an API key when the server listens on "
                                                  f"{host}: start it with --api-key or SCALPEL_API_KEYS")
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(secrets.compare_digest(token, k) for k in api_keys):
            raise StarletteHTTPException(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")

    def client_key(request: Request) -> None:
        check_key(request, admin=False)

    def admin_key(request: Request) -> None:
        check_key(request, admin=True)

    guarded, admin = [Depends(client_key)], [Depends(admin_key)]

    def fine_tuned(model: str) -> adapter_store.AdapterVersion:
        """`ft:<base>:<suffix>:<job id>`, the id a finished fine-tuning job reports, names that job's adapter."""
        version = adapter_store.resolve(model.rsplit(":", 1)[-1])
        if version.manifest.get("fine_tuned_model") != model:
            raise NotFoundError(f"no fine-tuned model {model!r}", param="model", code="model_not_found")
        return version

    def adapter_set(model: str, extra: list | None) -> AdapterSet:
        """The request's `model` (base, adapter, adapter@vN or ft:...) plus any stacked `adapters`."""
        chosen: list[tuple[str, float]] = []
        if model != engine.base.name:
            try:
                version = fine_tuned(model) if model.startswith("ft:") else adapter_store.resolve(model)
            except NotFoundError as exc:
                raise NotFoundError(f"the model {model!r} does not exist ({exc.message}): use "
                                    f"{engine.base.name!r} or one of the adapters {adapter_store.list_adapters()}",
                                    param="model", code="model_not_found") from exc
            chosen.append((engine.load(version), default_scales.get(version.name, 1.0)))
        for choice in extra or []:
            chosen.append((engine.load(adapter_store.resolve(choice.name)), choice.scale))
        return tuple(chosen)

    def model_card(model_id: str, owned_by: str) -> dict:
        return {"id": model_id, "object": "model", "created": started, "owned_by": owned_by}

    def all_models() -> list[dict]:
        cards = [model_card(engine.base.name, "scalpel")]
        for name in adapter_store.list_adapters():
            cards.append(model_card(name, "scalpel-adapter"))
            root = adapter_store.root_for_name(name)
            with contextlib.suppress(ScalpelError, OSError, ValueError):
                if ft_id := adapter_store.resolve(name).manifest.get("fine_tuned_model"):
                    cards.append(model_card(ft_id, "scalpel-fine-tune"))
            cards.extend(model_card(f"{name}@{v}", "scalpel-adapter") for v in adapter_store.versions(root))
        return cards

    async def prepare(body: SamplingFields, tokens: list[int], params: GenerationParams) -> tuple[AdapterSet, Ticket]:
        adapters = await anyio.to_thread.run_sync(adapter_set, body.model, body.adapters)
        engine.check_fits(len(tokens), params.max_tokens)
        return adapters, engine.queue.reserve()  # 429 now, before any response starts

    async def respond(request: Request, body: SamplingFields, tokens: list[int], params: GenerationParams,
                      shape: Callable[[Piece], dict], whole: Callable[[str, list, str, dict], dict]):
        adapters, ticket = await prepare(body, tokens, params)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(engine, metrics, tokens, adapters, params, ticket, shape, include_usage),
                                     media_type="text/event-stream")
        cancelled = threading.Event()

        def run() -> tuple[str, list, str, dict]:
            text, logprobs, finish, usage = "", [], "stop", {}
            for piece in engine.generate(tokens, adapters, params, ticket=ticket, cancelled=cancelled):
                text += piece.text
                logprobs += piece.logprobs
                if piece.finish_reason:
                    finish, usage = piece.finish_reason, piece.usage
            return text, logprobs, finish, usage

        async def watch_disconnect() -> None:
            while not cancelled.is_set():
                if await request.is_disconnected():
                    cancelled.set()  # the client left: stop decoding for nobody
                    return
                await anyio.sleep(0.1)

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch_disconnect)
                try:
                    text, logprobs, finish, usage = await anyio.to_thread.run_sync(run)
                finally:
                    cancelled.set()
        finally:
            engine.queue.release(ticket)
        metrics.count_usage(usage)
        return whole(text, logprobs, finish, usage)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": engine.base.name, "loaded_adapters": engine.loaded(),
                "queue_depth": engine.queue.depth}

    @app.get("/metrics", dependencies=guarded)
    def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    def list_models():
        return {"object": "list", "data": all_models()}

    @app.get("/v1/models/{model_id}", dependencies=guarded)
    def get_model(model_id: str):
        for card in all_models():
            if card["id"] == model_id:
                return card
        raise NotFoundError(f"the model {model_id!r} does not exist", param="model", code="model_not_found")

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        tokens = engine.chat_tokens([m.as_template_message() for m in body.messages])
        params = GenerationParams(max_tokens=body.max_completion_tokens or body.max_tokens,
                                  temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed,
                                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                  logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0,
                                  json_object=bool(body.response_format and body.response_format.type == "json_object"))
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        envelope = {"id": completion_id, "created": created, "model": body.model}
        first = [True]

        def shape(piece: Piece) -> dict:
            delta = {"role": "assistant", "content": piece.text} if first[0] else {"content": piece.text}
            first[0] = False
            logprobs = {"content": piece.logprobs} if body.logprobs else None
            return {**envelope, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta if piece.text or delta.get("role") else {},
                                 "logprobs": logprobs, "finish_reason": piece.finish_reason}]}

        def whole(text: str, logprobs: list, finish: str, usage: dict) -> dict:
            return {**envelope, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": {"content": logprobs} if body.logprobs else None,
                                 "finish_reason": finish}], "usage": usage}

        return await respond(request, body, tokens, params, shape, whole)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request, body: CompletionRequest):
        tokens = engine.text_tokens(body.prompt)
        params = GenerationParams(max_tokens=body.max_tokens or 16, temperature=body.temperature, top_p=body.top_p,
                                  stop=body.stop, seed=body.seed, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty, logprobs=body.logprobs is not None,
                                  top_logprobs=body.logprobs or 0)
        envelope = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": body.model}

        def legacy_logprobs(entries: list) -> dict | None:
            if body.logprobs is None:
                return None
            return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                    "text_offset": []}

        def shape(piece: Piece) -> dict:
            return {**envelope, "choices": [{"index": 0, "text": piece.text, "logprobs": legacy_logprobs(piece.logprobs),
                                             "finish_reason": piece.finish_reason}]}

        def whole(text: str, logprobs: list, finish: str, usage: dict) -> dict:
            return {**envelope, "choices": [{"index": 0, "text": text, "logprobs": legacy_logprobs(logprobs),
                                             "finish_reason": finish}], "usage": usage}

        return await respond(request, body, tokens, params, shape, whole)

    def adapter_info(name: str) -> dict:
        root = adapter_store.root_for_name(name)
        if name not in adapter_store.list_adapters():
            raise NotFoundError(f"adapter {name!r} is not in the store", param="name", code="adapter_not_found")
        active = adapter_store.active_version(root)
        loaded = set(engine.loaded())
        return {"name": name, "active_version": active, "versions": adapter_store.versions(root),
                "loaded_versions": sorted(r.split("@")[1] for r in loaded if r.split("@")[0] == name),
                "scale": default_scales.get(name, 1.0)}

    @app.get("/api/adapters", dependencies=admin)
    def list_adapters():
        return {"object": "list", "data": [adapter_info(n) for n in adapter_store.list_adapters()]}

    @app.get("/api/adapters/{name}", dependencies=admin)
    def get_adapter(name: str):
        info = adapter_info(name)
        info["manifest"] = adapter_store.resolve(name).manifest
        return info

    @app.post("/api/adapters/{name}/load", dependencies=admin)
    async def load_adapter(name: str, body: LoadAdapterRequest | None = None):
        body = body or LoadAdapterRequest()
        version = adapter_store.resolve(name if not body.version else f"{name}@{body.version}")
        loaded_ref = await anyio.to_thread.run_sync(engine.load, version)
        default_scales[name] = body.scale
        return {"name": name, "version": version.version, "ref": loaded_ref, "loaded": True, "scale": body.scale,
                "size_bytes": version.gguf.stat().st_size}

    @app.post("/api/adapters/{name}/promote", dependencies=admin)
    async def promote_adapter(name: str, body: VersionRequest):
        previous = await anyio.to_thread.run_sync(adapter_store.promote, name, body.version)
        return {**adapter_info(name), "previous_version": previous}

    @app.post("/api/adapters/{name}/rollback", dependencies=admin)
    async def rollback_adapter(name: str, body: RollbackRequest | None = None):
        before, _ = await anyio.to_thread.run_sync(adapter_store.rollback, name, body.to if body else None)
        return {**adapter_info(name), "previous_version": before}

    @app.get("/api/adapters/{name}/diff", dependencies=admin)
    async def diff_adapter(name: str, a: str, b: str):
        return await anyio.to_thread.run_sync(version_diff.diff, name, a, b)

    @app.delete("/api/adapters/{name}/versions/{version}", dependencies=admin)
    async def delete_adapter_version(name: str, version: str):
        await anyio.to_thread.run_sync(adapter_store.delete_version, name, version)
        for ref in [r for r in engine.loaded() if r == f"{name}@{version}"]:
            await anyio.to_thread.run_sync(engine.unload, ref)
        return {"name": name, "version": version, "deleted": True}

    @app.post("/api/adapters/{name}/unload", dependencies=admin)
    async def unload_adapter(name: str, body: LoadAdapterRequest | None = None):
        refs = [r for r in engine.loaded() if r.split("@")[0] == name
                and (not (body and body.version) or r.endswith(f"@{body.version}"))]
        if not refs:
            raise NotFoundError(f"adapter {name!r} is not loaded", param="name", code="adapter_not_loaded")
        for ref in refs:
            await anyio.to_thread.run_sync(engine.unload, ref)
        return {"name": name, "unloaded": refs}

    app.include_router(training_router(runner.store, runner, admin=Depends(admin_key), client=Depends(client_key),
                                       default_dataset=default_dataset))
    return app


async def _sse(engine: Engine, metrics: Metrics, tokens: list[int], adapters: AdapterSet, params: GenerationParams,
               ticket: Ticket, shape: Callable[[Piece], dict], include_usage: bool) -> AsyncIterator[str]:
    """Generate in a worker thread and relay chunks as server-sent events; a client that leaves cancels."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    begun = time.perf_counter()

    def work() -> None:
        def hand_over(item) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, item)
        try:
            for piece in engine.generate(tokens, adapters, params, ticket=ticket, cancelled=cancelled):
                hand_over(piece)
        except Exception as exc:  # reported to the client as an error event
            hand_over(exc)
        finally:
            hand_over(None)

    threading.Thread(target=work, daemon=True).start()
    first = True
    try:
        while True:
            piece = await pieces.get()
            if piece is None:
                break
            if isinstance(piece, Exception):
                err = piece.to_openai() if isinstance(piece, ScalpelError) else \
                    {"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            if first:
                metrics.first_token.observe(time.perf_counter() - begun)
                first = False
            chunk = shape(piece)
            yield f"data: {json.dumps(chunk)}\n\n"
            if piece.finish_reason:
                metrics.count_usage(piece.usage)
                if include_usage:
                    yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': piece.usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()
        engine.queue.release(ticket)
