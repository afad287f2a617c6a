"""A serving fleet on Ray Serve: replicas that each run the whole app on their own engine, behind an ingress that
routes every request by its `model` with Ray's model multiplexing, so an adapter is loaded on few replicas.

- `Replica` builds the engine and the app (create_app) once, and answers each forwarded request by running it
  through that app over ASGI: every route, error and server-sent event is the single server's, byte for byte.
  The adapter version a request names is Ray's multiplexed model id; `@serve.multiplexed` keeps at most
  `max_adapters` of them loaded per replica and unloads the least recently used one.
- `Ingress` reads the request's `model` (the body is forwarded as it came), resolves it against the adapter
  store (the live version now), and streams the replica's answer back. A request whose replica died before
  its first byte is sent to another replica; once bytes have gone out it ends as the single server's engine
  death does (an error event on a stream).

The live version is read from the store for every request (the ingress to route it, the replica's app to
answer it), so a promote or a rollback applies to the next request on every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from core.errors import ScalpelError
from serving.engine import Engine, EngineDown
from serving.fleet_routing import Forwarded, Start, routed_model, stored_version
from serving.middleware import BodyTooLarge, internal_error
from serving.queue import QueueFull

log = logging.getLogger("scalpel.serving")

REPLICA_HEADER = "x-scalpel-replica"  # which replica answered (Ray's replica id), on every fleet response
PID_HEADER = "x-scalpel-pid"  # that replica's process (operators kill or profile it by this)
MAX_ATTEMPTS = 3  # a request is tried on this many replicas while each dies before answering
RETRY_PAUSE_S = 0.5  # between two attempts: Ray drops a dead replica from its routing table meanwhile
APP_EXIT_S = 5.0  # a finished or abandoned request's app task gets this long to end before it is cancelled
# Routes that change nothing but the answer: tried again on another replica when theirs died before answering.
# A promote, a rollback or a delete is never sent twice.
RETRIED = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize"}
)

Builder = Callable[[], tuple[Engine, FastAPI]]  # makes one replica's engine and app (in the replica's process)


class Held:
    """One adapter version the multiplexer keeps on this replica; Ray calls __del__ when it evicts it."""

    def __init__(self, engine: Engine, ref: str, held: set[str]):
        self.engine, self.ref, self._held, self._done = engine, ref, held, False
        held.add(ref)

    def __del__(self) -> None:  # Ray calls it on eviction (in a thread), and the garbage collector once more
        if self._done:
            return
        self._done = True
        self._held.discard(self.ref)
        with contextlib.suppress(Exception):  # the engine may be closing with the replica
            self.engine.unload(self.ref)


class Replica:
    """One engine and the app on it, in a Ray actor of its own (Ray restarts it if the process dies)."""

    async def __init__(self, build: Builder, max_adapters: int = 3):  # type: ignore[misc]  # Ray awaits it
        self.engine, self.app = await asyncio.to_thread(build)
        self._lifespan = contextlib.AsyncExitStack()
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        self._held: set[str] = set()  # the engine refs the multiplexer keeps loaded
        self._sweeps: set[asyncio.Task] = set()
        context = serve.get_replica_context()
        self._headers = [
            (REPLICA_HEADER.encode(), context.replica_id.unique_id.encode()),
            (PID_HEADER.encode(), str(os.getpid()).encode()),
        ]

        async def load_adapter(model_id: str) -> Held:
            version = stored_version(model_id)
            held = Held(self.engine, version.ref, self._held)  # held first: a sweep meanwhile leaves it loaded
            try:
                await asyncio.to_thread(self.engine.load, version)
            except BaseException:
                held.__del__()
                raise
            return held

        # Set up here, not as a decorated method, so the bound comes from the fleet's settings.
        self._adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load_adapter)

    async def handle(self, request: Forwarded) -> AsyncIterator[Start | bytes]:
        """Answer one request with the app: a Start, then the rest of the body as it is sent."""
        if (model_id := serve.get_multiplexed_model_id()) and request.method == "POST":
            # A version that does not load (damaged, another base's) is left to the app, which answers the
            # request with the single server's error. A GET routed by a model (/health?model=) loads nothing.
            with contextlib.suppress(Exception):
                await self._adapter(model_id)
        try:
            async for item in self._run(request):
                yield item
        finally:
            self._sweep_soon()

    async def _run(self, request: Forwarded) -> AsyncIterator[Start | bytes]:
        """Run the ASGI app on one request, yielding what it sends as it sends it.

        Written by hand because httpx's ASGITransport (and Starlette's TestClient) collect the whole body
        before returning, which would turn every stream into one late answer."""
        sent: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            await sent.put(message)

        async def call() -> None:
            try:
                await self.app(request.scope(), receive, send)
            finally:
                await sent.put(None)

        task = asyncio.create_task(call())
        start: MutableMapping[str, Any] | None = None
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    start = message
                    continue
                if message["type"] != "http.response.body":
                    continue
                body, more = message.get("body", b""), message.get("more_body", False)
                if start is not None:
                    if body or not more:
                        yield Start(start["status"], [*start.get("headers", []), *self._headers], body, more)
                        start = None
                elif body:
                    yield body
                if not more:
                    break
        finally:
            gone.set()  # the app sees the client leave (a stream stops generating)
            try:
                await asyncio.wait_for(asyncio.shield(task), APP_EXIT_S)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()

    def _sweep_soon(self) -> None:
        """Unload what the app loaded beside the multiplexed versions (stacked adapters, a version promoted
        between routing and answering), so a replica never holds more than its bound for long."""
        if self._sweeps:
            return
        task = asyncio.get_running_loop().create_task(self._sweep())
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def _sweep(self) -> None:
        for ref in [r for r in self.engine.loaded() if r not in self._held]:
            with contextlib.suppress(ScalpelError):
                await asyncio.to_thread(self.engine.unload, ref)

    def check_health(self) -> None:
        """Ray's health check: a replica whose engine loop stopped is replaced."""
        if not self.engine.alive():
            raise RuntimeError("the engine loop stopped")

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):
            await self._lifespan.aclose()
        await asyncio.to_thread(self.engine.close)


