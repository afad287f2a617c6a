"""A GGUF base unpacked once: its dense weights and its converted tokenizer kept beside its store entry, so that every
training run after the first loads them in about a second instead of converting the GGUF again.

On the default model the conversion is about 14 s (11 s of weights, 3 s of tokenizer), paid by every training run:
a first version, every candidate of an update and every repair. The copy is keyed by the GGUF's fingerprint and
the dtype, written under a temporary name and renamed into place (a killed run leaves no half copy), and skipped
for bases whose dense weights would pass SCALPEL_DENSE_CACHE_GB (default 4: a 7B base in bf16 is 14 GB).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import paths
from core.model_store import ModelEntry

LIMIT_ENV = "SCALPEL_DENSE_CACHE_GB"
DEFAULT_LIMIT_GB = 4.0


def folder(entry: ModelEntry, what: str) -> Path:
    """Where the copy of `what` ("tokenizer", "bfloat16", "float32") of this base lives."""
    return paths.models_dir() / paths.check_name(entry.name, "model") / "dense" / f"{entry.fingerprint[:16]}-{what}"


def limit_bytes() -> float:
    """The largest dense copy kept, in bytes (SCALPEL_DENSE_CACHE_GB; 0 turns the cache off)."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    try:
        return float(raw) * 2**30 if raw else DEFAULT_LIMIT_GB * 2**30
    except ValueError:
        return DEFAULT_LIMIT_GB * 2**30


def cached(entry: ModelEntry, what: str, load: Callable[[Path], Any], build: Callable[[], Any], size: Callable) -> Any:
    """`load(copy)` when this base's copy of `what` exists; else `build()`, saved for the next run when `size(it)`
    (bytes) is within the limit. Only GGUF bases are converted, so only they are cached."""
    if entry.format != "gguf":
        return build()
    copy = folder(entry, what)
    if (copy / "done").is_file():
        return load(copy)
    made = build()
    if size(made) <= limit_bytes():
        with contextlib.suppress(OSError):  # a read-only store trains without the cache
            _save(made, copy)
    return made


def _save(made: Any, copy: Path) -> None:
    partial = copy.with_name(f".{copy.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    made.save_pretrained(str(partial))
    (partial / "done").write_text("complete\n", encoding="utf-8")
    for stale in copy.parent.glob(f"*-{copy.name.split('-', 1)[1]}"):  # another GGUF's copy under this name
        if stale != copy:
            shutil.rmtree(stale, ignore_errors=True)
    if copy.is_dir() and not (copy / "done").is_file():  # not one of ours (copies arrive whole, by rename)
        shutil.rmtree(copy, ignore_errors=True)
    try:
        partial.rename(copy)
    except OSError:  # another run put its copy there first: theirs is as good
        shutil.rmtree(partial, ignore_errors=True)
