"""The adapter store: adapters/<name>/v<N>/ holds immutable versions, and active.json points at the live one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from core import paths
from core.atomic import sha256_file, write_json
from core.errors import ConflictError, NotFoundError, ScalpelError
from core.manifest import MANIFEST_NAME, Manifest, read_manifest

log = logging.getLogger("scalpel.store")
VERSION_PATTERN = re.compile(r"^v([1-9][0-9]*)$")
GGUF_NAME = "adapter.gguf"
ACTIVE_NAME = "active.json"
ACTIVATIONS_NAME = "activations.jsonl"  # every switch of the pointer, one JSON line each, never rewritten


class StoreDamage(ConflictError):
    """A store entry that cannot be used as it is on disk (empty or invalid file, missing file, wrong hash).

    Only that adapter is unavailable; `scalpel adapters check` reports it and repairs what it can."""

    def __init__(self, message: str, *, param: str | None = "model", code: str | None = "adapter_damaged"):
        super().__init__(message, param=param, code=code)


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: str
    path: Path

    @property
    def gguf(self) -> Path:
        return self.path / GGUF_NAME

    @property
    def manifest(self) -> Manifest:
        """Read from disk on every access (a version's manifest never changes once published): keep the result.
        A damaged manifest is the store's fault, not the request's: StoreDamage (409)."""
        try:
            return read_manifest(self.path / MANIFEST_NAME)
        except ScalpelError as exc:
            raise StoreDamage(exc.message, param=exc.param, code=exc.code) from exc

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def root_for_output_dir(output_dir: str) -> Path:
    """A config's output_dir is the adapter's folder; relative paths start at SCALPEL_HOME."""
    root = Path(paths.check_path_text(output_dir, "output_dir")).expanduser()
    if not root.is_absolute():
        root = paths.home() / root
    root = root.resolve()
    paths.check_name(root.name, "adapter")
    return root


def root_for_name(name: str) -> Path:
    return paths.adapters_dir() / paths.check_name(name, "adapter")


def versions(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p.name)
        for p in root.iterdir()
        if p.is_dir() and (m := VERSION_PATTERN.match(p.name)) and (p / MANIFEST_NAME).is_file()
    ]
    return [name for _, name in sorted(found)]


def _read_active(root: Path) -> dict | None:
    """active.json as written by set_active; None when there is none, StoreDamage when it cannot be used."""
    f = root / ACTIVE_NAME
    if not f.is_file():
        return None
    shown = paths.shown(f)
    try:
        data = json.loads(f.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        detail = "it is empty" if f.stat().st_size == 0 else f"it is not valid JSON ({type(exc).__name__})"
        raise StoreDamage(f"{shown}: {detail}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("version"), str):
        raise StoreDamage(f'{shown}: it must be a JSON object with a "version" string')
    history = data.get("history")
    if history is not None and not (
        isinstance(history, list) and all(isinstance(h, dict) and isinstance(h.get("version"), str) for h in history)
    ):
        raise StoreDamage(f'{shown}: "history" must be a list of {{"version": ...}} objects')
    return data


def active_version(root: Path) -> str | None:
    """The live version, or None when the name has none; StoreDamage when the pointer is unusable."""
    data = _read_active(root)
    if data is None:
        return None
    if data["version"] not in versions(root):
        raise StoreDamage(f"{paths.shown(root / ACTIVE_NAME)}: it points at {data['version']!r}, which is not stored")
    return data["version"]


def activation_history(root: Path) -> list[dict]:
    """Every switch of the active pointer, oldest first: {version, at, reason}."""
    data = _read_active(root)
    if data is None:
        return []
    return data.get("history") or [{"version": data["version"], "at": data.get("updated_at"), "reason": None}]


def set_active(root: Path, version: str, reason: str = "published") -> None:
    """Point the name at `version` (one atomic rename), and record the switch in the pointer's history."""
    if version not in versions(root):
        raise NotFoundError(f"adapter {root.name!r} has no version {version}", param="version")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        earlier = activation_history(root)
    except StoreDamage:  # a damaged pointer is replaced (that is how `scalpel adapters check --repair` heals it)
        earlier = []
    switch = {"version": version, "at": now, "reason": reason}
    history = earlier + [switch]
    # A second record of every switch, appended, so a damaged active.json can be rebuilt from it.
    with (root / ACTIVATIONS_NAME).open("a", encoding="utf-8") as log_file:
        log_file.write(json.dumps(switch) + "\n")
    write_json(root / ACTIVE_NAME, {"version": version, "updated_at": now, "history": history[-200:]})


def promote(name: str, version: str) -> str | None:
    """Make an existing version the live one; returns the version it replaced."""
    root = _existing_root(name)
    previous = active_version(root)
    set_active(root, version, reason=f"promoted (was {previous})")
    return previous


def rollback(name: str, to: str | None = None) -> tuple[str | None, str]:
    """Go back to `to`, or to the version that was live before the current one. Returns (from, to)."""
    root = _existing_root(name)
    current = active_version(root)
    if to is None:
        earlier = [
            h["version"]
            for h in activation_history(root)[:-1]
            if h["version"] != current and h["version"] in versions(root)
        ]
        if not earlier:
            raise ConflictError(
                f"adapter {name!r} has no earlier live version to roll back to; "
                f"use --to (versions: {', '.join(versions(root))})",
                param="to",
                code="nothing_to_roll_back",
            )
        to = earlier[-1]
    if to == current:
        raise ConflictError(f"{name}@{to} is already live", param="to", code="already_active")
    set_active(root, to, reason=f"rolled back from {current}")
    return current, to


def delete_version(name: str, version: str) -> None:
    """Remove one version for good. The live version is refused: promote or roll back first."""
    root = _existing_root(name)
    if version not in versions(root):
        raise NotFoundError(f"adapter {name!r} has no version {version!r}", param="version")
    if version == active_version(root):
        raise ConflictError(
            f"{name}@{version} is the live version; promote or roll back to another one before deleting it",
            param="version",
            code="version_active",
        )
    # Renamed away first, so the store never shows a half-deleted version.
    doomed = root / f".deleted-{version}-{os.getpid()}"
    (root / version).rename(doomed)
    shutil.rmtree(doomed)


def _existing_root(name: str) -> Path:
    root = root_for_name(name)
    if not versions(root):
        raise NotFoundError(f"adapter {name!r} is not in the store", param="name", code="adapter_not_found")
    return root


def publish(root: Path, staged: Path, *, activate: bool = True) -> AdapterVersion:
    """Move a finished version folder into the store under the next free vN, then point at it."""
    existing = versions(root)
    number = int(existing[-1][1:]) + 1 if existing else 1
    while (root / f"v{number}").exists():  # a leftover folder without manifest is never reused
        number += 1
    final = root / f"v{number}"
    root.mkdir(parents=True, exist_ok=True)
    staged.rename(final)
    if activate:
        set_active(root, final.name)
    return AdapterVersion(root.name, final.name, final)


@contextlib.contextmanager
def new_staging(root: Path) -> Iterator[Path]:
    """A private folder beside the versions to assemble a version in; publish() moves it into place.

    If anything fails before that, the folder is removed and the store is exactly as it was.
    """
    root.mkdir(parents=True, exist_ok=True)
    sweep_staging(root)
    stage = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=root))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def sweep_staging(root: Path) -> list[Path]:
    """Remove staging folders whose process is gone (a run killed with SIGKILL cannot clean up after itself)."""
    swept = []
    for stage in root.glob(".staging-*"):
        pid = stage.name.split("-")[1]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)
            swept.append(stage)
    return swept


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve(ref: str) -> AdapterVersion:
    """'name' gives the active version, 'name@vN' pins one; only names from the store are accepted."""
    name, _, version = ref.partition("@")
    root = root_for_name(name)
    if not root.is_dir():
        raise NotFoundError(f"adapter {name!r} is not in the store", param="model", code="model_not_found")
    if version:
        if not VERSION_PATTERN.match(version) or version not in versions(root):
            raise NotFoundError(
                f"adapter {name!r} has no version {version!r} (versions: {', '.join(versions(root)) or 'none'})",
                param="model",
                code="model_not_found",
            )
    else:
        live = active_version(root)
        if live is None:
            raise NotFoundError(f"adapter {name!r} has no active version", param="model", code="model_not_found")
        version = live
    found = AdapterVersion(name, version, root / version)
    if not found.gguf.is_file():
        raise StoreDamage(f"{found.ref} is damaged: {paths.shown(found.gguf)} is missing")
    return found