def _error_response(error: ScalpelError) -> JSONResponse:
    return JSONResponse(error.to_openai(), status_code=error.status)


def _engine_stopped() -> EngineDown:
    return EngineDown("the engine stopped while answering; retry the request", code="engine_restarting")


class Ingress:
    """Ray Serve's HTTP entry: routes each request to a replica by its model and streams the answer back."""

    def __init__(self, replicas: DeploymentHandle, base: str, max_body_bytes: int):
        self.replicas, self.base, self.max_body_bytes = replicas, base, max_body_bytes

    async def __call__(self, request: Request) -> Response:
        body = await self._body(request)
        if body is None:
            return _error_response(
                BodyTooLarge(
                    f"the request body exceeds the limit of {self.max_body_bytes} bytes", code="request_too_large"
                )
            )
        path = request.url.path
        forwarded = Forwarded(
            method=request.method,
            path=path,
            raw_path=request.scope.get("raw_path") or path.encode(),
            query_string=request.scope.get("query_string", b""),
            headers=list(request.scope.get("headers", [])),
            body=body,
            scheme=request.url.scheme,
            http_version=request.scope.get("http_version", "1.1"),
            client=tuple(request.scope["client"]) if request.scope.get("client") else None,
            server=tuple(request.scope["server"]) if request.scope.get("server") else None,
        )
        handle = self.replicas.options(
            multiplexed_model_id=routed_model(request.method, path, forwarded.query_string, body, self.base),
            stream=True,
        )
        attempts = MAX_ATTEMPTS if request.method in ("GET", "HEAD") or path in RETRIED else 1
        for attempt in range(1, attempts + 1):
            stream = cast(DeploymentResponseGenerator, handle.handle.remote(forwarded))
            try:
                start = await stream.__anext__()
            except BackPressureError:
                return _error_response(QueueFull("every replica's line is full; retry later", code="queue_full"))
            except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
                log.warning(
                    "attempt %d of %s %s: its replica died (%s)", attempt, request.method, path, type(exc).__name__
                )
                if attempt < attempts:
                    await asyncio.sleep(RETRY_PAUSE_S)
                continue
            except StopAsyncIteration:  # the replica ended the request without an answer (its app always answers)
                return _error_response(_engine_stopped())
            except RayTaskError as exc:  # a bug in the replica's code outside the app: logged, answered without detail
                return internal_error(exc)
            if start.more:
                response: Response = StreamingResponse(self._rest(start, stream), status_code=start.status)
            else:  # a whole answer: sent as it came, with its length
                response = Response(start.body, status_code=start.status)
            response.raw_headers = list(start.headers)
            return response
        return _error_response(_engine_stopped())

    async def _body(self, request: Request) -> bytes | None:
        """The whole body, or None beyond the app's limit (the replica's Guard would refuse it the same way)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    async def _rest(start: Start, stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
        finished = False
        try:
            yield start.body
            async for chunk in stream:
                yield chunk
            finished = True
        except (RayActorError, ReplicaUnavailableError, RayTaskError) as exc:
            log.warning("a replica stopped while it streamed an answer (%s)", type(exc).__name__)
            media = dict(start.headers).get(b"content-type", b"")
            if media.startswith(b"text/event-stream"):  # as the single server ends a stream when its engine dies
                yield ServerSentEvent(data=json.dumps(_engine_stopped().to_openai())).encode()
                yield ServerSentEvent(data="[DONE]").encode()
            finished = True
        finally:
            if not finished:  # the client left: the replica stops generating
                stream.cancel()
