"""The llama.cpp engine: one quantized base, adapters kept loaded beside it and switched per request, never merged."""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Iterator

import llama_cpp

from conversion.lora_to_gguf import BASE_FINGERPRINT_KEY
from scalpel import adapter_store, chat
from scalpel.errors import ConflictError, ScalpelError
from scalpel.gguf_meta import read_gguf
from scalpel.model_store import ModelEntry



@dataclass(frozen=True)
class EngineSettings:
    n_ctx: int = 4096
    n_threads: int | None = None
    n_gpu_layers: int = -1  # all layers on Metal/CUDA builds; ignored by a CPU build
    use_mmap: bool = True


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


AdapterSet = tuple[tuple[str, float], ...]  # ((adapter ref "name@vN", scale), ...)


class Engine:
    """Holds the base model; every generation runs under one lock with exactly its own adapter set."""

    def __init__(self, base: ModelEntry, settings: EngineSettings = EngineSettings()):
        self.base = base
        self.settings = settings
        self.llm = llama_cpp.Llama(model_path=base.gguf, n_ctx=settings.n_ctx, n_threads=settings.n_threads,
                                   n_gpu_layers=settings.n_gpu_layers, use_mmap=settings.use_mmap,
                                   verbose=False)
        self._lock = threading.Lock()
        self._loaded: dict[str, ctypes.c_void_p] = {}  # adapter ref -> llama_adapter_lora pointer
        self._applied: AdapterSet = ()

    # --- adapters -------------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    def load(self, version: adapter_store.AdapterVersion) -> str:
        """Load one stored adapter version (idempotent); refuse a corrupt file or another base's adapter."""
        if version.ref in self._loaded:
            return version.ref
        info = read_gguf(version.gguf, with_tokens=False)
        if info.file_type != "adapter" or info.metadata.get("adapter.type") != "lora":
            raise ScalpelError(f"{version.ref}: adapter.gguf is not a LoRA adapter", param="model",
                               code="invalid_adapter")
        trained_on = info.metadata.get(BASE_FINGERPRINT_KEY)
        if info.architecture != self.base.architecture or (trained_on and trained_on != self.base.fingerprint):
            raise ConflictError(f"{version.ref} was converted for another base model than {self.base.name!r}",
                                param="model", code="base_mismatch")
        with self._lock:
            pointer = llama_cpp.llama_adapter_lora_init(self.llm.model, str(version.gguf).encode())
            if not pointer:
                raise ScalpelError(f"llama.cpp could not load {version.ref}", param="model",
                                   code="invalid_adapter")
            self._loaded[version.ref] = pointer
        return version.ref

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
        n = len(adapters)
        pointers = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[self._loaded[r] for r, _ in adapters])
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in adapters])
        if llama_cpp.llama_set_adapters_lora(self.llm.ctx, pointers, n, scales):
            raise ScalpelError("llama.cpp refused the adapter set", code="adapter_apply_failed", status=500)
        # The KV cache was computed with other weights: never let a prefix match reuse it.
        self.llm.reset()
        self._applied = adapters

    # --- generation -----------------------------------------------------------------------------
    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The prompt exactly as training rendered it: the base's template, then its BOS rule."""
        text = chat.render(self.base.chat_template, messages, add_generation_prompt=True,
                           bos_token=self.base.bos_token, eos_token=self.base.eos_token)
        add_bos = chat.needs_bos(text, add_bos=self.base.add_bos, bos_token=self.base.bos_token)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def check_fits(self, n_prompt: int, max_tokens: int | None) -> int:
        n_ctx = self.llm.n_ctx()
        if n_prompt >= n_ctx:
            raise ScalpelError(f"the prompt has {n_prompt} tokens but the context holds {n_ctx}",
                               param="messages", code="context_length_exceeded")
        room = n_ctx - n_prompt
        return room if max_tokens is None else min(max_tokens, room)

    def generate(self, tokens: list[int], adapters: AdapterSet, params: GenerationParams,
                 cancelled: threading.Event | None = None) -> Iterator[dict]:
        """Stream llama-cpp-python completion chunks; the lock is held until the generator finishes.

        The last chunk gets a "usage" entry: llama.cpp samples once per completion token, plus
        once for the end-of-generation token that a "stop" finish does not count.
        """
        max_tokens = self.check_fits(len(tokens), params.max_tokens)
        sampled = 0

        def count_steps(_input_ids, logits):
            nonlocal sampled
            sampled += 1
            return logits

        with self._lock:
            self._set_adapters(adapters)
            stream = self.llm.create_completion(
                prompt=tokens, max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                min_p=0.0, top_k=0, repeat_penalty=1.0, stop=params.stop or [], seed=params.seed,
                presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                logits_processor=llama_cpp.LogitsProcessorList([count_steps]), stream=True)
            try:
                for chunk in stream:
                    finish = chunk["choices"][0].get("finish_reason")
                    if finish is not None:
                        completion = sampled if finish == "length" else max(sampled - 1, 0)
                        chunk["usage"] = {"prompt_tokens": len(tokens), "completion_tokens": completion,
                                          "total_tokens": len(tokens) + completion}
                    yield chunk
                    if cancelled is not None and cancelled.is_set():
                        break
            finally:
                stream.close()

    def close(self) -> None:
        with self._lock:
            self._set_adapters(())
            for pointer in self._loaded.values():
                llama_cpp.llama_adapter_lora_free(pointer)
            self._loaded.clear()
        self.llm.close()
