"""OpenAI's model, chat and completion routes, each answered by the engine with the request's own adapter set."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol

import anyio
from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from core.errors import NotFoundError, ScalpelError
from serving import structured, tools
from serving.auth import client_key
from serving.context import ServingContext, context
from serving.engine import GenerationParams, Piece
from serving.model_names import adapter_set, all_models
from serving.openapi import ModelCard, ModelList
from serving.queue import Ticket
from serving.responses import EVENT_STREAM, ChatCompletion, Completion
from serving.schemas import ChatCompletionRequest, CompletionRequest, ResponseFormat, SamplingFields, template_messages

router = APIRouter(dependencies=[Depends(client_key)])
PING_SECONDS = 15  # an SSE comment this often keeps proxies from closing a stream that waits for its turn


class Reply(Protocol):
    """One request's answer, put together from the pieces of its choices (generated side by side)."""

    def chunk(self, index: int, piece: Piece) -> dict | None:
        """The streamed chunk for choice `index`'s new piece (None: nothing to send); also kept for whole()."""

    def usage_chunk(self, usage: dict) -> dict:
        """The last chunk of a stream that asked for usage."""

    def whole(self, usage: dict) -> dict:
        """The whole answer, once every piece went through chunk()."""


async def answer(
    ctx: ServingContext,
    request: Request,
    body: SamplingFields,
    tokens: list[int],
    params: list[GenerationParams],
    reply: Reply,
    grammar_field: str = "grammar",
):
    """Generate one choice per entry of `params`, side by side, and answer whole or as server-sent events.

    Everything that can refuse the request (the model, the context, the queue, the grammar) does so before
    a response starts. `grammar_field` is the request field a grammar the engine rejects came from.
    """
    engine = ctx.engine
    adapters = await anyio.to_thread.run_sync(adapter_set, ctx, body.model, body.adapters)
    engine.check_fits(len(tokens), params[0].max_tokens)
    tickets: list[Ticket] = []
    cancelled = threading.Event()
    pieces: asyncio.Queue = asyncio.Queue()  # (choice index, piece, error or None at its end), when streamed
    try:
        for _ in params:
            tickets.append(engine.queue.reserve())  # 429 now, before any response starts
        if body.stream:
            loop = asyncio.get_running_loop()
            await anyio.to_thread.run_sync(_submit, engine, tokens, adapters, params, loop, pieces, cancelled)
        else:
            streams = await anyio.to_thread.run_sync(_start, engine, tokens, adapters, params, tickets, cancelled)
    except BaseException as exc:
        cancelled.set()
        for ticket in tickets:
            engine.queue.release(ticket)
        if isinstance(exc, ScalpelError) and exc.param == "grammar":
            raise ScalpelError(exc.message, param=grammar_field, code=exc.code) from exc
        raise
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _sse(ctx, len(params), pieces, reply, tickets, cancelled, include_usage)

        def done() -> None:  # also after the response: a client gone before the stream began never runs its finally
            cancelled.set()
            for ticket in tickets:
                engine.queue.release(ticket)

        return EventSourceResponse(events, ping=PING_SECONDS, background=BackgroundTask(done))
    usages: list[dict | None] = [None] * len(streams)
    errors: list[BaseException] = []

    def drain(index: int) -> None:
        try:
            for piece in streams[index]:
                reply.chunk(index, piece)
                if piece.finish_reason:
                    usages[index] = piece.usage
        except Exception as exc:  # raised below, as it is, so the error handlers answer it
            errors.append(exc)
            cancelled.set()

    async def watch_disconnect() -> None:
        while not cancelled.is_set():
            if await request.is_disconnected():
                cancelled.set()  # the client left: stop decoding for nobody
                return
            await anyio.sleep(0.1)

    try:
        async with anyio.create_task_group() as watch:
            watch.start_soon(watch_disconnect)
            try:
                async with anyio.create_task_group() as work:
                    for index in range(len(streams)):
                        work.start_soon(anyio.to_thread.run_sync, drain, index)
            finally:
                cancelled.set()
                watch.cancel_scope.cancel()  # do not wait out the watch's sleep: it cost every request 0.1 s
    finally:
        for ticket in tickets:
            engine.queue.release(ticket)
    if errors:
        raise errors[0]
    usage = total_usage(usages)
    ctx.metrics.count_usage(usage)
    return reply.whole(usage)


def _start(engine, tokens, adapters, params, tickets, cancelled) -> list[Iterator[Piece]]:
    return [
        engine.generate(tokens, adapters, p, ticket=ticket, cancelled=cancelled)
        for p, ticket in zip(params, tickets, strict=True)
    ]


