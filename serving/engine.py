"""The llama.cpp engine: one quantized base, adapters kept loaded beside it and switched per request, never merged."""

from __future__ import annotations

import codecs
import ctypes
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from core import adapter_store, chat, threads
from core.errors import ConflictError, ScalpelError
from core.gguf_meta import BASE_FINGERPRINT_KEY, read_gguf
from core.model_store import ModelEntry
from serving.queue import Cancelled, FairQueue, Ticket
from serving.settings import EngineSettings


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    json_object: bool = False  # constrain the answer to JSON (llama.cpp's JSON grammar)
    grammar: str | None = None  # or to this GBNF grammar (root rule `root`); wins over json_object
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)


@dataclass
class Piece:
    """Newly released completion text, with its tokens' log-probabilities when asked for."""

    text: str
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    completion_ids: list[int] | None = None  # on the last piece: every sampled token (evaluation uses them)


@dataclass
class Scores:
    """Engine.score's answer, one value per position after the first token."""

    logprobs: np.ndarray  # log-probability of the next token given the ones before it
    choices: np.ndarray  # the token the model would have chosen there (greedy)
    margins: np.ndarray  # top-1 minus top-2 logit: how decided that choice was


AdapterSet = tuple[tuple[str, float], ...]  # ((adapter ref "name@vN", scale), ...)
PROBE_PROMPT = "Hello, world."  # evaluated with every adapter as it loads: its logits must be finite


