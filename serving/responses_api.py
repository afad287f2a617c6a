"""OpenAI's /v1/responses on the engine: text or messages in, one assistant message out, whole or as events."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from core.errors import ScalpelError
from serving.auth import caller, client_key
from serving.context import ServingContext, context
from serving.engine import AdapterSet, GenerationParams, Piece
from serving.model_names import adapter_set
from serving.openai_routes import PING_SECONDS, respond
from serving.queue import Ticket
from serving.response_models import RESPONSE_EVENTS, ResponseDeleted, ResponseObject, ResponseRequest
from serving.response_store import ResponseStore
from serving.schemas import SamplingFields

router = APIRouter(dependencies=[Depends(client_key)])
_opening = threading.Lock()


def store_for(app: FastAPI) -> ResponseStore:
    """The app's response store, opened on first use (under SCALPEL_HOME's state folder)."""
    with _opening:
        found = getattr(app.state, "response_store", None)
        if found is None:
            found = app.state.response_store = ResponseStore()
        return found


@dataclass
class Answer:
    """One response as it is built: its ids, the request's echoed fields, and the text so far."""

    body: ResponseRequest
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    item_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish: str | None = None
    usage: dict | None = None

    @property
    def status(self) -> str:
        return {None: "in_progress", "stop": "completed"}.get(self.finish, "incomplete")

    def part(self) -> dict:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": self.logprobs}

    def message(self, content: bool = True) -> dict:
        return {
            "id": self.item_id,
            "type": "message",
            "role": "assistant",
            "status": self.status,
            "content": [self.part()] if content else [],
        }

    def response(self) -> dict:
        body, usage = self.body, self.usage
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "model": body.model,
            "output": [self.message()] if self.finish else [],
            "usage": {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"],
            }
            if usage
            else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": body.instructions,
            "previous_response_id": body.previous_response_id,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_logprobs": body.top_logprobs,
            "store": body.store,
            "metadata": body.metadata or {},
            "text": {"format": body.text.format.shown() if body.text else {"type": "text"}},
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
            "truncation": "disabled",
            "background": False,
        }

    def take(self, piece: Piece) -> None:
        self.text += piece.text
        self.logprobs += piece.logprobs
        if piece.finish_reason:
            self.finish, self.usage = piece.finish_reason, piece.usage or {}


@router.post("/v1/responses", responses={200: {"model": ResponseObject, "content": RESPONSE_EVENTS}})
async def create_response(request: Request, body: ResponseRequest, ctx: ServingContext = Depends(context)):
    body.check_supported()
    engine, owner = ctx.engine, caller(request).owner
    store = await anyio.to_thread.run_sync(store_for, request.app)
    history: list[dict] = []
    if body.previous_response_id:
        earlier = await anyio.to_thread.run_sync(store.get, body.previous_response_id, owner, "previous_response_id")
        history = earlier.messages
    turn = body.input_messages()
    # The previous response's instructions are not carried over (as OpenAI does): only this request's apply.
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    adapters = await anyio.to_thread.run_sync(adapter_set, ctx, body.model, body.adapters)
    tokens = await anyio.to_thread.run_sync(engine.chat_tokens, [*system, *history, *turn])
    try:
        engine.check_fits(len(tokens), body.max_output_tokens)
    except ScalpelError as exc:
        if exc.code == "context_length_exceeded":
            raise ScalpelError(exc.message, param="input", code=exc.code) from exc
        raise
    params = GenerationParams(
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        logprobs=body.wants_logprobs,
        top_logprobs=body.top_logprobs or 0,
        grammar=await anyio.to_thread.run_sync(body.grammar),  # a large schema takes a while to convert
    )
    answer = Answer(body)

    def keep() -> None:
        if body.store:
            conversation = [*history, *turn, {"role": "assistant", "content": answer.text}]
            store.save(answer.response(), conversation, owner)

    if body.stream:
        ticket = engine.queue.reserve()  # 429 now, before any response starts
        events = _events(ctx, tokens, adapters, params, ticket, answer, keep)
        # also released after the response: a client gone before the stream began never runs its finally
        return EventSourceResponse(events, ping=PING_SECONDS, background=BackgroundTask(engine.queue.release, ticket))

    def whole(text: str, logprobs: list, finish: str, usage: dict) -> dict:
        answer.take(Piece(text=text, logprobs=logprobs, finish_reason=finish, usage=usage))
        return answer.response()

    # chat's own path: admission, a worker thread, and cancellation when the client leaves
    shown = SamplingFields(model=body.model, adapters=body.adapters)
    result = await respond(ctx, request, shown, tokens, params, lambda _: {}, whole)
    await anyio.to_thread.run_sync(keep)
    return result


async def _events(
    ctx: ServingContext,
    tokens: list[int],
    adapters: AdapterSet,
    params: GenerationParams,
    ticket: Ticket,
    answer: Answer,
    keep: Callable[[], None],
) -> AsyncIterator[ServerSentEvent]:
    """Generate in a worker thread and relay the Responses API's events; a client that leaves cancels."""
    engine = ctx.engine
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    numbers = itertools.count()

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

    def event(kind: str, **fields) -> ServerSentEvent:
        data = {"type": kind, **fields, "sequence_number": next(numbers)}
        return ServerSentEvent(data=json.dumps(data), event=kind)

    where = {"item_id": answer.item_id, "output_index": 0, "content_index": 0}
    threading.Thread(target=work, daemon=True).start()
    try:
        yield event("response.created", response=answer.response())
        yield event("response.in_progress", response=answer.response())
        yield event("response.output_item.added", output_index=0, item=answer.message(content=False))
        yield event("response.content_part.added", **where, part=answer.part())
        while (piece := await pieces.get()) is not None:
            if isinstance(piece, Exception):
                known = piece if isinstance(piece, ScalpelError) else None
                yield event(
                    "error",
                    code=known.code if known else "server_error",
                    message=known.message if known else "generation failed",
                    param=known.param if known else None,
                )
                return
            answer.take(piece)
            if piece.text or piece.logprobs:
                yield event("response.output_text.delta", **where, delta=piece.text, logprobs=piece.logprobs)
        if answer.finish is None:
            return  # cancelled: nothing more to say
        yield event("response.output_text.done", **where, text=answer.text, logprobs=answer.logprobs)
        yield event("response.content_part.done", **where, part=answer.part())
        yield event("response.output_item.done", output_index=0, item=answer.message())
        ctx.metrics.count_usage(answer.usage)
        await anyio.to_thread.run_sync(keep)
        final = "response.completed" if answer.status == "completed" else "response.incomplete"
        yield event(final, response=answer.response())
    finally:
        cancelled.set()
        engine.queue.release(ticket)


@router.get("/v1/responses/{response_id}", responses={200: {"model": ResponseObject}})
async def get_response(response_id: str, request: Request):
    store = await anyio.to_thread.run_sync(store_for, request.app)
    found = await anyio.to_thread.run_sync(store.get, response_id, caller(request).owner)
    return found.response


@router.delete("/v1/responses/{response_id}", responses={200: {"model": ResponseDeleted}})
async def delete_response(response_id: str, request: Request):
    store = await anyio.to_thread.run_sync(store_for, request.app)
    await anyio.to_thread.run_sync(store.delete, response_id, caller(request).owner)
    return {"id": response_id, "object": "response", "deleted": True}
