"""The engine in its own process: the HTTP front end can neither starve it nor die with it.

`EngineProcess` has the Engine's interface. The front end keeps only the vocabulary (to tokenize and check
requests without a round trip) and talks to a child process that runs the Engine, over one
`multiprocessing` pipe. This is vLLM V1's split (an engine core process behind an API server process): the
child's loop never shares a GIL or an event loop with the server. If the child dies (a llama.cpp abort, a
signal, an OOM kill), every request inside it gets a 503 in OpenAI's error shape, and a new child starts with
the same base and the same loaded adapters.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from core import adapter_store, threads
from core.errors import ScalpelError
from core.model_store import ModelEntry
from serving.engine import AdapterSet, Engine, EngineDown, EngineFront, Flag, Scores
from serving.queue import FairQueue
from serving.sampling import GenerationParams, Sampler
from serving.settings import EngineSettings
from serving.text_stream import Piece
from serving.tokenizer import Tokenizer

log = logging.getLogger("scalpel.serving")
CANCEL_POLL_SECONDS = 0.05  # how often the watcher looks for requests whose client left
START_TIMEOUT_SECONDS = 120.0


def _encode_error(exc: BaseException) -> tuple:
    if isinstance(exc, ScalpelError):
        return ("error", exc.message, exc.param, exc.code, exc.status, exc.type)
    return ("error", "the engine failed on this request", None, "engine_error", 503, "server_error")


def _decode_error(wire: tuple) -> ScalpelError:
    _, message, param, code, status, kind = wire
    error = ScalpelError(message, param=param, code=code, status=status)
    error.type = kind
    return error


def _child(conn, base: ModelEntry, settings: EngineSettings, versions: list[adapter_store.AdapterVersion]) -> None:
    """The engine process: run an Engine and answer the front end's messages until the pipe closes."""
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        # OSError: the front end is gone (closed or dead), and nobody is left to tell.
        with send_lock, contextlib.suppress(OSError):
            conn.send(message)

    engine = Engine(base, settings)
    for version in versions:
        try:
            engine.load(version)
        except ScalpelError as exc:  # changed on disk since: serve without it, and say so
            log.error("engine restart: %s not reloaded: %s", version.ref, exc.message)
    engine.add_switch_listener(lambda seconds: send(("switch", seconds)))
    requests: dict[int, Any] = {}
    table = threading.Lock()  # `requests`: filled by this reader, emptied by the engine thread

    def call(rid: int, work: Callable[[], object]) -> None:
        try:
            send(("reply", rid, True, work()))
        except BaseException as exc:  # sent back to the caller
            send(("reply", rid, False, _encode_error(exc)))

    send(("ready", engine.n_ctx, engine.loaded()))
    try:
        while True:
            try:
                if not conn.poll(1.0):
                    if not engine.alive():  # its loop died: exit, and the front end starts a new engine
                        os._exit(70)
                    continue
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind, rid, *args = message
            if kind == "generate":
                tokens, adapters, params, max_tokens = args

                def emit(item, rid=rid) -> None:
                    if item is None:
                        with table:
                            requests.pop(rid, None)
                        send(("end", rid, engine.cancelled_generations))
                    elif isinstance(item, BaseException):
                        send(("item", rid, _encode_error(item)))
                    else:
                        send(("item", rid, item))

                try:
                    with table:  # so a request that ends at once is not put back after its end
                        requests[rid] = engine.submit(tokens, adapters, params, emit, max_tokens=max_tokens)
                except BaseException as exc:  # refused before it was queued
                    emit(exc)
                    emit(None)
            elif kind == "cancel":
                with table:
                    request = requests.get(rid)
                if request is not None:
                    request.gone.set()
                    engine.wake()
            elif kind == "close":
                break
            else:  # load, unload, score: they wait for the engine thread, so not on this reader
                method = getattr(engine, kind)
                threading.Thread(target=call, args=(rid, lambda m=method, a=args: m(*a)), daemon=True).start()
    finally:
        engine.close()