class Engine:
    """Holds the base model; every generation runs under one lock with exactly its own adapter set."""

    def __init__(self, base: ModelEntry, settings: EngineSettings = EngineSettings()):
        self.base = base
        self.settings = settings
        # The same count for decoding and for prompt evaluation (llama-cpp-python's defaults are
        # cpu_count // 2 and cpu_count, which starve or oversubscribe a small VM).
        self.threads = threads.resolve(settings.threads)
        self.llm = llama_cpp.Llama(
            model_path=base.gguf,
            n_ctx=settings.n_ctx,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            n_gpu_layers=settings.n_gpu_layers,
            use_mmap=settings.use_mmap,
            verbose=False,
        )
        self._lock = threading.Lock()  # the llama.cpp model and context: one user at a time
        self.queue = FairQueue(settings.max_waiting)
        self._loaded: dict[str, ctypes.c_void_p] = {}  # adapter ref -> llama_adapter_lora pointer
        self._versions: dict[str, adapter_store.AdapterVersion] = {}  # every ref ever loaded, to reload
        self._applied: AdapterSet = ()
        self.adapter_switches = 0
        self.cancelled_generations = 0  # stopped early because the client went away
        self._switch_listeners: list[Callable[[float], None]] = []  # told each switch's seconds (metrics)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def add_switch_listener(self, listener: Callable[[float], None]) -> None:
        """Call `listener` with the seconds every later adapter-set change takes."""
        self._switch_listeners.append(listener)

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
        with self._lock:
            self._init_adapter(version)
        return version.ref

    def _init_adapter(self, version: adapter_store.AdapterVersion) -> None:
        """Called with the lock held."""
        if version.ref in self._loaded:
            return
        pointer = llama_cpp.llama_adapter_lora_init(self.llm.model, str(version.gguf).encode())
        if not pointer:
            raise ScalpelError(f"llama.cpp could not load {version.ref}", param="model", code="invalid_adapter")
        self._loaded[version.ref] = pointer
        self._versions[version.ref] = version
        if not self._probe_finite(version.ref):
            del self._loaded[version.ref], self._versions[version.ref]
            llama_cpp.llama_adapter_lora_free(pointer)
            raise ConflictError(
                f"{version.ref} gives non-finite logits (NaN or infinity) on a probe prompt: its weights are damaged",
                param="model",
                code="adapter_not_finite",
            )

    def _probe_finite(self, ref: str) -> bool:
        """Evaluate a short prompt with the adapter alone and check every logit is finite. Lock held."""
        self._set_adapters(((ref, 1.0),))
        try:
            self.llm.eval(self.text_tokens(PROBE_PROMPT))
            n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(n_vocab,))
            return bool(np.isfinite(logits).all())
        finally:
            self.llm.reset()
            self._set_adapters(())  # the next request applies its own set

    def unload(self, ref: str) -> None:
        with self._lock:
            pointer = self._loaded.pop(ref, None)
            if pointer is None:
                return
            if any(r == ref for r, _ in self._applied):
                self._set_adapters(())
            llama_cpp.llama_adapter_lora_free(pointer)

    def _set_adapters(self, adapters: AdapterSet) -> None:
        """Apply an adapter set to the context. Called with the lock held."""
        if adapters == self._applied:
            return
        for ref, _ in adapters:  # unloaded after this request chose it: the request still gets it
            self._init_adapter(self._versions[ref])
        begun = time.perf_counter()
        n = len(adapters)
        pointers = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[self._loaded[r] for r, _ in adapters])  # type: ignore[misc]  # c_void_p handles, as llama.cpp gave them
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in adapters])
        if llama_cpp.llama_set_adapters_lora(self.llm.ctx, pointers, n, scales):
            raise ScalpelError("llama.cpp refused the adapter set", code="adapter_apply_failed", status=500)
        # The KV cache was computed with other weights: never let a prefix match reuse it.
        self.llm.reset()
        self._applied = adapters
        self.adapter_switches += 1
        for listener in self._switch_listeners:
            listener(time.perf_counter() - begun)

    # --- generation -----------------------------------------------------------------------------
    def chat_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt exactly as training rendered it: the base's template, then its BOS rule."""
        text = chat.render(
            self.base.chat_template,
            messages,
            add_generation_prompt=True,
            bos_token=self.base.bos_token,
            eos_token=self.base.eos_token,
            tools=tools,
        )
        add_bos = chat.needs_bos(text, add_bos=self.base.add_bos, bos_token=self.base.bos_token)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def check_fits(self, n_prompt: int, max_tokens: int | None) -> int:
        n_ctx = self.llm.n_ctx()
        if n_prompt >= n_ctx:
            raise ScalpelError(
                f"the prompt has {n_prompt} tokens but the context holds {n_ctx}",
                param="messages",
                code="context_length_exceeded",
            )
        room = n_ctx - n_prompt
        return room if max_tokens is None else min(max_tokens, room)

    def text_tokens(self, text: str) -> list[int]:
        """A raw completion prompt: tokenized as is, with the model's BOS rule."""
        add_bos = chat.needs_bos(text, add_bos=self.base.add_bos, bos_token=self.base.bos_token)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama-server's /tokenize: `add_special` adds BOS as the model asks, `parse_special` reads <|tags|>."""
        add_bos = add_special and chat.needs_bos(text, add_bos=self.base.add_bos, bos_token=self.base.bos_token)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        if bad := [t for t in tokens if not 0 <= t < n_vocab]:
            raise ScalpelError(f"token ids outside the vocabulary (0..{n_vocab - 1}): {bad[:5]}", param="tokens")
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def generate(
        self,
        tokens: list[int],
        adapters: AdapterSet,
        params: GenerationParams,
        *,
        ticket: Ticket | None = None,
        cancelled: threading.Event | None = None,
    ) -> Iterator[Piece]:
        """Decode token by token with llama.cpp's sampler, releasing text as it becomes final.

        Text that could still turn into a stop sequence is held back; the last Piece carries the
        finish_reason and exact usage (every sampled token but an end-of-generation one).
        """
        max_tokens = self.check_fits(len(tokens), params.max_tokens)
        ticket = ticket or self.queue.reserve()
        try:
            with self.queue.turn(ticket, cancelled), self._lock:
                self._set_adapters(adapters)
                yield from self._decode(tokens, params, max_tokens, cancelled)
        except Cancelled:
            return

    def _decode(
        self, prompt: list[int], params: GenerationParams, max_tokens: int, cancelled: threading.Event | None
    ) -> Iterator[Piece]:
        llm = self.llm
        llm.set_seed(params.seed if params.seed is not None else random.randrange(2**31))
        step_logits: list[np.ndarray] = []  # the logits of the step just sampled, nothing older

        def keep_logits(_input_ids, logits):
            step_logits[:] = [np.array(logits, dtype=np.float32)]
            return logits

        stops = params.stop or []
        holdback = max((len(s) for s in stops), default=1) - 1
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, released = "", 0
        completion: list[int] = []
        pending: list[tuple[int, dict]] = []  # (end offset in text, logprob entry) not yet released
        finish, cut_at_stop = "length", False
        gbnf = params.grammar or (JSON_GBNF if params.json_object else None)
        grammar = LlamaGrammar.from_string(gbnf, verbose=False) if gbnf else None
        biases = np.zeros(0)
        if params.logit_bias:
            ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
            biases = np.array([b for _, b in params.logit_bias], dtype=np.float32)

        def bias(_input_ids, logits):
            logits[ids] += biases
            return logits

        processors = ([bias] if params.logit_bias else []) + ([keep_logits] if params.logprobs else [])
        generator = llm.generate(
            prompt,
            top_k=0,
            top_p=params.top_p,
            min_p=0.0,
            temp=params.temperature,
            repeat_penalty=1.0,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            grammar=grammar,
            logits_processor=llama_cpp.LogitsProcessorList(processors) if processors else None,
        )
        try:
            for token in generator:
                if llama_cpp.llama_token_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                piece = llm.detokenize([token], prev_tokens=prompt + completion)
                completion.append(token)
                text += decoder.decode(piece)
                if params.logprobs:
                    pending.append((len(text), self._logprob_entry(token, piece, step_logits[-1], params.top_logprobs)))
                cut = min((i for i in (text.find(s, max(released - holdback, 0)) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish, cut_at_stop = text[:cut], "stop", True
                    break
                if len(completion) >= max_tokens:
                    break
                safe = len(text) - holdback if stops else len(text)
                if safe > released:
                    yield self._release(text, released, safe, pending)
                    released = safe
                if cancelled is not None and cancelled.is_set():
                    self.cancelled_generations += 1
                    return
        finally:
            generator.close()
        if not cut_at_stop:
            text += decoder.decode(b"", final=True)
        last = self._release(text, released, len(text), pending)
        last.finish_reason = finish
        last.completion_ids = completion
        last.usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(completion),
            "total_tokens": len(prompt) + len(completion),
        }
        yield last

    def score(self, tokens: list[int], adapters: AdapterSet) -> Scores:
        """Teacher-forced scoring under an adapter set: for every token after the first, its log-probability
        given the tokens before it, the token the model would have chosen there (greedy), and by how much
        (top-1 minus top-2 logit).

        Used for perplexity and for agreement with reference answers; it runs in the same queue, under the
        same lock and with the same adapter switching as generation, so it measures what is served.
        """
        self.check_fits(len(tokens), 0)
        n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        logprobs, choices = np.zeros(len(tokens) - 1, np.float64), np.zeros(len(tokens) - 1, np.int64)
        margins = np.zeros(len(tokens) - 1, np.float64)
        ticket = self.queue.reserve()
        with self.queue.turn(ticket, None), self._lock:
            self._set_adapters(adapters)
            ctx, step = self.llm.ctx, self.llm.n_batch
            self.llm.reset()  # the next generation re-evaluates its prompt from position 0
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            try:
                for start in range(0, len(tokens), step):
                    chunk = tokens[start : start + step]
                    batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
                    try:
                        batch.n_tokens = len(chunk)
                        for i, token in enumerate(chunk):
                            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                            batch.seq_id[i][0], batch.logits[i] = 0, True
                        if llama_cpp.llama_decode(ctx, batch) != 0:
                            raise ScalpelError(
                                "llama.cpp could not evaluate the text", code="decode_failed", status=500
                            )
                        for i in range(len(chunk)):
                            position = start + i
                            if position + 1 >= len(tokens):
                                break
                            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                            shifted = logits.astype(np.float64) - logits.max()
                            logprobs[position] = shifted[tokens[position + 1]] - np.log(np.exp(shifted).sum())
                            top2 = np.partition(logits, -2)[-2:]
                            choices[position], margins[position] = int(logits.argmax()), float(top2[1] - top2[0])
                    finally:
                        llama_cpp.llama_batch_free(batch)
            finally:
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        return Scores(logprobs, choices, margins)

    @staticmethod
    def _release(text: str, start: int, end: int, pending: list[tuple[int, dict]]) -> Piece:
        ready = [entry for offset, entry in pending if offset <= end]
        del pending[: len(ready)]
        return Piece(text=text[start:end], logprobs=ready)

    def _logprob_entry(self, token: int, piece: bytes, logits: np.ndarray, top: int) -> dict:
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        best: list[int] = [int(t) for t in np.argsort(-logprobs)[:top]] if top else []
        top_pieces = [(int(t), self.llm.detokenize([int(t)])) for t in best]
        return {
            "token": piece.decode("utf-8", errors="replace"),
            "logprob": float(logprobs[token]),
            "bytes": list(piece),
            "top_logprobs": [
                {"token": raw.decode("utf-8", errors="replace"), "logprob": float(logprobs[t]), "bytes": list(raw)}
                for t, raw in top_pieces
            ],
        }

    def close(self) -> None:
        self.queue.close()
        with self._lock:
            self._set_adapters(())
            for pointer in self._loaded.values():
                llama_cpp.llama_adapter_lora_free(pointer)
            self._loaded.clear()
        self.llm.close()
