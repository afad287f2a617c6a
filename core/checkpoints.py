"""Fine-tuning checkpoints as models: `<fine_tuned_model>:ckpt-step-<N>` names one kept checkpoint's adapter.

A fine-tuning job's worker converts each checkpoint it saves into a GGUF adapter, with a manifest, under
.scalpel/checkpoints/<job id>/step-<N>/ (scalpel.jobs.checkpoints writes it). Serving resolves the id here,
from those files alone: no job database in a request's path. Deleting the job removes the folder, and the
id is a 404 from then on.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from core import adapter_store, paths
from core.adapter_store import AdapterVersion, StoreDamage
from core.errors import NotFoundError, ScalpelError
from core.manifest import MANIFEST_NAME

# ft:<base>:<suffix>:<job id>:ckpt-step-<N>; neither a base name nor a suffix can hold a ':'
CHECKPOINT_ID = re.compile(r"^(?P<model>ft:[^:]+:[^:]*:(?P<job>[^:]+)):ckpt-step-(?P<step>[1-9][0-9]{0,11})$")


def model_id(fine_tuned_model: str, step: int) -> str:
    """The id checkpoints.list reports for a job's checkpoint at `step`."""
    return f"{fine_tuned_model}:ckpt-step-{step}"


def is_checkpoint_id(model: str) -> bool:
    return CHECKPOINT_ID.match(model) is not None


def job_folder(job_id: str) -> Path:
    return paths.state_dir() / "checkpoints" / paths.check_name(job_id, "job")


def version(job_id: str, step: int) -> AdapterVersion:
    """The checkpoint as an adapter version the engine can load; its ref is `<job id>@ckpt-step-<N>`."""
    return AdapterVersion(job_id, f"ckpt-step-{step}", job_folder(job_id) / f"step-{step}")


def resolve(model: str) -> AdapterVersion:
    """A checkpoint id's adapter: 404 when it names no kept checkpoint (its job deleted, or no such step)."""
    match = CHECKPOINT_ID.match(model)
    if match is None:
        raise NotFoundError(f"{model!r} is not a checkpoint id", param="model", code="model_not_found")
    try:
        found = version(match["job"], int(match["step"]))
    except ScalpelError as exc:  # a job id that is no valid name
        raise NotFoundError(f"no checkpoint {model!r}", param="model", code="model_not_found") from exc
    if not (found.path / MANIFEST_NAME).is_file() or found.manifest.fine_tuned_model != model:
        raise NotFoundError(
            f"no checkpoint {model!r}: its job was deleted, or the job kept no checkpoint at that step",
            param="model",
            code="model_not_found",
        )
    problems = adapter_store.version_problems(found)  # the manifest's hashes, as a stored version is checked
    if problems:
        raise StoreDamage(f"checkpoint {model!r} is damaged: {'; '.join(problems)}")
    return found


def listed() -> list[tuple[str, str]]:
    """Every kept checkpoint as (its id, its engine ref), for the model list; an unreadable one is left out."""
    root = paths.state_dir() / "checkpoints"
    found = []
    for manifest in root.glob(f"*/step-*/{MANIFEST_NAME}") if root.is_dir() else []:
        try:
            ckpt = AdapterVersion(manifest.parent.parent.name, manifest.parent.name, manifest.parent).manifest
            match = CHECKPOINT_ID.match(ckpt.fine_tuned_model or "")
            if match and manifest.parent == version(match["job"], int(match["step"])).path:  # what resolve() reads
                found.append((match["job"], int(match["step"]), match.string))
        except ScalpelError:  # a damaged manifest, or an id naming no valid job
            continue
    return [(model, version(job, step).ref) for job, step, model in sorted(found)]


def delete(job_id: str) -> None:
    """Remove a job's kept checkpoints (renamed away first, so no reader sees half a folder)."""
    folder = job_folder(job_id)
    if not folder.exists():
        return
    doomed = folder.with_name(f".deleted-{folder.name}-{os.getpid()}")
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
