"""The FastAPI app: OpenAI's chat and model routes plus the plan's adapter routes, all errors in OpenAI's shape."""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
import uuid
from typing import AsyncIterator

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scalpel import adapter_store
from scalpel.errors import NotFoundError, ScalpelError
from serving.engine import AdapterSet, Engine, GenerationParams
from serving.schemas import ChatCompletionRequest, LoadAdapterRequest

log = logging.getLogger("scalpel.serving")


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
        loc = [str(p) for p in first["loc"] if p != "body"]
        param = ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                            for e in exc.errors())
        return _error(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 401: "invalid_api_key"}.get(exc.status_code)
        type_ = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), type_=type_, code=code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}", type_="server_error")


def create_app(engine: Engine, *, api_keys: set[str] | frozenset[str] = frozenset()) -> FastAPI:
    app = FastAPI(title="scalpel", version="0.1.0")
    _install_error_handlers(app)
    started = int(time.time())

    def require_key(request: Request) -> None:
        if not api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(secrets.compare_digest(token, k) for k in api_keys):
            raise StarletteHTTPException(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")

    guarded = [Depends(require_key)]

    def adapter_set(model: str, extra: list | None) -> AdapterSet:
        """The request's `model` (base, adapter, or adapter@vN) plus any stacked `adapters`."""
        chosen: list[tuple[str, float]] = []
        if model != engine.base.name:
            if "@" not in model and model not in adapter_store.list_adapters():
                raise NotFoundError(f"the model {model!r} does not exist: use {engine.base.name!r} or one of "
                                    f"the adapters {adapter_store.list_adapters()}", param="model",
                                    code="model_not_found")
            chosen.append((engine.load(adapter_store.resolve(model)), 1.0))
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
            cards.extend(model_card(f"{name}@{v}", "scalpel-adapter") for v in adapter_store.versions(root))
        return cards

    @app.get("/health")
    def health():
        return {"status": "ok", "model": engine.base.name, "loaded_adapters": engine.loaded()}

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
    async def chat_completions(body: ChatCompletionRequest):
        adapters = await anyio.to_thread.run_sync(adapter_set, body.model, body.adapters)
        tokens = engine.chat_tokens([m.as_template_message() for m in body.messages])
        params = GenerationParams(max_tokens=body.max_completion_tokens or body.max_tokens,
                                  temperature=body.temperature, top_p=body.top_p, stop=body.stop,
                                  seed=body.seed, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty)
        engine.check_fits(len(tokens), params.max_tokens)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(engine, tokens, adapters, params, completion_id, created, body.model, include_usage),
                media_type="text/event-stream")

        def run() -> tuple[str, str, dict]:
            text, finish, usage = "", "stop", {}
            for chunk in engine.generate(tokens, adapters, params):
                text += chunk["choices"][0]["text"]
                if chunk["choices"][0].get("finish_reason"):
                    finish, usage = chunk["choices"][0]["finish_reason"], chunk["usage"]
            return text, finish, usage

        text, finish, usage = await anyio.to_thread.run_sync(run)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage}

    @app.get("/api/adapters", dependencies=guarded)
    def list_adapters():
        loaded = set(engine.loaded())
        items = []
        for name in adapter_store.list_adapters():
            root = adapter_store.root_for_name(name)
            active = adapter_store.active_version(root)
            items.append({"name": name, "active_version": active, "versions": adapter_store.versions(root),
                          "loaded": f"{name}@{active}" in loaded})
        return {"object": "list", "data": items}

    @app.post("/api/adapters/{name}/load", dependencies=guarded)
    async def load_adapter(name: str, body: LoadAdapterRequest | None = None):
        ref = name if not (body and body.version) else f"{name}@{body.version}"
        version = adapter_store.resolve(ref)
        loaded_ref = await anyio.to_thread.run_sync(engine.load, version)
        return {"name": name, "version": version.version, "ref": loaded_ref, "loaded": True,
                "size_bytes": version.gguf.stat().st_size}

    @app.post("/api/adapters/{name}/unload", dependencies=guarded)
    async def unload_adapter(name: str, body: LoadAdapterRequest | None = None):
        refs = [r for r in engine.loaded() if r.split("@")[0] == name
                and (not (body and body.version) or r.endswith(f"@{body.version}"))]
        if not refs:
            raise NotFoundError(f"adapter {name!r} is not loaded", param="name", code="adapter_not_loaded")
        for ref in refs:
            await anyio.to_thread.run_sync(engine.unload, ref)
        return {"name": name, "unloaded": refs}

    return app


async def _sse(engine: Engine, tokens: list[int], adapters: AdapterSet, params: GenerationParams,
               completion_id: str, created: int, model: str, include_usage: bool) -> AsyncIterator[str]:
    """Generate in a worker thread and relay OpenAI chat.completion.chunk events; a disconnect cancels."""
    chunks: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    def work() -> None:
        try:
            for chunk in engine.generate(tokens, adapters, params, cancelled):
                chunks.put(chunk)
        except Exception as exc:  # reported to the client as an error event
            chunks.put(exc)
        finally:
            chunks.put(None)

    threading.Thread(target=work, name=f"generate-{completion_id}", daemon=True).start()

    def event(delta: dict, finish: str | None, usage: dict | None = None, choices: bool = True) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                   if choices else []}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield event({"role": "assistant", "content": ""}, None)
        while True:
            chunk = await anyio.to_thread.run_sync(chunks.get)
            if chunk is None:
                break
            if isinstance(chunk, Exception):
                err = chunk.to_openai() if isinstance(chunk, ScalpelError) else \
                    {"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            choice = chunk["choices"][0]
            if choice["text"]:
                yield event({"content": choice["text"]}, None)
            if choice.get("finish_reason"):
                yield event({}, choice["finish_reason"])
                if include_usage:
                    yield event({}, None, usage=chunk["usage"], choices=False)
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()
