"""One request's answer as it grows token by token: UTF-8 decoded, stop sequences cut, text released once final."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field


@dataclass
class Piece:
    """Newly released completion text, with its tokens' log-probabilities when asked for."""

    text: str
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    completion_ids: list[int] | None = None  # on the last piece: every sampled token (evaluation uses them)


class TextStream:
    """Text that could still turn into a stop sequence is held back; nothing after a stop is ever released."""

    def __init__(self, stops: list[str] | None, n_prompt: int):
        self.stops = stops or []
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.released = "", 0
        self.completion: list[int] = []
        self.pending: list[tuple[int, dict]] = []  # (end offset in text, logprob entry) not yet released
        self.n_prompt = n_prompt
        self.stopped = False  # a stop sequence was found: the answer is complete

    def add(self, token: int, piece: bytes, logprob: dict | None) -> Piece | None:
        """Take one sampled token; return the text that became final, if any."""
        self.completion.append(token)
        self.text += self.decoder.decode(piece)
        if logprob is not None:
            self.pending.append((len(self.text), logprob))
        start = max(self.released - self.holdback, 0)
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return None
        safe = len(self.text) - self.holdback if self.stops else len(self.text)
        if safe > self.released:
            piece_out = self._release(safe)
            return piece_out
        return None

    def finish(self, reason: str) -> Piece:
        """The last piece: whatever is left, the finish_reason and exact usage."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        last = self._release(len(self.text))
        last.finish_reason = "stop" if self.stopped else reason
        last.completion_ids = list(self.completion)
        n = len(self.completion)
        last.usage = {"prompt_tokens": self.n_prompt, "completion_tokens": n, "total_tokens": self.n_prompt + n}
        return last

    def _release(self, end: int) -> Piece:
        ready = [entry for offset, entry in self.pending if offset <= end]
        del self.pending[: len(ready)]
        piece = Piece(text=self.text[self.released : end], logprobs=ready)
        self.released = end
        return piece
