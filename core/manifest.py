"""The manifest of an adapter version (adapters/<name>/v<N>/manifest.json), typed: written and read only here.

It is the contract between the stages: publishing writes it once, when the version is staged, and the CLI,
the server, the job worker and the evening update read its fields. Every field is optional with a default,
so the manifests of older versions (no data_quality, no concept_loss, no report) and minimal ones (a
benchmark's `{"adapter": ..., "bench": true}`) still load; keys this model does not know are kept (extra)
and written back unchanged. Only the fields a manifest actually has are written back (exclude_unset), so
reading and writing a manifest gives the same JSON.

The training config and the evaluation results stay plain dicts: their shapes belong to training.config
(TrainConfig.model_dump) and to scalpel's evaluation, which core may not import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core import paths
from core.atomic import write_json
from core.errors import ScalpelError

MANIFEST_NAME = "manifest.json"


class _Part(BaseModel):
    """Unknown keys are kept, so a manifest written by a newer scalpel survives a round trip through this one."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class BaseRef(_Part):
    """The base model the adapter was trained on, as registered in the model store."""

    name: str
    fingerprint: str  # sha256 of the base's served GGUF, also stamped into adapter.gguf
    gguf: str | None = None  # the GGUF that serving loads for that base


class DatasetRef(_Part):
    """A dataset the version was trained or evaluated with (a copy is kept in the version's data/ folder)."""

    path: str
    sha256: str


class Metrics(_Part):
    """Training figures; the Hugging Face Trainer's own metrics (train_runtime, train_loss, epoch...) are extra."""

    final_loss: float | None = None
    global_step: int | None = None
    examples: int | None = None
    tokens: int | None = None  # in one epoch
    tokens_trained: int | None = None  # that the optimizer steps went through (a step cap counts)
    truncated_examples: int | None = None
    train_seconds: float | None = None
    convert_seconds: float | None = None
    concepts: dict[str, int] = Field(default_factory=dict)  # examples per concept, as given
    concept_loss: dict[str, float] = Field(default_factory=dict)  # mean answer loss per concept after training
    device: str | None = None
    precision: str | None = None
    # How the optimizer steps were taken (older manifests have none of these): the processes that trained
    # (torchrun's world size), the examples one step saw (batch_size, which is per process, times
    # gradient_accumulation_steps times world_size), the configured peak learning rate, and the DDP backend.
    world_size: int | None = None
    global_batch: int | None = None
    learning_rate: float | None = None
    backend: str | None = None  # "gloo" (CPU) or "nccl" (CUDA); None for one process


class GgufInfo(_Part):
    """The converted adapter.gguf."""

    outtype: str
    alpha: float
    rank: int
    modules: int
    size_bytes: int


class ReplayEmphasis(_Part):
    """What an update candidate leaned on (scalpel.update.Emphasis, as recorded)."""

    new_repeats: int = 1
    replay_in_full: list[str] = Field(default_factory=list)
    preservation_scale: float = 1.0


class UpdateInfo(_Part):
    """How an evening update trained this version (only versions made by `scalpel update`)."""

    new_data: str | None = None
    new_examples: int | None = None
    replayed: int | None = None
    preservation: int | None = None
    from_: str | None = Field(None, alias="from")  # the live version it continued, NAME@vN
    candidate: int | None = None
    emphasis: ReplayEmphasis = Field(default_factory=ReplayEmphasis)
    retry_of: str | None = None


class PreservationInfo(_Part):
    """Base preservation in this version's training (scalpel.preservation); older manifests have none."""

    enabled: bool = False  # False: trained with --no-preservation (or a job's "preservation": false)
    examples: int = 0  # the base's own answers mixed into training
    pool: int | None = None  # the answers there were to draw from
    ratio: float | None = None  # per example of the version's own data
    loss: str | None = None  # "distill" (KL to the base's distribution) or "answers"
    weight: float | None = None  # the distillation term's weight


