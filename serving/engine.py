"""The llama.cpp engine: one quantized base, adapters kept loaded beside it, and every request decoded in one loop.

One llama.cpp context holds several sequences (KV slots, serving/slots.py). A single engine thread owns the
context and runs a continuous-batching loop (the shape of llama-server's and vLLM's schedulers):

- a new request takes a free slot, preferring one whose cache already holds a prefix of its prompt under its
  own adapter set, and joins at the next step;
- each step decodes one token for every running request; requests with the same adapter set share one
  `llama_decode`, and each adapter set in turn is applied with `llama_set_adapters_lora` (adapters are never
  merged into the base);
- prompts are evaluated in blocks of `prompt_block` tokens aligned to absolute positions, one request per call,
  so a prompt token is computed in the same batch shape whether its prefix was cached or not;
- every request samples with its own llama.cpp sampler chain (serving/sampling.py).

Callers on other threads only queue work (`generate`, `score`, `load`, `unload`) and read its results.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Protocol

import llama_cpp
import numpy as np

from core import adapter_store, threads
from core.errors import ConflictError, ScalpelError
from core.gguf_meta import BASE_FINGERPRINT_KEY, read_gguf
from core.model_store import ModelEntry
from serving.queue import FairQueue, ShuttingDown, Ticket
from serving.sampling import GenerationParams, Sampler, logprob_entry
from serving.settings import EngineSettings
from serving.slots import AdapterSet, Slot, SlotTable
from serving.text_stream import Piece, TextStream
from serving.tokenizer import Tokenizer, quiet_llama_logs

__all__ = ["PROBE_PROMPT", "AdapterSet", "Engine", "EngineDown", "EngineFront", "GenerationParams", "Piece", "Scores"]

log = logging.getLogger("scalpel.serving")
PROBE_PROMPT = "Hello, world."  # evaluated with every adapter as it loads: its logits must be finite
SCORE_BATCH = 512  # tokens per llama_decode when scoring a text (and the context's n_batch)


def answer_room(n_ctx: int, n_prompt: int, max_tokens: int | None) -> int:
    """The answer's room in one slot; a prompt that does not fit is refused before it is queued."""
    if n_prompt >= n_ctx:
        raise ScalpelError(
            f"the prompt has {n_prompt} tokens but the context holds {n_ctx}",
            param="messages",
            code="context_length_exceeded",
        )
    return n_ctx - n_prompt if max_tokens is None else min(max_tokens, n_ctx - n_prompt)


class EngineDown(ScalpelError):
    """The engine stopped (it crashed or the server is shutting down) while the request was in it."""

    status = 503
    type = "server_error"


@dataclass
class Scores:
    """Engine.score's answer, one value per position after the first token."""

    logprobs: np.ndarray  # log-probability of the next token given the ones before it
    choices: np.ndarray  # the token the model would have chosen there (greedy)
    margins: np.ndarray  # top-1 minus top-2 logit: how decided that choice was


class _Request:
    """One generation inside the engine loop."""

    def __init__(self, tokens, adapters, params, max_tokens, sampler, emit, cancelled):
        self.tokens: list[int] = tokens
        self.adapters: AdapterSet = adapters
        self.params: GenerationParams = params
        self.max_tokens: int = max_tokens
        self.sampler = sampler
        self.emit: Callable[[Piece | BaseException | None], None] = emit  # None: the end
        self.cancelled: Flag | None = cancelled
        self.gone = threading.Event()  # the reader stopped reading
        self.stream = TextStream(params.stop, len(tokens))
        self.slot: Slot | None = None
        self.n_done = 0  # prompt tokens in the slot's cache
        self.next_token: int | None = None  # sampled, not yet decoded

    @property
    def stopped(self) -> bool:
        return self.gone.is_set() or (self.cancelled is not None and self.cancelled.is_set())


class Flag(Protocol):
    """A cancellation signal: a threading.Event, or Either of two."""

    def is_set(self) -> bool: ...


class Either:
    """Set when either event is: the client left (`first`) or the reader stopped reading (`second`)."""

    def __init__(self, first: Flag | None, second: Flag):
        self.first, self.second = first, second

    def is_set(self) -> bool:
        return self.second.is_set() or (self.first is not None and self.first.is_set())