def _submit(engine, tokens, adapters, params, loop, pieces: asyncio.Queue, cancelled) -> None:
    """Queue every choice with the engine, its pieces handed straight to the event loop (no thread per stream)."""
    for index, p in enumerate(params):

        def emit(item, index=index) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, (index, item))

        engine.submit(tokens, adapters, p, emit, cancelled=cancelled)


def total_usage(usages: list[dict | None]) -> dict:
    """The request's usage: the prompt once, every choice's completion tokens."""
    known = [u for u in usages if u]
    if not known:
        return {}
    completion = sum(u["completion_tokens"] for u in known)
    first = known[0]
    return {**first, "completion_tokens": completion, "total_tokens": first["prompt_tokens"] + completion}


async def _sse(
    ctx: ServingContext,
    n: int,
    pieces: asyncio.Queue,
    reply: Reply,
    tickets: list[Ticket],
    cancelled: threading.Event,
    include_usage: bool,
) -> AsyncIterator[ServerSentEvent]:
    """Relay each choice's pieces as server-sent events as the engine hands them over; a client that leaves
    cancels. sse-starlette writes the events, pings an idle stream, and cancels this generator when the client
    goes."""
    engine, metrics = ctx.engine, ctx.metrics
    begun = time.perf_counter()
    running, first = n, True
    usages: list[dict | None] = [None] * n
    try:
        while running:
            index, piece = await pieces.get()
            if piece is None:
                running -= 1
                continue
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
            if (chunk := reply.chunk(index, piece)) is not None:
                yield ServerSentEvent(data=json.dumps(chunk))
            if piece.finish_reason:
                usages[index] = piece.usage
        else:
            usage = total_usage(usages)
            metrics.count_usage(usage)
            if include_usage:
                yield ServerSentEvent(data=json.dumps(reply.usage_chunk(usage)))
        yield ServerSentEvent(data="[DONE]")
    finally:
        cancelled.set()
        for ticket in tickets:
            engine.queue.release(ticket)


def sampling(
    body: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    grammar: str | None = None,
) -> list[GenerationParams]:
    """The engine's parameters for each of the n choices, from the fields chat and completions share, plus the
    ones they spell differently. With a seed, choice i draws with seed + i: the choices differ, reproducibly."""
    if grammar and body.stops:
        raise ScalpelError(
            "stop cannot be combined with a grammar (response_format json_object or json_schema, or a required "
            "tool call): the grammar decides where the answer ends",
            param="stop",
        )
    one = GenerationParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stops,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        grammar=grammar,
        logit_bias=body.biases,
    )
    return [dataclasses.replace(one, seed=None if body.seed is None else body.seed + i) for i in range(body.n)]


@router.get("/v1/models", response_model=ModelList)
def list_models(ctx: ServingContext = Depends(context)):
    return {"object": "list", "data": all_models(ctx)}


@router.get("/v1/models/{model_id}", response_model=ModelCard)
def get_model(model_id: str, ctx: ServingContext = Depends(context)):
    for card in all_models(ctx):
        if card["id"] == model_id:
            return card
    raise NotFoundError(f"the model {model_id!r} does not exist", param="model", code="model_not_found")


def answer_schema(response_format: ResponseFormat | None) -> tuple[dict | None, bool]:
    """The JSON Schema a response format asks the answer to fit (None: free text), and whether it is strict."""
    if response_format is None or response_format.type == "text":
        return None, False
    if response_format.type == "json_object" or response_format.json_schema is None:
        return structured.ANY_OBJECT, False
    spec = response_format.json_schema
    return spec.schema_ or structured.ANY_OBJECT, bool(spec.strict)


