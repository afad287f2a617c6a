"""Read a GGUF file's metadata with the gguf package, turning a corrupt or truncated file into a clear error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from core.errors import ScalpelError

# Written into every adapter we convert, so a server can refuse an adapter made for another base.
BASE_FINGERPRINT_KEY = "scalpel.base.fingerprint"

_SKIP_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores"}


@dataclass(frozen=True)
class TensorInfo:
    ne: tuple[int, ...]  # dimensions as GGUF lists them: ne[0] is the row length
    type: str  # GGML type name: F32, F16, Q8_0, Q4_K...
    n_bytes: int


@dataclass
class GGUFInfo:
    path: Path
    metadata: dict
    tensors: dict[str, TensorInfo]
    tokens: list[str]

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    @property
    def file_type(self) -> str:
        return self.metadata.get("general.type", "model")

    def arch_value(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def token_text(self, key: str) -> str | None:
        token_id = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]


def read_gguf(path: Path, *, with_tokens: bool = True) -> GGUFInfo:
    path = Path(path)
    if not path.is_file():
        raise ScalpelError(f"GGUF file not found: {path}", param=str(path), code="file_not_found")
    try:
        reader = gguf.GGUFReader(path, "r")
        metadata = {}
        tokens: list[str] = []
        for key, field in reader.fields.items():
            if key == "tokenizer.ggml.tokens":
                if with_tokens:
                    tokens = list(field.contents())
                continue
            if key in _SKIP_ARRAYS or key.startswith("GGUF."):
                continue
            metadata[key] = field.contents()
        tensors = {
            t.name: TensorInfo(tuple(int(x) for x in t.shape), t.tensor_type.name, int(t.n_bytes))
            for t in reader.tensors
        }
    except ScalpelError:
        raise
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        raise ScalpelError(
            f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc})", param=str(path), code="invalid_gguf"
        ) from exc
    # A truncated file can still parse its header: the data section must fit in the file.
    if reader.tensors:
        last = max(reader.tensors, key=lambda t: t.data_offset + t.n_bytes)
        if last.data_offset + last.n_bytes > path.stat().st_size:
            raise ScalpelError(
                f"{path} is truncated: tensor {last.name} ends past the end of the file",
                param=str(path),
                code="invalid_gguf",
            )
    return GGUFInfo(path=path, metadata=metadata, tensors=tensors, tokens=tokens)