def entries() -> list[str]:
    """Every adapter name with a folder in the store, usable or not."""
    root = paths.adapters_dir()
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and paths.NAME_PATTERN.match(p.name) and ".." not in p.name
    )


def list_adapters() -> list[str]:
    """The adapters that can be served: a live version whose pointer, manifest and files are intact.
    A damaged one is left out, with a log line; see problems()."""
    return [name for name in entries() if not problems(name)]


NO_LIVE_VERSION = "no live version"


_reported: dict[str, list[str]] = {}  # name -> the problems last logged, so each change is logged once


def problems(name: str) -> list[str]:
    """What keeps `name` from being served (empty when nothing does): the pointer, then the live version.
    Each new finding is logged once."""
    root = root_for_name(name)
    try:
        live = active_version(root)
        found = [NO_LIVE_VERSION] if live is None else version_problems(AdapterVersion(name, live, root / live))
    except StoreDamage as exc:
        found = [exc.message]
    if found != _reported.get(name, []) and found != [NO_LIVE_VERSION]:
        if found:
            log.warning("adapter %s is unavailable: %s", name, "; ".join(found))
        else:
            log.info("adapter %s is available again", name)
    _reported[name] = found
    return found


def version_problems(version: AdapterVersion) -> list[str]:
    """A version's own damage: its manifest, and every file the manifest lists (present, with its sha256)."""
    try:
        manifest = version.manifest
    except StoreDamage as exc:
        return [exc.message]
    found = []
    if not version.gguf.is_file():
        found.append(f"{paths.shown(version.gguf)} is missing")
    for relative, expected in sorted(manifest.files.items()):
        if relative == MANIFEST_NAME:  # sealed before the manifest's final write: it cannot hash itself
            continue
        f = version.path / relative
        if not f.is_file():
            found.append(f"{paths.shown(f)} is missing")
        elif file_sha256(f) != expected:
            found.append(f"{paths.shown(f)}: its sha256 does not match the manifest's")
    return found


def verify(version: AdapterVersion) -> None:
    """Refuse a stored version whose manifest or files are damaged (StoreDamage), before anything loads it.
    A candidate still being staged (an update evaluates it before publishing) has no sealed manifest yet."""
    if not VERSION_PATTERN.match(version.version):
        return
    found = version_problems(version)
    if found:
        log.warning("adapter %s refused: %s", version.ref, "; ".join(found))
        raise StoreDamage(f"{version.ref} is damaged: {'; '.join(found)}")


_digests: dict[Path, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256): hashed again on a change


def file_sha256(path: Path) -> str:
    """A file's sha256, remembered until its size or modification time changes."""
    stat = path.stat()
    cached = _digests.get(path)
    if cached and cached[:2] == (stat.st_size, stat.st_mtime_ns):
        return cached[2]
    digest = sha256_file(path)
    _digests[path] = (stat.st_size, stat.st_mtime_ns, digest)
    return digest