class EngineFront:
    """What the Engine and the EngineProcess share: the vocabulary, the context's room, admission, switch
    listeners, and `generate` as an iterator over `submit`."""

    tokenizer: Tokenizer
    n_ctx: int  # tokens per slot
    queue: FairQueue
    _switch_listeners: list[Callable[[float], None]]

    def add_switch_listener(self, listener: Callable[[float], None]) -> None:
        """Call `listener` with the seconds every later adapter-set change takes."""
        self._switch_listeners.append(listener)

    def chat_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.tokenizer.chat_tokens(messages, tools)

    def text_tokens(self, text: str) -> list[int]:
        return self.tokenizer.text_tokens(text)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.detokenize(tokens)

    def check_fits(self, n_prompt: int, max_tokens: int | None) -> int:
        return answer_room(self.n_ctx, n_prompt, max_tokens)

    def submit(
        self,
        tokens: list[int],
        adapters: AdapterSet,
        params: GenerationParams,
        emit: Callable[[Piece | BaseException | None], None],
        *,
        cancelled: Flag | None = None,
        max_tokens: int | None = None,
    ) -> object:
        """Queue a generation whose pieces go to `emit` (from another thread); `None` marks the end."""
        raise NotImplementedError

    def wake(self) -> None:
        """Have the engine look at its requests now (one was cancelled from outside); a no-op where it polls."""

    def generate(
        self,
        tokens: list[int],
        adapters: AdapterSet,
        params: GenerationParams,
        *,
        ticket: Ticket | None = None,
        cancelled: threading.Event | None = None,
    ) -> Iterator[Piece]:
        """Decode with llama.cpp's sampler, releasing text as it becomes final.

        Text that could still turn into a stop sequence is held back; the last Piece carries the
        finish_reason and exact usage (every sampled token but an end-of-generation one). A reader that stops
        reading cancels the generation, as `cancelled` does.
        """
        max_tokens = self.check_fits(len(tokens), params.max_tokens)
        ticket = ticket or self.queue.reserve()
        out: SimpleQueue = SimpleQueue()
        gone = threading.Event()
        try:
            self.submit(tokens, adapters, params, out.put, cancelled=Either(cancelled, gone), max_tokens=max_tokens)
        except BaseException:
            self.queue.release(ticket)
            raise
        return self._read(out, ticket, gone)

    def _read(self, out: SimpleQueue, ticket: Ticket, gone: threading.Event) -> Iterator[Piece]:
        try:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            gone.set()
            self.queue.release(ticket)
            self.wake()


