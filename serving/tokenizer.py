"""The base's vocabulary through llama.cpp's C API: tokens in, text out, the same in the engine and in the front end."""

from __future__ import annotations

import ctypes
import logging

import llama_cpp

from core import chat
from core.errors import ScalpelError
from core.model_store import ModelEntry

_log = logging.getLogger("llama.cpp")
_ERROR = 4  # ggml_log_level: GGML_LOG_LEVEL_ERROR (ggml.h)


@llama_cpp.llama_log_callback
def _forward_errors(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp writes its load, reserve and adapter chatter at every level; only its errors reach our log
    if level == _ERROR:
        _log.error(text.decode("utf-8", errors="replace").rstrip())


def quiet_llama_logs() -> None:
    llama_cpp.llama_log_set(_forward_errors, ctypes.c_void_p(0))


class Tokenizer:
    """Wraps a llama_model's vocabulary; `vocab_only` loads just the vocabulary (the front end's case)."""

    def __init__(self, base: ModelEntry, model: ctypes.c_void_p | None = None):
        quiet_llama_logs()
        self.base = base
        self._owned = model is None
        if model is None:
            params = llama_cpp.llama_model_default_params()
            params.vocab_only = True
            model = llama_cpp.llama_model_load_from_file(str(base.gguf).encode(), params)
            if not model:
                raise ScalpelError(f"llama.cpp could not read the vocabulary of {base.name!r}", code="model_unreadable")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._pieces: dict[int, bytes] = {}

    def _tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        raw = text.encode("utf-8")
        room = len(raw) + 2
        while True:
            out = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), out, room, add_bos, special)
            if n >= 0:
                return list(out[:n])
            room = -n

    def _bos(self, text: str) -> bool:
        return chat.needs_bos(text, add_bos=self.base.add_bos, bos_token=self.base.bos_token)

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
        return self._tokenize(
            text, chat.needs_bos(text, add_bos=self.base.add_bos, bos_token=self.base.bos_token), True
        )

    def text_tokens(self, text: str) -> list[int]:
        """A raw completion prompt: tokenized as is, with the model's BOS rule."""
        return self._tokenize(
            text, chat.needs_bos(text, add_bos=self.base.add_bos, bos_token=self.base.bos_token), True
        )

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama-server's /tokenize: `add_special` adds BOS as the model asks, `parse_special` reads <|tags|>."""
        add_bos = add_special and chat.needs_bos(text, add_bos=self.base.add_bos, bos_token=self.base.bos_token)
        return self._tokenize(text, add_bos, parse_special)

    def piece(self, token: int) -> bytes:
        """One token's bytes as it reads in running text (control tokens read as nothing)."""
        if (cached := self._pieces.get(token)) is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        self._pieces[token] = piece = buf.raw[:n]
        return piece

    def detokenize(self, tokens: list[int]) -> str:
        if bad := [t for t in tokens if not 0 <= t < self.n_vocab]:
            raise ScalpelError(f"token ids outside the vocabulary (0..{self.n_vocab - 1}): {bad[:5]}", param="tokens")
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self._owned and self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None