class EngineProcess(EngineFront):
    """The Engine's interface, served by an engine process that restarts when it dies."""

    def __init__(self, base: ModelEntry, settings: EngineSettings = EngineSettings()):
        self.base = base
        self.settings = settings
        self.threads = threads.resolve(settings.threads)
        self.tokenizer = Tokenizer(base)  # the vocabulary only
        self.queue = FairQueue(settings.max_waiting, running=settings.slots)
        self.n_ctx = settings.n_ctx
        self.adapter_switches = 0
        self.cancelled_generations = 0
        self.restarts = 0
        self.state = "starting"
        self._switch_listeners: list[Callable[[float], None]] = []
        self._versions: dict[str, adapter_store.AdapterVersion] = {}  # loaded in the engine: reloaded on restart
        self._streams: dict[int, Callable[[Piece | BaseException | None], None]] = {}  # emit, by request id
        self._watched: dict[int, Flag] = {}  # running requests' cancel events
        self._replies: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # the pipe's sending end, the tables above and the process handle
        self._mp = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self._closing = False
        self._ready = threading.Event()
        threading.Thread(target=self._watch_cancels, name="scalpel-engine-cancels", daemon=True).start()
        self._start()
        if not self._ready.wait(START_TIMEOUT_SECONDS) or self.state != "ready":
            self.close()
            raise EngineDown("the engine process did not start", code="engine_failed")

    # --- the process ----------------------------------------------------------------------------
    def _start(self) -> None:
        parent, child = self._mp.Pipe()
        process = self._mp.Process(
            target=_child,
            args=(child, self.base, self.settings, list(self._versions.values())),
            name="scalpel-engine",
            daemon=True,
        )
        process.start()
        child.close()  # only the child holds its end: its death is an EOF here
        self._conn, self.process = parent, process
        threading.Thread(target=self._reader, args=(parent, process), name="scalpel-engine-reader", daemon=True).start()

    def _reader(self, conn, process) -> None:
        became_ready = False
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            try:
                became_ready = self._dispatch(message) or became_ready
            except Exception:  # one bad callback must not stop the reading (a crash would go unnoticed)
                log.exception("a message from the engine could not be handed over")
        process.join(timeout=5)
        if process.is_alive():  # its pipe closed but it lingers: make sure it is gone before another starts
            process.kill()
            process.join(timeout=5)
        self._engine_died(process.exitcode, restart=became_ready)

    def _dispatch(self, message: tuple) -> bool:
        """Hand one message from the engine to whoever waits for it; True when it says the engine is ready."""
        kind, *rest = message
        if kind == "item":
            rid, item = rest
            if (emit := self._streams.get(rid)) is not None:
                emit(_decode_error(item) if isinstance(item, tuple) else item)
        elif kind == "end":
            rid, self.cancelled_generations = rest
            self._watched.pop(rid, None)
            if (emit := self._streams.pop(rid, None)) is not None:
                emit(None)
        elif kind == "reply":
            rid, ok, value = rest
            if (future := self._replies.pop(rid, None)) is not None:
                future.set_result(value) if ok else future.set_exception(_decode_error(value))
        elif kind == "switch":
            self.adapter_switches += 1
            for listener in self._switch_listeners:
                listener(rest[0])
        elif kind == "ready":
            self.n_ctx, loaded = rest
            self._versions = {ref: v for ref, v in self._versions.items() if ref in loaded}
            self.state = "ready"
            self._ready.set()
            return True
        return False

    def _engine_died(self, exitcode: int | None, *, restart: bool) -> None:
        """Fail everything that was inside the engine with a 503, then start a new one.

        Not when closing, and not when the engine died before it was ever ready (it would die again).
        """
        with self._lock:
            streams, replies = list(self._streams.values()), list(self._replies.values())
            self._streams.clear()
            self._replies.clear()
            restart = restart and not self._closing
            self.state = "restarting" if restart else ("stopped" if self._closing else "failed")
            if restart:
                self._ready.clear()
            else:
                self._ready.set()  # wakes a constructor that waits for a start that failed

        if restart:
            log.error("the engine process exited (code %s); restarting it", exitcode)
        down = EngineDown("the engine stopped while answering; retry the request", code="engine_restarting")
        for emit in streams:
            emit(down)
            emit(None)
        for future in replies:
            future.set_exception(down)
        if restart:
            self.restarts += 1
            with self._lock:
                if not self._closing:  # close() may have come while the requests above were failed
                    self._start()

    def _watch_cancels(self) -> None:
        """Tell the engine about requests whose client left, whether or not anyone still reads their stream."""
        while not self._closing:
            time.sleep(CANCEL_POLL_SECONDS)
            with self._lock:
                gone = [rid for rid, event in list(self._watched.items()) if event.is_set()]
                for rid in gone:
                    self._watched.pop(rid, None)
                    if self.state == "ready":
                        with contextlib.suppress(OSError, ValueError):
                            self._conn.send(("cancel", rid))

    def _send(self, message: tuple) -> None:
        if self.state != "ready":
            raise EngineDown(f"the engine is {self.state}; retry in a few seconds", code="engine_" + self.state)
        try:
            self._conn.send(message)
        except (OSError, ValueError) as exc:
            raise EngineDown("the engine stopped; retry in a few seconds", code="engine_restarting") from exc

    def _request(self, kind: str, *args) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            rid = next(self._ids)
            self._replies[rid] = future
            try:
                self._send((kind, rid, *args))
            except EngineDown:
                del self._replies[rid]
                raise
        return future.result()

    # --- the Engine's interface (the vocabulary's part comes from EngineFront) ------------------
    def loaded(self) -> list[str]:
        return sorted(self._versions)

    def load(self, version: adapter_store.AdapterVersion) -> str:
        if version.ref in self._versions:
            return version.ref
        ref = self._request("load", version)
        self._versions[ref] = version
        return ref

    def unload(self, ref: str) -> None:
        self._request("unload", ref)
        self._versions.pop(ref, None)

    def score(self, tokens: list[int], adapters: AdapterSet) -> Scores:
        return self._request("score", tokens, adapters)

    def submit(
        self,
        tokens: list[int],
        adapters: AdapterSet,
        params: GenerationParams,
        emit: Callable[[Piece | BaseException | None], None],
        *,
        cancelled: Flag | None = None,
        max_tokens: int | None = None,
    ) -> int:
        """Queue a generation whose pieces go to `emit`, from the pipe's reader thread; `None` marks the end."""
        if not tokens:
            raise ScalpelError("the prompt is empty", param="prompt")
        max_tokens = max_tokens if max_tokens is not None else self.check_fits(len(tokens), params.max_tokens)
        # A bad grammar or bias is the caller's 400, before anything is queued (the engine would refuse it later).
        Sampler(params, self.tokenizer.vocab, self.tokenizer.n_vocab).free()
        with self._lock:
            rid = next(self._ids)
            self._streams[rid] = emit
            if cancelled is not None:
                self._watched[rid] = cancelled
            try:
                self._send(("generate", rid, tokens, adapters, params, max_tokens))
            except EngineDown:
                del self._streams[rid]
                self._watched.pop(rid, None)
                raise
        return rid

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Block until the engine answers again (after a restart); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state == "ready":
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.queue.close()
        with self._lock:
            self._closing = True
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(("close", -1))
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.tokenizer.close()
