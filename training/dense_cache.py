"""A GGUF base unpacked once: its dense weights and its converted tokenizer kept beside its store entry, so that every
training run after the first loads them in about a second instead of converting the GGUF again.

On the default model the conversion is about 14 s (11 s of weights, 3 s of tokenizer), paid by every training run:
a first version, every candidate of an update and every repair. A copy is keyed by the GGUF's fingerprint, the dtype,
this module's CACHE_VERSION and the transformers version that converted it (a new converter makes a new copy). It
is written into a temporary folder and renamed into place, so a killed run leaves no half copy; a copy that fails
to load is removed and made again. Bases whose dense weights would pass SCALPEL_DENSE_CACHE_GB (default 4: a 7B base
in bf16 is 14 GB) are not kept; 0 turns the cache off.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers

from core import paths
from core.model_store import ModelEntry
from training import distributed

LIMIT_ENV = "SCALPEL_DENSE_CACHE_GB"
DEFAULT_LIMIT_GB = 4.0
CACHE_VERSION = 1  # bump when what is kept, or how it is made here, changes
STALE_SECONDS = 3600  # a temporary folder this old was left by a killed run
log = logging.getLogger("scalpel.training")


def folder(entry: ModelEntry, what: str) -> Path:
    """Where the copy of `what` ("tokenizer", "bfloat16", "float32") of this base lives."""
    key = f"{entry.fingerprint[:16]}-v{CACHE_VERSION}-tf{transformers.__version__}-{what}"
    return paths.models_dir() / paths.check_name(entry.name, "model") / "dense" / key


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
    if entry.format != "gguf" or limit_bytes() <= 0:
        return build()
    copy = folder(entry, what)
    if (copy / "done").is_file():
        try:
            return load(copy)
        except Exception as exc:  # a damaged or foreign copy: made again below
            log.warning("the kept copy of %s could not be read (%s); converting the GGUF again", entry.name, exc)
            shutil.rmtree(copy, ignore_errors=True)
    made = build()
    # One writer per machine: under torchrun every rank builds the same model, and only local rank 0 keeps it.
    if distributed.local_rank() == 0 and size(made) <= limit_bytes():
        _save(made, copy)
    return made


def _readable_by_all(folder: Path) -> None:
    """mkdtemp makes a folder only its owner may open; a kept copy is for every user of the store (a service
    and the CLI), as a folder made by mkdir would be, under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def _save(made: Any, copy: Path) -> None:
    """Write `made` (save_pretrained) as `copy`, whole or not at all; a failure costs the cache, never the run."""
    if any(getattr(p, "is_meta", False) for p in getattr(made, "parameters", lambda: [])()):
        return  # weights not loaded on this rank (FSDP's cpu_ram_efficient_loading): nothing to keep
    partial = None
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        for stale in copy.parent.glob(".*.partial-*"):  # left by a run killed while it wrote (not one writing now)
            if time.time() - stale.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{copy.name}.partial-", dir=copy.parent))
        _readable_by_all(partial)
        made.save_pretrained(str(partial))
        (partial / "done").write_text("complete\n", encoding="utf-8")
        for other in copy.parent.glob(f"*-{copy.name.rsplit('-', 1)[1]}"):  # an older GGUF's or converter's copy
            if other != copy:
                shutil.rmtree(other, ignore_errors=True)
        if copy.is_dir() and not (copy / "done").is_file():  # not one of ours (copies arrive whole, by rename)
            shutil.rmtree(copy, ignore_errors=True)
        partial.rename(copy)
        partial = None
    except Exception as exc:  # a full disk, a read-only store, another run's copy already in place...
        log.warning("could not keep a dense copy of the base (%s); the next run converts the GGUF again", exc)
    finally:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
