"""What the job routes (and the dashboard's /ui/api/state) answer on success, for the OpenAPI schema.

The routes return plain dicts; these models only describe them (`responses={200: {"model": ...}}`), they never
filter an answer. Each lists the keys its route always sends and allows more (`extra="allow"`).
"""

from __future__ import annotations

from typing import Any, Literal

from serving.responses import Open  # the same open description model as the serving routes'

# ----- the plan's /api/training routes -----


class TrainingJob(Open):
    """scalpel.jobs.routes.plan_job_view."""

    id: str
    object: Literal["training.job"]
    kind: str
    status: str
    model: str
    adapter: str
    version: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    training_file: str
    validation_file: str | None
    progress: dict[str, Any] | None  # the latest metrics event's data
    result: dict[str, Any] | None
    error: dict[str, Any] | None


class TrainingJobDetail(TrainingJob):
    """One job with its configuration and its loss curve."""

    config: dict[str, Any]
    loss_history: list[dict[str, Any]]  # step, epoch, loss, eval_loss, learning_rate where known


class SubmittedJob(TrainingJob):
    job_id: str  # the same as id, as the plan's clients read it


class TrainingJobList(Open):
    object: Literal["list"]
    data: list[TrainingJob]


class JobEvent(Open):
    seq: int
    created_at: float
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


class JobEventList(Open):
    object: Literal["list"]
    data: list[JobEvent]


# ----- OpenAI's files -----


class FileObject(Open):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"]
    status_details: str | None


class FileList(Open):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool


class FileDeleted(Open):
    id: str
    object: Literal["file"]
    deleted: Literal[True]


# ----- OpenAI's fine-tuning -----


class FineTuningMethod(Open):
    type: Literal["supervised"]
    supervised: dict[str, Any]


class FineTuningJob(Open):
    """scalpel.jobs.routes.openai_job_view."""

    id: str
    object: Literal["fine_tuning.job"]
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    validation_file: str | None
    training_file: str
    hyperparameters: dict[str, Any]
    trained_tokens: int | None
    error: dict[str, Any] | None
    seed: int
    estimated_finish: int | None
    integrations: list[Any]
    metadata: dict[str, str] | None
    method: FineTuningMethod
    suffix: str | None


class FineTuningJobList(Open):
    object: Literal["list"]
    data: list[FineTuningJob]
    has_more: bool


class FineTuningEvent(Open):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: str
    message: str
    data: dict[str, Any]
    type: Literal["message", "metrics"]


class FineTuningEventList(Open):
    object: Literal["list"]
    data: list[FineTuningEvent]
    has_more: bool


class FineTuningCheckpoint(Open):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    fine_tuned_model_checkpoint: str
    metrics: dict[str, Any]  # step, train_loss


class FineTuningCheckpointList(Open):
    object: Literal["list"]
    data: list[FineTuningCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None


class JobDeleted(Open):
    id: str
    object: Literal["training.job", "fine_tuning.job"]
    deleted: Literal[True]


# ----- adapters brought from elsewhere -----


class ImportedAdapter(Open):
    """POST /api/adapters/{name}/import."""

    name: str
    version: str
    ref: str  # NAME@vN
    live: bool
    imported_from: dict[str, Any]  # format, source, sha256, base_model, verify (core.manifest.ImportSource)
    manifest: dict[str, Any]


# ----- the dashboard's /ui/api/state -----


class BaseModelView(Open):
    name: str
    format: str
    architecture: str
    fingerprint: str  # its first 12 hex digits
    created_at: str
    serving: bool


class DashboardAdapter(Open):
    name: str
    live: str | None
    available: bool
    problem: str | None
    history: list[dict[str, Any]]
    versions: list[dict[str, Any]]  # each: version and problems, then its manifest's figures when readable


class DashboardState(Open):
    serving: str
    bases: list[BaseModelView]
    adapters: list[DashboardAdapter]
    updates: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    jobs_served: bool
    models: list[str]
    loaded: list[str]


TEXT = {"schema": {"type": "string"}}
BINARY = {"schema": {"type": "string", "format": "binary"}}
# Server-sent events, with ?stream=true or Accept: text/event-stream. OpenAPI 3.1 cannot describe a whole
# stream: each event is described with OpenAPI 3.2's `itemSchema`, which schemathesis checks every event against.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "one job event (its seq is the id); or [DONE] once the job ends"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
EVENT_STREAM = {"text/event-stream": {"itemSchema": SSE_EVENT}}
