"""Embeddings from a second llama.cpp context on the base, in embedding mode, with the engine's adapters applied."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import llama_cpp
import numpy as np

from core import adapter_store
from core.errors import ConflictError, ScalpelError
from core.gguf_meta import read_gguf
from serving.engine import AdapterSet, Engine

POOLING_NAMES = {
    llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
    llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
    llama_cpp.LLAMA_POOLING_TYPE_LAST: "last",
}
CHUNK = 512  # tokens per llama_decode when this module averages the token states itself


def declared_pooling(gguf: str) -> int | None:
    """The pooling the GGUF names (`<arch>.pooling_type`) when it is one that gives a vector per input.

    A causal LM's GGUF names none (llama.cpp would then give one vector per token), and a reranker's
    (rank) gives a score: both get mean pooling.
    """
    metadata = read_gguf(Path(gguf), with_tokens=False).metadata
    found = metadata.get(f"{metadata.get('general.architecture')}.pooling_type")
    return int(found) if found is not None and int(found) in POOLING_NAMES else None


class Embedder:
    """One llama.cpp context with embeddings on, for the engine's base: inputs one at a time, under its own lock.

    The context holds `n_ctx` tokens (the engine's by default). Vectors come back L2-normalised, as OpenAI's
    embeddings are. A GGUF that names its pooling gets llama.cpp's, over the whole input in one batch (pooling
    is computed per micro-batch). Otherwise the mean of the last hidden states is taken here, in chunks of
    CHUNK tokens that extend the cache: llama.cpp's own mean pooling needs the whole input in one micro-batch,
    and in embedding mode it computes every token's logits too, which for a 4096-token input and SmolLM2's
    vocabulary is 800 MB of floats held until the context is freed. Causal attention makes the chunked mean
    equal to the one-batch mean.
    """

    def __init__(self, engine: Engine, n_ctx: int | None = None):
        self.engine = engine
        n_ctx = n_ctx or engine.settings.n_ctx
        declared = declared_pooling(engine.base.gguf)
        self.pooling = declared if declared is not None else llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self._chunked = declared is None
        self._step = min(CHUNK, n_ctx) if self._chunked else n_ctx
        self.llm = llama_cpp.Llama(
            model_path=engine.base.gguf,
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE if self._chunked else self.pooling,
            n_ctx=n_ctx,
            n_batch=self._step,
            n_ubatch=self._step,
            n_threads=engine.threads,
            n_threads_batch=engine.threads,
            n_gpu_layers=engine.settings.n_gpu_layers,
            use_mmap=engine.settings.use_mmap,
            verbose=False,
        )
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self.dimensions = self.llm.n_embd()
        self._lock = threading.Lock()  # the embedding context: one input at a time
        self._adapters: dict[str, ctypes.c_void_p] = {}  # adapter ref -> this model's llama_adapter_lora
        self._applied: AdapterSet = ()

    @property
    def pooling_name(self) -> str:
        return POOLING_NAMES.get(self.pooling, str(self.pooling))

    def check_tokens(self, tokens: list[int], index: int) -> None:
        """Refuse (400, `input`) an input the context cannot embed: empty, too long, or with unknown ids."""
        if not tokens:
            raise ScalpelError(f"input[{index}] is empty", param="input", code="invalid_value")
        if len(tokens) > self.n_ctx:
            raise ScalpelError(
                f"input[{index}] has {len(tokens)} tokens but the embedding context holds {self.n_ctx}",
                param="input",
                code="context_length_exceeded",
            )
        if bad := [t for t in tokens if not 0 <= t < self.n_vocab]:
            raise ScalpelError(
                f"input[{index}] has token ids outside the vocabulary (0..{self.n_vocab - 1}): {bad[:5]}",
                param="input",
                code="invalid_value",
            )

    def embed(self, inputs: list[list[int]], adapters: AdapterSet) -> list[np.ndarray]:
        """One unit vector (float32) per input, under `adapters` (refs the engine has loaded, with scales)."""
        for i, tokens in enumerate(inputs):
            self.check_tokens(tokens, i)
        with self._lock:
            self._apply(adapters)
            return [self._embed_one(tokens) for tokens in inputs]

    def _apply(self, adapters: AdapterSet) -> None:
        """Set this context's adapters. Lock held.

        Only refs the engine accepted reach here (it verified each file and its base when it loaded them);
        this model gets its own pointer from the same adapter.gguf, kept until the engine unloads the ref.
        """
        wanted = {ref for ref, _ in adapters}
        for ref in [r for r in self._adapters if r not in wanted and r not in self.engine.loaded()]:
            if any(r == ref for r, _ in self._applied):
                self._set(())
            llama_cpp.llama_adapter_lora_free(self._adapters.pop(ref))
        for ref in wanted - set(self._adapters):
            version = adapter_store.resolve(ref)
            pointer = llama_cpp.llama_adapter_lora_init(self.llm.model, str(version.gguf).encode())
            if not pointer:
                raise ScalpelError(f"llama.cpp could not load {ref}", param="model", code="invalid_adapter")
            self._adapters[ref] = pointer
        self._set(adapters)

    def _set(self, adapters: AdapterSet) -> None:
        if adapters == self._applied:
            return
        n = len(adapters)
        pointers = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[self._adapters[r] for r, _ in adapters])  # type: ignore[misc]  # c_void_p handles, as llama.cpp gave them
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in adapters])
        if llama_cpp.llama_set_adapters_lora(self.llm.ctx, pointers, n, scales):
            raise ScalpelError("llama.cpp refused the adapter set", code="adapter_apply_failed", status=500)
        self._applied = adapters

    def _embed_one(self, tokens: list[int]) -> np.ndarray:
        """Evaluate one input from an empty cache and pool its states. Lock held.

        The low-level batch API, because llama-cpp-python's Llama.embed takes only text (no token ids),
        tokenizes it its own way rather than with the base's BOS rule, and evaluates an input in one batch.
        """
        ctx = self.llm.ctx
        memory = llama_cpp.llama_get_memory(ctx)
        llama_cpp.llama_memory_clear(memory, True)
        batch = llama_cpp.llama_batch_init(self._step, 0, 1)
        total = np.zeros(self.dimensions, np.float64)
        try:
            for start in range(0, len(tokens), self._step):
                chunk = tokens[start : start + self._step]
                batch.n_tokens = len(chunk)
                for i, token in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                    batch.seq_id[i][0], batch.logits[i] = 0, True  # embedding mode: every token is an output
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise ScalpelError("llama.cpp could not evaluate the input", code="decode_failed", status=500)
                if self._chunked:
                    states = llama_cpp.llama_get_embeddings(ctx)
                    total += np.ctypeslib.as_array(states, shape=(len(chunk), self.dimensions)).sum(axis=0)
            if self._chunked:
                vector = (total / len(tokens)).astype(np.float32)
            else:
                pooled = llama_cpp.llama_get_embeddings_seq(ctx, 0)
                if not pooled:
                    raise ScalpelError("llama.cpp gave no pooled embedding", code="decode_failed", status=500)
                vector = np.ctypeslib.as_array(pooled, shape=(self.dimensions,)).astype(np.float32)
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_memory_clear(memory, True)
        if not np.isfinite(vector).all():
            raise ConflictError(
                "the embedding is not finite (NaN or infinity): the adapter's weights are damaged",
                param="model",
                code="adapter_not_finite",
            )
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector

    def close(self) -> None:
        with self._lock:
            self._set(())
            for pointer in self._adapters.values():
                llama_cpp.llama_adapter_lora_free(pointer)
            self._adapters.clear()
            self.llm.close()
