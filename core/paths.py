"""Where scalpel keeps its stores and state: all below one home folder (SCALPEL_HOME, default: the cwd)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from core.errors import ScalpelError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def home() -> Path:
    return Path(os.environ.get("SCALPEL_HOME", ".")).expanduser().resolve()


def models_dir() -> Path:
    return home() / "models"


def adapters_dir() -> Path:
    return home() / "adapters"


def state_dir() -> Path:
    """Private working state: job folders, checkpoints, the SQLite database."""
    return home() / ".scalpel"


def check_name(name: str, what: str) -> str:
    """Names select entries in a store; they are never paths (no '/', no '..')."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise ScalpelError(
            f"invalid {what} name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            param=what,
        )
    return name


def enforce_offline() -> None:
    """Nothing may reach a model hub at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