class ImportSource(_Part):
    """Where an imported version came from (`scalpel adapters import`, POST /api/adapters/{name}/import)."""

    format: str  # "peft" (a PEFT folder, converted here) or "gguf" (a GGUF LoRA, stored as given)
    source: str  # the path given to the CLI, or the uploaded file's id and name
    sha256: str  # of the file as given: the GGUF, or the PEFT folder's adapter_model.safetensors
    base_model: str | None = None  # the base the PEFT config names (base_model_name_or_path), if any
    verify: dict[str, Any] | None = None  # conversion.verify's report, when logits were compared


class Manifest(_Part):
    """One adapter version's manifest. Unknown top-level keys are kept in `model_extra`."""

    adapter: str | None = None
    base: BaseRef | None = None
    parent_version: str | None = None
    datasets: dict[str, DatasetRef] = Field(default_factory=dict)  # by role: "train", "eval"
    config: dict[str, Any] = Field(default_factory=dict)  # TrainConfig.model_dump(mode="json")
    metrics: Metrics = Field(default_factory=Metrics)
    gguf: GgufInfo | None = None
    data_quality: dict[str, Any] | None = None  # training.quality.Report.as_dict()
    eval: dict[str, Any] | None = None  # the evaluation through llama.cpp (scalpel.evaluate), None on old versions
    update: UpdateInfo | None = None
    preservation: PreservationInfo | None = None
    job_id: str | None = None  # the fine-tuning job that trained it
    fine_tuned_model: str | None = None  # that job's ft:<base>:<suffix>:<job id>
    created_at: str | None = None  # ISO 8601, UTC
    files: dict[str, str] = Field(default_factory=dict)  # path in the version folder -> sha256
    report: str | None = None  # the training report, relative to the version folder
    imported_from: ImportSource | None = None  # set only on versions that were imported, not trained here

    def require_base(self) -> BaseRef:
        """The base model, for readers that cannot do without one (a benchmark's minimal manifest has none)."""
        if self.base is None:
            raise ScalpelError(
                f"the manifest of adapter {self.adapter or '(unnamed)'} names no base model",
                param="base",
                code="manifest_incomplete",
            )
        return self.base

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to manifest.json (and returned by GET /api/adapters/{name}): the keys it has,
        under their JSON names ("from", not from_)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def _shown(path: Path) -> str:
    """The manifest's file as a user should see it: relative to SCALPEL_HOME (adapters/<name>/vN/manifest.json),
    or, outside it, the adapter/version/file part only; never an absolute path."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(paths.home()))
    except (ValueError, OSError):
        return str(Path(*path.parts[-3:]))


def read_manifest(path: Path) -> Manifest:
    """Read a version's manifest.json; a missing, unreadable or damaged one raises ScalpelError naming the file."""
    shown = _shown(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ScalpelError(
            f"{shown}: the adapter version has no manifest", param=shown, code="manifest_missing"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ScalpelError(
            f"{shown}: cannot read the manifest ({type(exc).__name__})", param=shown, code="manifest_unreadable"
        ) from exc
    if not text.strip():
        raise ScalpelError(f"{shown}: the manifest is empty", param=shown, code="manifest_invalid")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScalpelError(
            f"{shown}:{exc.lineno}:{exc.colno}: the manifest is not valid JSON: {exc.msg}",
            param=shown,
            code="manifest_invalid",
        ) from exc
    if not isinstance(data, dict):
        raise ScalpelError(
            f"{shown}: the manifest must be a JSON object, not {type(data).__name__}",
            param=shown,
            code="manifest_invalid",
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ScalpelError(
            f"{shown}: {where}: {err['msg']} ({exc.error_count()} problem(s) in the manifest)",
            param=shown,
            code="manifest_invalid",
        ) from exc


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write manifest.json atomically: readers see the old file or the new one, never half of one."""
    write_json(Path(path), manifest.to_json())