class ChatReply:
    def __init__(self, body: ChatCompletionRequest, plan: tools.ToolPlan):
        self.logprobs, self.forced = body.logprobs, plan.forced
        self.envelope = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        self.answers = [tools.ChatAnswer(plan) for _ in range(body.n)]
        self.messages = [tools.Message() for _ in range(body.n)]
        self.entries: list[list[dict]] = [[] for _ in range(body.n)]
        self.finishes = ["stop"] * body.n
        self.begun = [False] * body.n

    def chunk(self, index: int, piece: Piece) -> dict | None:
        delta = self.answers[index].feed(piece.text)
        finish = None
        if piece.finish_reason:
            last, finish = self.answers[index].finish(piece.finish_reason)
            delta = tools.join(delta, last)
            self.finishes[index] = finish
        self.messages[index].add(delta)
        self.entries[index] += piece.logprobs
        if not self.begun[index]:  # OpenAI's first delta: the role, and "" as content unless a call is forced
            opening = {"role": "assistant"} if self.forced or delta else {"role": "assistant", "content": ""}
            delta, self.begun[index] = {**opening, **delta}, True
        elif not delta and not piece.logprobs and not finish:
            return None
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": {"content": piece.logprobs} if self.logprobs else None,
            "finish_reason": finish,
        }
        return {**self.envelope, "object": "chat.completion.chunk", "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.envelope, "object": "chat.completion.chunk", "choices": [], "usage": usage}

    def whole(self, usage: dict) -> dict:
        choices = [
            {
                "index": i,
                "message": message.message(),
                "logprobs": {"content": self.entries[i]} if self.logprobs else None,
                "finish_reason": self.finishes[i],
            }
            for i, message in enumerate(self.messages)
        ]
        return {**self.envelope, "object": "chat.completion", "choices": choices, "usage": usage}


@router.post("/v1/chat/completions", responses={200: {"model": ChatCompletion, "content": EVENT_STREAM}})
async def chat_completions(request: Request, body: ChatCompletionRequest, ctx: ServingContext = Depends(context)):
    plan = tools.plan(body.tool_dicts, body.tool_choice_value, body.parallel_tool_calls, ctx.engine.base.chat_template)
    schema, strict = answer_schema(body.response_format)
    json_schema = body.response_format is not None and body.response_format.type == "json_schema"
    where = "response_format.json_schema.schema" if json_schema else "response_format"
    grammar = tools.grammar(plan, schema, strict=strict, answer_param=where)
    # In a worker thread: tokenizing megabytes takes a second, and the event loop also answers /health.
    messages = template_messages(body.messages)
    tokens = await anyio.to_thread.run_sync(ctx.engine.chat_tokens, messages, plan.template_tools)
    params = sampling(
        body,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        grammar=grammar,
    )
    field = "tools" if plan.forced else "response_format"
    return await answer(ctx, request, body, tokens, params, ChatReply(body, plan), grammar_field=field)


class CompletionReply:
    def __init__(self, body: CompletionRequest):
        self.logprobs = body.logprobs
        self.envelope = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }
        self.texts = [""] * body.n
        self.entries: list[list[dict]] = [[] for _ in range(body.n)]
        self.finishes = ["stop"] * body.n

    def legacy_logprobs(self, entries: list) -> dict | None:
        if self.logprobs is None:
            return None
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": [],
        }

    def chunk(self, index: int, piece: Piece) -> dict:
        self.texts[index] += piece.text
        self.entries[index] += piece.logprobs
        if piece.finish_reason:
            self.finishes[index] = piece.finish_reason
        choice = {
            "index": index,
            "text": piece.text,
            "logprobs": self.legacy_logprobs(piece.logprobs),
            "finish_reason": piece.finish_reason,
        }
        return {**self.envelope, "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.envelope, "choices": [], "usage": usage}

    def whole(self, usage: dict) -> dict:
        choices = [
            {"index": i, "text": text, "logprobs": self.legacy_logprobs(self.entries[i]), "finish_reason": finish}
            for i, (text, finish) in enumerate(zip(self.texts, self.finishes, strict=True))
        ]
        return {**self.envelope, "choices": choices, "usage": usage}


@router.post("/v1/completions", responses={200: {"model": Completion, "content": EVENT_STREAM}})
async def completions(request: Request, body: CompletionRequest, ctx: ServingContext = Depends(context)):
    tokens = await anyio.to_thread.run_sync(ctx.engine.text_tokens, body.prompt_text)
    params = sampling(
        body, max_tokens=body.max_tokens or 16, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0
    )
    return await answer(ctx, request, body, tokens, params, CompletionReply(body))


class _OneChoice:
    """respond()'s Reply: the caller's own shapes for a chunk and for the whole answer."""

    def __init__(self, shape: Callable[[Piece], dict], whole: Callable[[str, list, str, dict], dict]):
        self.shape, self.shape_whole = shape, whole
        self.text, self.finish = "", "stop"
        self.logprobs: list[dict] = []
        self.last: dict = {}

    def chunk(self, index: int, piece: Piece) -> dict:
        self.text += piece.text
        self.logprobs += piece.logprobs
        self.finish = piece.finish_reason or self.finish
        self.last = self.shape(piece)
        return self.last

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.last, "choices": [], "usage": usage}

    def whole(self, usage: dict) -> dict:
        return self.shape_whole(self.text, self.logprobs, self.finish, usage)


async def respond(
    ctx: ServingContext,
    request: Request,
    body: SamplingFields,
    tokens: list[int],
    params: GenerationParams,
    shape: Callable[[Piece], dict],
    whole: Callable[[str, list, str, dict], dict],
):
    """One choice, streamed as `shape(piece)` chunks or answered as `whole(text, logprobs, finish, usage)`."""
    return await answer(ctx, request, body, tokens, [params], _OneChoice(shape, whole))
