"""`scalpel adapters check`: every damaged entry in the adapter store, and the repairs its own history allows."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from core import adapter_store, paths
from core.adapter_store import ACTIVATIONS_NAME, AdapterVersion, StoreDamage


@dataclass
class Finding:
    name: str
    problem: str
    repair: str | None = None  # what --repair does (or did) about it; None: nothing it can do
    repaired: bool = False


def _switches(root: Path) -> list[str]:
    """The versions the pointer has pointed at, oldest first: from activations.jsonl, else active.json's history."""
    found: list[str] = []
    log = root / ACTIVATIONS_NAME
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(entry, dict) and isinstance(entry.get("version"), str):
                found.append(entry["version"])
    if not found:
        with contextlib.suppress(StoreDamage):
            found = [h["version"] for h in adapter_store.activation_history(root)]
    return found


def _intact(root: Path, version: str) -> bool:
    return version in adapter_store.versions(root) and not adapter_store.version_problems(
        AdapterVersion(root.name, version, root / version)
    )


def check_adapter(name: str, *, repair: bool = False) -> list[Finding]:
    root = adapter_store.root_for_name(name)
    findings: list[Finding] = []
    for leftover in sorted(root.glob(".deleted-*")):
        finding = Finding(name, f"{paths.shown(leftover)}: a deletion was interrupted", "remove the leftover folder")
        if repair:
            shutil.rmtree(leftover, ignore_errors=True)
            finding.repaired = True
        findings.append(finding)
    live: str | None = None
    pointer_problem: str | None = None
    try:
        live = adapter_store.active_version(root)
    except StoreDamage as exc:
        pointer_problem = exc.message
    if live is not None:
        damaged_live = adapter_store.version_problems(AdapterVersion(name, live, root / live))
        if damaged_live:
            pointer_problem = f"the live version {live} is damaged: {'; '.join(damaged_live)}"
    for version in adapter_store.versions(root):
        if version == live:
            continue
        for problem in adapter_store.version_problems(AdapterVersion(name, version, root / version)):
            findings.append(Finding(name, problem, None))
    if pointer_problem:
        earlier = [v for v in reversed(_switches(root)) if v != live and _intact(root, v)]
        if earlier:
            finding = Finding(name, pointer_problem, f"point {name} at {earlier[0]}, its last intact live version")
            if repair:
                adapter_store.set_active(root, earlier[0], reason=f"repaired by `scalpel adapters check` ({live})")
                finding.repaired = True
        else:
            finding = Finding(name, pointer_problem, None)
        findings.append(finding)
    return findings


def check_store(names: list[str] | None = None, *, repair: bool = False) -> list[Finding]:
    """Check every adapter (or `names`); with `repair`, fix what the versions' own history can fix."""
    findings: list[Finding] = []
    for name in names or adapter_store.entries():
        findings += check_adapter(name, repair=repair)
    return findings
