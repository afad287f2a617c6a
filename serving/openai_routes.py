"""OpenAI's model, chat and completion routes, each answered by the engine with the request's own adapter set."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from core.errors import NotFoundError, ScalpelError
from serving.auth import client_key
from serving.context import ServingContext, context
from serving.engine import AdapterSet, GenerationParams, Piece
from serving.model_names import adapter_set, all_models
from serving.openapi import ModelCard, ModelList
from serving.queue import Ticket
from serving.responses import EVENT_STREAM, ChatCompletion, Completion
from serving.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

router = APIRouter(dependencies=[Depends(client_key)])
PING_SECONDS = 15  # an SSE comment this often keeps proxies from closing a stream that waits for its turn


async def respond(
    ctx: ServingContext,
    request: Request,
    body: SamplingFields,
    tokens: list[int],
    params: GenerationParams,
    shape: Callable[[Piece], dict],
    whole: Callable[[str, list, str, dict], dict],
):
    engine = ctx.engine
    adapters = await anyio.to_thread.run_sync(adapter_set, ctx, body.model, body.adapters)
    engine.check_fits(len(tokens), params.max_tokens)
    ticket = engine.queue.reserve()  # 429 now, before any response starts
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_sse(ctx, tokens, adapters, params, ticket, shape, include_usage), ping=PING_SECONDS)
    cancelled = threading.Event()

    def run() -> tuple[str, list, str, dict]:
        text, logprobs, finish, usage = "", [], "stop", {}
        for piece in engine.generate(tokens, adapters, params, ticket=ticket, cancelled=cancelled):
            text += piece.text
            logprobs += piece.logprobs
            if piece.finish_reason:
                finish, usage = piece.finish_reason, piece.usage or {}
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
                tasks.cancel_scope.cancel()  # do not wait out the watch's sleep: it cost every request 0.1 s
    finally:
        engine.queue.release(ticket)
    ctx.metrics.count_usage(usage)
    return whole(text, logprobs, finish, usage)


async def _sse(
    ctx: ServingContext,
    tokens: list[int],
    adapters: AdapterSet,
    params: GenerationParams,
    ticket: Ticket,
    shape: Callable[[Piece], dict],
    include_usage: bool,
) -> AsyncIterator[ServerSentEvent]:
    """Generate in a worker thread and relay chunks as server-sent events; a client that leaves cancels.

    sse-starlette writes the events, pings an idle stream, and cancels this generator when the client goes.
    """
    engine, metrics = ctx.engine, ctx.metrics
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
                err = (
                    piece.to_openai()
                    if isinstance(piece, ScalpelError)
                    else {
                        "error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}
                    }
                )
                yield ServerSentEvent(data=json.dumps(err))
                break
            if first:
                metrics.first_token.observe(time.perf_counter() - begun)
                first = False
            chunk = shape(piece)
            yield ServerSentEvent(data=json.dumps(chunk))
            if piece.finish_reason:
                metrics.count_usage(piece.usage)
                if include_usage:
                    yield ServerSentEvent(data=json.dumps({**chunk, "choices": [], "usage": piece.usage}))
        yield ServerSentEvent(data="[DONE]")
    finally:
        cancelled.set()
        engine.queue.release(ticket)


def sampling(
    body: SamplingFields, *, max_tokens: int | None, logprobs: bool, top_logprobs: int, json_object: bool = False
) -> GenerationParams:
    """The engine's parameters from the fields chat and completions share, plus the ones they spell differently."""
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stops,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        json_object=json_object,
    )


@router.get("/v1/models", response_model=ModelList)
def list_models(ctx: ServingContext = Depends(context)):
    return {"object": "list", "data": all_models(ctx)}


@router.get("/v1/models/{model_id}", response_model=ModelCard)
def get_model(model_id: str, ctx: ServingContext = Depends(context)):
    for card in all_models(ctx):
        if card["id"] == model_id:
            return card
    raise NotFoundError(f"the model {model_id!r} does not exist", param="model", code="model_not_found")


@router.post("/v1/chat/completions", responses={200: {"model": ChatCompletion, "content": EVENT_STREAM}})
async def chat_completions(request: Request, body: ChatCompletionRequest, ctx: ServingContext = Depends(context)):
    # In a worker thread: tokenizing megabytes takes a second, and the event loop also answers /health.
    tokens = await anyio.to_thread.run_sync(ctx.engine.chat_tokens, [m.as_template_message() for m in body.messages])
    params = sampling(
        body,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        json_object=bool(body.response_format and body.response_format.type == "json_object"),
    )
    envelope = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    first = [True]

    def shape(piece: Piece) -> dict:
        delta = {"role": "assistant", "content": piece.text} if first[0] else {"content": piece.text}
        first[0] = False
        logprobs = {"content": piece.logprobs} if body.logprobs else None
        return {
            **envelope,
            "object": "chat.completion.chunk",
            "choices": [
                {
                    "index": 0,
                    "delta": delta if piece.text or delta.get("role") else {},
                    "logprobs": logprobs,
                    "finish_reason": piece.finish_reason,
                }
            ],
        }

    def whole(text: str, logprobs: list, finish: str, usage: dict) -> dict:
        return {
            **envelope,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": {"content": logprobs} if body.logprobs else None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }

    return await respond(ctx, request, body, tokens, params, shape, whole)


@router.post("/v1/completions", responses={200: {"model": Completion, "content": EVENT_STREAM}})
async def completions(request: Request, body: CompletionRequest, ctx: ServingContext = Depends(context)):
    tokens = await anyio.to_thread.run_sync(ctx.engine.text_tokens, body.prompt_text)
    params = sampling(
        body, max_tokens=body.max_tokens or 16, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0
    )
    envelope = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }

    def legacy_logprobs(entries: list) -> dict | None:
        if body.logprobs is None:
            return None
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": [],
        }

    def shape(piece: Piece) -> dict:
        return {
            **envelope,
            "choices": [
                {
                    "index": 0,
                    "text": piece.text,
                    "logprobs": legacy_logprobs(piece.logprobs),
                    "finish_reason": piece.finish_reason,
                }
            ],
        }

    def whole(text: str, logprobs: list, finish: str, usage: dict) -> dict:
        return {
            **envelope,
            "choices": [{"index": 0, "text": text, "logprobs": legacy_logprobs(logprobs), "finish_reason": finish}],
            "usage": usage,
        }

    return await respond(ctx, request, body, tokens, params, shape, whole)
