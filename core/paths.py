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


MAX_PATH_BYTES = 1024  # a request's path reference; far below PATH_MAX, and each part below NAME_MAX
MAX_PART_BYTES = 255


def check_path_text(ref: str, param: str) -> str:
    """A path a request names: refused with a 400 before the OS sees a NUL byte or an over-long name."""
    if not isinstance(ref, str) or not ref:
        raise ScalpelError(f"{param} must be a non-empty path", param=param)
    if "\x00" in ref:
        raise ScalpelError(f"{param} contains a NUL byte", param=param, code="invalid_path")
    raw = ref.encode("utf-8", errors="surrogatepass")
    if len(raw) > MAX_PATH_BYTES or any(
        len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES for part in ref.split("/")
    ):
        raise ScalpelError(
            f"{param} is too long: at most {MAX_PATH_BYTES} bytes, {MAX_PART_BYTES} per name",
            param=param,
            code="invalid_path",
        )
    return ref


def shown(path: Path | str) -> str:
    """A server path as a message may show it: relative to SCALPEL_HOME, or its file name alone."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(home()))
    except (ValueError, OSError):
        return path.name


def scrub(message: str) -> str:
    """A message without the server's home folder in it: the store-relative path stays."""
    root = str(home())
    return message.replace(root + "/", "").replace(root, "SCALPEL_HOME") if root != "/" else message


def enforce_offline() -> None:
    """Nothing may reach a model hub at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
