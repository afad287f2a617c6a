"""A request's llama.cpp sampler chain, built from its parameters, and the log-probabilities OpenAI reports."""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF

from core.errors import ScalpelError

PENALTY_LAST_N = 64  # how many recent tokens the presence/frequency penalties look at


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


class Sampler:
    """One request's sampling: a llama.cpp chain (logit bias -> penalties -> greedy at temperature 0, else
    top-p -> temperature -> seeded draw), and the grammar apart from it.

    With a grammar, a token is first drawn without it and only checked against it; the grammar runs over the
    whole vocabulary only when that token is refused. This is llama.cpp's own common sampler's order (its
    `grammar_first = false`): a grammar over a 50,000-token vocabulary costs far more than one decode step.
    """

    def __init__(self, params: GenerationParams, vocab, n_vocab: int):
        self.n_vocab = n_vocab
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self.grammar = None
        add = llama_cpp.llama_sampler_chain_add
        if params.logit_bias:
            if bad := [t for t, _ in params.logit_bias if not 0 <= t < n_vocab]:
                self.free()
                raise ScalpelError(f"logit_bias names tokens outside the vocabulary: {bad[:5]}", param="logit_bias")
            entries = [llama_cpp.llama_logit_bias(token, bias) for token, bias in params.logit_bias]
            biases = (llama_cpp.llama_logit_bias * len(entries))(*entries)
            add(self.chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(entries), biases))
        if params.presence_penalty or params.frequency_penalty:
            penalties = llama_cpp.llama_sampler_init_penalties(
                PENALTY_LAST_N, 1.0, params.frequency_penalty, params.presence_penalty
            )
            add(self.chain, penalties)
        if params.temperature == 0:
            add(self.chain, llama_cpp.llama_sampler_init_greedy())
        else:
            add(self.chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(self.chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else random.randrange(2**31)
            # 2**32 - 1 is LLAMA_DEFAULT_SEED, which llama.cpp reads as "draw a random seed": never pass it
            add(self.chain, llama_cpp.llama_sampler_init_dist(seed % 0xFFFFFFFF))
        gbnf = params.grammar or (JSON_GBNF if params.json_object else None)
        if gbnf:
            self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
            if not self.grammar:
                self.free()
                raise ScalpelError("llama.cpp could not parse the grammar", param="grammar", code="invalid_grammar")
            self._candidates = np.zeros(n_vocab, dtype=_TOKEN_DATA)
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._one = np.zeros(1, dtype=_TOKEN_DATA)

    def sample(self, ctx, index: int) -> int:
        """Draw (and accept) the next token from output row `index` of the last decode."""
        if self.grammar is None:
            return llama_cpp.llama_sampler_sample(self.chain, ctx, index)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
        token = self._draw(logits, with_grammar=False)
        one = self._one
        one["id"], one["logit"], one["p"] = token, 0.0, 0.0
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(_view(one)))
        if not np.isfinite(one["logit"][0]):  # the grammar refuses it: draw again, over what it allows
            token = self._draw(logits, with_grammar=True)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def _draw(self, logits: np.ndarray, *, with_grammar: bool) -> int:
        candidates = self._candidates
        candidates["id"] = self._ids  # the chain sorts the array in place: every draw starts from vocabulary order
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = _view(candidates)
        if with_grammar:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(array))
        chosen = array.data[array.selected]
        if with_grammar and not np.isfinite(chosen.logit):  # accepting it would abort inside llama.cpp
            raise ScalpelError("the grammar allows no token here", param="grammar", code="grammar_dead_end")
        return int(chosen.id)

    def free(self) -> None:
        for sampler in (self.chain, self.grammar):
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
        self.chain = self.grammar = None


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


def _view(candidates: np.ndarray) -> llama_cpp.llama_token_data_array:
    """A llama_token_data_array over a numpy array of _TOKEN_DATA (no copy)."""
    return llama_cpp.llama_token_data_array(
        data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
        size=len(candidates),
        selected=-1,
        sorted=False,
    )


def logprob_entry(token: int, logits: np.ndarray, top: int, piece) -> dict:
    """OpenAI's logprobs entry for one sampled token, from the raw logits of its step."""
    shifted = logits.astype(np.float64) - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best = [int(t) for t in np.argpartition(-logprobs, top)[:top]] if top else []
    best.sort(key=lambda t: -logprobs[t])
    raw = piece(token)
    return {
        "token": raw.decode("utf-8", errors="replace"),
        "logprob": float(logprobs[token]),
        "bytes": list(raw),
        "top_logprobs": [
            {
                "token": piece(t).decode("utf-8", errors="replace"),
                "logprob": float(logprobs[t]),
                "bytes": list(piece(t)),
            }
            for t in best
        ],
    }