class Engine(EngineFront):
    """Holds the base model and its context; the engine thread is the only one that touches the context."""

    def __init__(self, base: ModelEntry, settings: EngineSettings = EngineSettings()):
        self.base = base
        self.settings = settings
        # The same count for decoding and for prompt evaluation (llama-cpp-python's defaults are
        # cpu_count // 2 and cpu_count, which starve or oversubscribe a small VM).
        self.threads = threads.resolve(settings.threads)
        llama_cpp.llama_backend_init()
        quiet_llama_logs()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = settings.n_gpu_layers
        mparams.use_mmap = settings.use_mmap
        self.model = llama_cpp.llama_model_load_from_file(str(base.gguf).encode(), mparams)
        if not self.model:
            raise ScalpelError(f"llama.cpp could not load the model {base.name!r}", code="model_unreadable")
        self.tokenizer = Tokenizer(base, self.model)
        cparams = llama_cpp.llama_context_default_params()
        n_seqs = settings.slots + 1  # the last sequence is the engine's scratch space (scoring, probes)
        cparams.n_ctx = settings.n_ctx * n_seqs
        cparams.n_batch = cparams.n_ubatch = max(SCORE_BATCH, settings.prompt_block, n_seqs)
        cparams.n_seq_max = n_seqs
        cparams.kv_unified = False  # one KV stream per sequence: a request's attention never sees another's cells
        cparams.n_threads = cparams.n_threads_batch = self.threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ScalpelError("llama.cpp could not create a context for these settings", code="context_failed")
        self.n_ctx = min(llama_cpp.llama_n_ctx_seq(self.ctx), settings.n_ctx)  # per slot (llama.cpp rounds up)
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        self._scratch = settings.slots
        self._batch = llama_cpp.llama_batch_init(cparams.n_batch, 0, 1)
        self.slots = SlotTable(settings.slots, settings.prompt_block)
        self.queue = FairQueue(settings.max_waiting, running=settings.slots)  # admission: a bounded line, 429 beyond it

        self._loaded: dict[str, ctypes.c_void_p] = {}  # adapter ref -> llama_adapter_lora pointer
        self._retired: dict[str, ctypes.c_void_p] = {}  # unloaded while a request still used them
        self._versions: dict[str, adapter_store.AdapterVersion] = {}  # every ref ever loaded, to reload
        self._applied: AdapterSet = ()
        self.adapter_switches = 0
        self.cancelled_generations = 0  # stopped early because the client went away
        self.state = "ready"  # as /health reports it (an EngineProcess is also "restarting" after a crash)
        self.steps = 0  # decode steps run (a step decodes every running request once)
        self._switch_listeners: list[Callable[[float], None]] = []  # told each switch's seconds (metrics)

        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._tasks: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._active: list[_Request] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="scalpel-engine", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """Whether the engine loop still runs (it stops only when closed, or if it failed)."""
        return self._thread.is_alive()

    def wake(self) -> None:
        """Have the engine loop look at its requests now (one was cancelled from outside)."""
        with self._cond:
            self._cond.notify_all()

    # --- adapters -------------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    def load(self, version: adapter_store.AdapterVersion) -> str:
        """Load one stored adapter version (idempotent); refuse a corrupt file or another base's adapter."""
        if version.ref in self._loaded:
            return version.ref
        adapter_store.verify(version)  # the manifest's hashes (cached until a file's size or mtime changes)
        info = read_gguf(version.gguf, with_tokens=False)
        if info.file_type != "adapter" or info.metadata.get("adapter.type") != "lora":
            raise ScalpelError(
                f"{version.ref}: adapter.gguf is not a LoRA adapter", param="model", code="invalid_adapter"
            )
        trained_on = info.metadata.get(BASE_FINGERPRINT_KEY)
        if info.architecture != self.base.architecture or (trained_on and trained_on != self.base.fingerprint):
            raise ConflictError(
                f"{version.ref} was converted for another base model than {self.base.name!r}",
                param="model",
                code="base_mismatch",
            )
        self._call(lambda: self._init_adapter(version))
        return version.ref

    def unload(self, ref: str) -> None:
        self._call(lambda: self._unload(ref))

    def _init_adapter(self, version: adapter_store.AdapterVersion) -> None:
        """Load (or take back from the retired ones) an adapter, probed on a short prompt first."""
        if (pointer := self._loaded.get(version.ref) or self._retired.pop(version.ref, None)) is not None:
            self._loaded[version.ref] = pointer
            return
        pointer = self._open(version)
        try:
            finite = self._probe_finite(pointer)
        except BaseException:  # the probe itself failed: do not keep a pointer nobody will free
            llama_cpp.llama_adapter_lora_free(pointer)
            raise
        if not finite:
            llama_cpp.llama_adapter_lora_free(pointer)
            raise ConflictError(
                f"{version.ref} gives non-finite logits (NaN or infinity) on a probe prompt: its weights are damaged",
                param="model",
                code="adapter_not_finite",
            )
        self._loaded[version.ref] = pointer
        self._versions[version.ref] = version

    def _open(self, version: adapter_store.AdapterVersion) -> ctypes.c_void_p:
        pointer = llama_cpp.llama_adapter_lora_init(self.model, str(version.gguf).encode())
        if not pointer:
            raise ScalpelError(f"llama.cpp could not load {version.ref}", param="model", code="invalid_adapter")
        return pointer

    def _reopen(self, ref: str) -> ctypes.c_void_p:
        """An adapter unloaded after a request chose it: the request still gets it, as a retired pointer that is
        freed when no request uses it (it is not listed as loaded again)."""
        self._retired[ref] = pointer = self._open(self._versions[ref])
        return pointer

    def _probe_finite(self, pointer: ctypes.c_void_p) -> bool:
        """Evaluate a short prompt with the adapter alone, in the scratch sequence; every logit must be finite."""
        tokens = self.text_tokens(PROBE_PROMPT)
        self._apply_pointers([pointer], [1.0], (("(probe)", 1.0),))
        try:
            self._decode_seq(self._scratch, tokens, 0, logits="last")
            logits = self._logits(len(tokens) - 1)
            return bool(np.isfinite(logits).all())
        finally:
            llama_cpp.llama_memory_seq_rm(self._memory, self._scratch, -1, -1)
            self._apply(())

    def _unload(self, ref: str) -> None:
        pointer = self._loaded.pop(ref, None)
        if pointer is None:
            return
        for slot in self.slots.forget(ref):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        self._retired[ref] = pointer
        self._free_retired()

    def _free_retired(self) -> None:
        """Free unloaded adapters that no queued or running request still uses."""
        used = {ref for r in (*self._active, *self._waiting) for ref, _ in r.adapters}
        for ref in [r for r in self._retired if r not in used]:
            if any(r == ref for r, _ in self._applied):
                self._apply(())
            llama_cpp.llama_adapter_lora_free(self._retired.pop(ref))

    def _apply(self, adapters: AdapterSet) -> None:
        """Apply an adapter set to the context (engine thread). The KV slots are keyed by it, so nothing is reset."""
        if adapters == self._applied:
            return
        # unloaded after a request chose it: the request still gets it
        pointers = [self._loaded.get(r) or self._retired.get(r) or self._reopen(r) for r, _ in adapters]
        self._apply_pointers(pointers, [s for _, s in adapters], adapters)

    def _apply_pointers(self, pointers: list, scales: list[float], adapters: AdapterSet) -> None:
        begun = time.perf_counter()
        n = len(pointers)
        array = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*pointers)  # llama.cpp's own handles
        factors = (ctypes.c_float * max(n, 1))(*scales)
        if llama_cpp.llama_set_adapters_lora(self.ctx, array, n, factors):
            raise ScalpelError("llama.cpp refused the adapter set", code="adapter_apply_failed", status=503)
        self._applied = adapters
        self.adapter_switches += 1
        elapsed = time.perf_counter() - begun
        for listener in self._switch_listeners:
            listener(elapsed)

    # --- requests -------------------------------------------------------------------------------
    def submit(
        self,
        tokens: list[int],
        adapters: AdapterSet,
        params: GenerationParams,
        emit: Callable[[Piece | BaseException | None], None],
        *,
        cancelled: Flag | None = None,
        max_tokens: int | None = None,
    ) -> _Request:
        """Queue a generation whose pieces go to `emit`, from the engine thread; `None` marks the end."""
        if not tokens:
            raise ScalpelError("the prompt is empty", param="prompt")
        for ref, _ in adapters:
            if ref not in self._loaded and ref not in self._versions:
                raise ScalpelError(f"the adapter {ref!r} is not loaded", param="model", code="adapter_not_loaded")
        if self._closed:
            raise ShuttingDown("the server is shutting down", code="shutting_down")
        max_tokens = max_tokens if max_tokens is not None else self.check_fits(len(tokens), params.max_tokens)
        sampler = Sampler(params, self.tokenizer.vocab, self.tokenizer.n_vocab)  # a bad grammar fails here
        request = _Request(list(tokens), adapters, params, max_tokens, sampler, emit, cancelled)
        with self._cond:
            if self._closed:
                sampler.free()
                raise ShuttingDown("the server is shutting down", code="shutting_down")
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def score(self, tokens: list[int], adapters: AdapterSet) -> Scores:
        """Teacher-forced scoring under an adapter set: for every token after the first, its log-probability
        given the tokens before it, the token the model would have chosen there (greedy), and by how much
        (top-1 minus top-2 logit).

        Used for perplexity and for agreement with reference answers; it runs on the engine thread with the
        same adapter switching as generation, so it measures what is served.
        """
        if len(tokens) < 2:
            raise ScalpelError("scoring needs at least two tokens", param="tokens")
        self.check_fits(len(tokens), 0)
        return self._call(lambda: self._score(tokens, adapters))  # type: ignore[return-value]

    def _score(self, tokens: list[int], adapters: AdapterSet) -> Scores:
        n = len(tokens) - 1
        logprobs, choices, margins = np.zeros(n, np.float64), np.zeros(n, np.int64), np.zeros(n, np.float64)
        self._apply(adapters)
        seq = self._scratch
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        try:
            for start in range(0, len(tokens), SCORE_BATCH):
                chunk = tokens[start : start + SCORE_BATCH]
                self._decode_seq(seq, chunk, start, logits="all")
                for i in range(len(chunk)):
                    position = start + i
                    if position >= n:
                        break
                    logits = self._logits(i)
                    shifted = logits.astype(np.float64) - logits.max()
                    logprobs[position] = shifted[tokens[position + 1]] - np.log(np.exp(shifted).sum())
                    top2 = np.partition(logits, -2)[-2:]
                    choices[position], margins[position] = int(logits.argmax()), float(top2[1] - top2[0])
        finally:
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        return Scores(logprobs, choices, margins)

    def _call(self, work: Callable[[], object]) -> object:
        """Run `work` on the engine thread between two steps and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return work()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down", code="shutting_down")
            self._tasks.append((work, future))
            self._cond.notify_all()
        return future.result()

    # --- the engine loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run()
        finally:
            self._shut_down()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._tasks or self._waiting or self._active):
                    self._cond.wait()
                if self._closed:
                    break
                tasks = list(self._tasks)
                self._tasks.clear()
            for work, future in tasks:
                try:
                    future.set_result(work())
                except BaseException as exc:  # handed to the caller's thread
                    future.set_exception(exc)
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception:  # a bug here must not leave every caller waiting on a dead thread
                log.exception("the engine loop failed; ending the requests it was running")
                failed = EngineDown("the engine failed while answering; retry the request", code="engine_error")
                for request in list(self._active):
                    if request.slot is not None:  # what its cache holds is no longer known: forget it
                        llama_cpp.llama_memory_seq_rm(self._memory, request.slot.seq, -1, -1)
                        request.slot.tokens, request.slot.exact = [], 0
                    self._end(request, failed)

    def _admit(self) -> None:
        """Give waiting requests free slots, first come first served; drop those whose client left."""
        with self._cond:
            while self._waiting:
                request = self._waiting[0]
                if request.stopped:
                    self._waiting.popleft()
                    self.cancelled_generations += 1
                    self._end(request)
                    continue
                taken = self.slots.take(request.adapters, request.tokens)
                if taken is None:
                    return
                self._waiting.popleft()
                request.slot, request.n_done = taken
                llama_cpp.llama_memory_seq_rm(self._memory, request.slot.seq, request.n_done, -1)
                self._active.append(request)

    def _step(self) -> None:
        """Decode one token for every running request (grouped by adapter set), then one prompt block each for
        requests still reading their prompt."""
        for request in [r for r in self._active if r.stopped]:
            self.cancelled_generations += 1
            self._end(request)
        groups: dict[AdapterSet, list[_Request]] = {}
        for request in self._active:
            if request.next_token is not None:
                groups.setdefault(request.adapters, []).append(request)
        alone = self.settings.deterministic  # every request in its own call: the batch shape of a lone request
        batches = [
            part for group in self._applied_first(groups) for part in ([[r] for r in group] if alone else [group])
        ]
        for group in batches:
            # ascending sequence ids: llama.cpp splits a batch of separate KV streams wherever the ids do not
            # follow each other, and runs each part as its own graph
            group.sort(key=lambda r: r.slot.seq if r.slot else 0)
            try:
                self._apply(group[0].adapters)
                self._decode_tokens(group)
            except ScalpelError as exc:
                for request in group:
                    self._end(request, exc)
                continue
            for i, request in enumerate(group):
                self._guarded(request, functools.partial(self._sample, request, i))
        prefills: dict[AdapterSet, list[_Request]] = {}
        for request in self._active:
            if request.next_token is None:
                prefills.setdefault(request.adapters, []).append(request)
        for group in self._applied_first(prefills):
            for request in group:
                self._guarded(request, functools.partial(self._prefill, request))
        self.steps += 1

    def _applied_first(self, groups: dict[AdapterSet, list[_Request]]) -> list[list[_Request]]:
        """The groups, the adapter set the context has now first: every change of set makes llama.cpp rebuild
        its compute graphs at the next decode (a few ms), so a step changes sets once per set beyond the first."""
        return sorted(groups.values(), key=lambda group: group[0].adapters != self._applied)

    def _guarded(self, request: _Request, work: Callable[[], object]) -> None:
        """Run one request's part of a step; if it fails, end that request alone (a 503 unless it is the user's
        error) and forget what its slot's cache holds."""
        try:
            work()
        except Exception as exc:
            if not isinstance(exc, ScalpelError):
                log.exception("a request failed inside the engine loop")
                exc = EngineDown("the engine failed while answering; retry the request", code="engine_error")
            if request.slot is not None:
                llama_cpp.llama_memory_seq_rm(self._memory, request.slot.seq, -1, -1)
                request.slot.tokens, request.slot.exact = [], 0
            self._end(request, exc)

    def _decode_tokens(self, group: list[_Request]) -> None:
        batch = self._batch
        batch.n_tokens = len(group)
        for i, request in enumerate(group):
            assert request.slot is not None and request.next_token is not None
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = request.next_token, len(request.slot.tokens), 1
            batch.seq_id[i][0], batch.logits[i] = request.slot.seq, True
        self._decode()
        for request in group:
            assert request.slot is not None and request.next_token is not None
            request.slot.tokens.append(request.next_token)
            request.next_token = None

    def _prefill(self, request: _Request) -> None:
        self._apply(request.adapters)
        self._prefill_block(request)

    def _prefill_block(self, request: _Request) -> None:
        """Evaluate the next prompt block, [n_done, the next multiple of prompt_block or the prompt's end)."""
        slot, block = request.slot, self.settings.prompt_block
        assert slot is not None
        start = request.n_done
        end = min(len(request.tokens), (start // block + 1) * block)
        self._decode_seq(
            slot.seq, request.tokens[start:end], start, logits="last" if end == len(request.tokens) else "none"
        )
        slot.tokens.extend(request.tokens[start:end])
        if end % block == 0 and slot.exact == start:
            slot.exact = end  # a whole aligned block: later requests may reuse it
        request.n_done = end
        if end == len(request.tokens):
            self._sample(request, end - start - 1)

    def _decode_seq(self, seq: int, tokens: list[int], pos: int, *, logits: str) -> None:
        """Evaluate tokens of one sequence at positions pos.. in one call, with logits for "all", the "last" or
        "none" of them (a prompt block before the last one needs none: the lm_head is a large share of it)."""
        batch = self._batch
        batch.n_tokens = len(tokens)
        last = len(tokens) - 1
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos + i, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits == "all" or (logits == "last" and i == last)
        self._decode()

    def _decode(self) -> None:
        if (status := llama_cpp.llama_decode(self.ctx, self._batch)) != 0:
            raise EngineDown(f"llama.cpp could not evaluate the batch (status {status})", code="decode_failed")

    def _logits(self, index: int) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.tokenizer.n_vocab,))

    def _sample(self, request: _Request, index: int) -> None:
        """Sample the request's next token from output row `index`, release its text, and finish it if done."""
        params = request.params
        logits = self._logits(index).copy() if params.logprobs else None
        token = request.sampler.sample(self.ctx, index)  # also accepts it
        if self.tokenizer.is_eog(token):
            self._finish(request, "stop")
            return
        entry = logprob_entry(token, logits, params.top_logprobs, self.tokenizer.piece) if logits is not None else None
        piece = request.stream.add(token, self.tokenizer.piece(token), entry)
        if request.stream.stopped:
            self._finish(request, "stop")
            return
        if piece is not None:
            self._emit(request, piece)
        if len(request.stream.completion) >= request.max_tokens:
            self._finish(request, "length")
            return
        request.next_token = token

    def _finish(self, request: _Request, reason: str) -> None:
        self._emit(request, request.stream.finish(reason))
        self._end(request)

    def _end(self, request: _Request, error: BaseException | None = None) -> None:
        if request in self._active:
            self._active.remove(request)
        if (slot := request.slot) is not None:
            if any(ref not in self._loaded for ref, _ in slot.adapters):  # unloaded meanwhile: nobody may reuse it
                llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
                slot.adapters, slot.tokens, slot.exact = (), [], 0
            self.slots.release(slot)
            request.slot = None
        if request.sampler is not None:
            request.sampler.free()
            request.sampler = None
        if self._retired:
            self._free_retired()
        if error is not None:
            self._emit(request, error)
        self._emit(request, None)

    @staticmethod
    def _emit(request: _Request, item: Piece | BaseException | None) -> None:
        """Hand an item to the request's reader; a reader that fails (its event loop closed, its pipe broke) only
        loses its own request."""
        try:
            request.emit(item)
        except Exception:
            log.warning("a request's reader failed; it is cancelled", exc_info=True)
            request.gone.set()

    # --- shutting down --------------------------------------------------------------------------
    def close(self) -> None:
        self.queue.close()
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self.state = "stopped"

    def _shut_down(self) -> None:
        """On the engine thread: end every request and task, then free llama.cpp's objects."""
        down = ShuttingDown("the server is shutting down", code="shutting_down")
        with self._cond:
            pending = [*self._active, *self._waiting]
            tasks = list(self._tasks)
            self._waiting.clear()
            self._tasks.clear()
        for request in pending:
            self._end(request, down)
        for _, future in tasks:
            future.set_exception(down)
        self._apply_pointers([], [], ())
        for pointer in [*self._loaded.values(), *self._retired.values()]:
            llama_cpp.llama_adapter_lora_free(pointer)
        self._loaded.clear()
        self._retired.clear()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)
