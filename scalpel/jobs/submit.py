"""Turn a request (the plan's config, or OpenAI's fine-tuning fields) into a validated, queued job; keep uploads.

Everything that can be checked before training is checked here, so a bad request fails at once with the
field, file or line named, instead of minutes later in a worker.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core import adapter_store, model_store, paths
from core.atomic import temporary_path
from core.errors import ScalpelError
from core.job_store import Job, JobStore, StoredFile, new_id
from training.config import LoraSettings, TrainConfig, TrainingSettings, parse_config
from training.dataset import load_examples
from training.distributed import Launch, launch_settings
from training.quality import check

# OpenAI's "auto" hyperparameters, mapped onto the plan's surgical LoRA (r=8, alpha=16, q/k/v).
FT_BASE_LEARNING_RATE = 1e-3  # times learning_rate_multiplier ("auto" = 1)
FT_AUTO_BATCH_SIZE = 4
SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def auto_epochs(n_examples: int) -> int:
    """3 passes over a large dataset, more over a small one, so that about 300 examples are seen (at most 10)."""
    return max(3, min(10, math.ceil(300 / max(n_examples, 1))))


# ----- datasets -----


def resolve_dataset(store: JobStore, ref: str, param: str) -> Path:
    """A file id from /v1/files, or a path below SCALPEL_HOME; never a path elsewhere on the server."""
    if not isinstance(ref, str) or not ref:
        raise ScalpelError(f"{param} must be a file id or a path below the scalpel home", param=param)
    paths.check_path_text(ref, param)
    if ref.startswith("file-"):
        return Path(store.get_file(ref).path)
    try:
        path = (paths.home() / ref).resolve()
        outside = not path.is_relative_to(paths.home()) or path.is_relative_to(paths.state_dir())
        found = not outside and path.is_file()
    except (OSError, ValueError) as exc:
        raise ScalpelError(f"{param} {ref!r} cannot be read ({type(exc).__name__})", param=param) from exc
    if outside:
        raise ScalpelError(
            f"{param} {ref!r} is outside the scalpel home; upload it with POST /v1/files and pass its file id",
            param=param,
            code="path_not_allowed",
        )
    if not found:
        raise ScalpelError(f"{param} {ref!r}: no such file below the scalpel home", param=param, code="file_not_found")
    return path


def validate_dataset(path: Path, param: str, shown_as: str | None = None) -> int:
    """Load and quality-check a dataset; errors name the example. Returns the number of examples."""

    def named(message: str) -> str:
        return message.replace(str(path), shown_as) if shown_as else message

    try:
        examples = load_examples(path)
    except ScalpelError as exc:
        raise ScalpelError(named(exc.message), param=param, code=exc.code or "invalid_file") from exc
    report = check(examples)
    if report.errors:
        first = report.errors[0]
        raise ScalpelError(
            named(
                f"{first.where}: {first.message} ({len(report.errors)} errors in all; run "
                f"`scalpel data check` on the file)"
            ),
            param=param,
            code="invalid_file",
        )
    return len(examples)


def uploads_dir() -> Path:
    """Uploaded files are kept as <file id>.jsonl here."""
    return paths.state_dir() / "files"


def upload_id(path: str) -> str | None:
    """The file id behind a stored upload's path (None for any other path)."""
    stored = Path(path)
    return stored.stem if stored.parent == uploads_dir() else None


# An upload with purpose "user_data" is an adapter for POST /api/adapters/{name}/import, known by its first bytes.
ADAPTER_UPLOADS = {b"GGUF": ".gguf", b"PK\x03\x04": ".zip"}


def store_upload(store: JobStore, filename: str, content: bytes, purpose: str) -> StoredFile:
    """OpenAI's file upload: purpose 'fine-tune' (a dataset, validated before it is kept) or 'user_data' (an
    adapter to import: a GGUF LoRA file or a zip of a PEFT folder)."""
    if purpose not in ("fine-tune", "user_data"):
        raise ScalpelError(
            f"purpose {purpose!r} is not supported; only 'fine-tune' (a dataset) or 'user_data' (an adapter to "
            "import: a GGUF LoRA or a zip of a PEFT folder)",
            param="purpose",
        )
    file_id = new_id("file")
    if purpose == "user_data":
        suffix = ADAPTER_UPLOADS.get(content[:4])
        if suffix is None:
            raise ScalpelError(
                "a user_data file must be an adapter to import: a GGUF LoRA file or a zip of a PEFT folder",
                param="file",
                code="invalid_file",
            )
        final = uploads_dir() / f"{file_id}{suffix}"
        with temporary_path(final) as tmp:
            tmp.write_bytes(content)
        n = 0
    else:
        final = uploads_dir() / f"{file_id}.jsonl"
        with temporary_path(final) as tmp:
            tmp.write_bytes(content)
            n = validate_dataset(tmp, "file", shown_as=Path(filename).name or "upload")
    return store.add_file(
        StoredFile(
            id=file_id,
            filename=Path(filename).name,
            purpose=purpose,
            bytes=len(content),
            examples=n,
            path=str(final),
            created_at=time.time(),
        )
    )


def delete_upload(store: JobStore, file_id: str) -> StoredFile:
    found = store.get_file(file_id)
    users = [
        j.id
        for status in ("queued", "running")
        for j in store.list(status=status, limit=10_000)
        if found.path in (j.training_file, j.validation_file)
    ]
    if users:
        raise ScalpelError(
            f"file {file_id} is in use by {', '.join(users)}", param="file_id", code="file_in_use", status=409
        )
    store.delete_file(file_id)
    Path(found.path).unlink(missing_ok=True)
    return found


# ----- how many processes train -----

LAUNCH_KEY = "launch"  # beside the TrainConfig in a job's config: {"nproc_per_node": N}, when N was asked for


def job_config(config: TrainConfig, nproc_per_node: object = None) -> dict:
    """What a job stores as its config: the TrainConfig, and, when the request set nproc_per_node (checked
    here: a whole number from 1 to $SCALPEL_MAX_NPROC_PER_NODE), how many processes train it."""
    dumped = config.model_dump(mode="json")
    if nproc_per_node is None:
        return dumped
    return {**dumped, LAUNCH_KEY: launch_settings(nproc_per_node=nproc_per_node).model_dump()}


def split_launch(stored: dict) -> tuple[dict, Launch | None]:
    """A job's config as job_config stored it: the TrainConfig's fields, and the Launch if it has one."""
    config = {k: v for k, v in stored.items() if k != LAUNCH_KEY}
    return config, Launch.model_validate(stored[LAUNCH_KEY]) if LAUNCH_KEY in stored else None


# ----- the plan's API -----


def _adapter_for(config: TrainConfig) -> str:
    """The config's output_dir must be a folder in the adapter store: a job never writes elsewhere."""
    try:
        root = adapter_store.root_for_output_dir(config.output_dir)
    except ScalpelError as exc:
        raise ScalpelError(exc.message, param="output_dir") from exc
    if root.parent != paths.adapters_dir():
        raise ScalpelError(
            f"output_dir {config.output_dir!r} must name a folder in the adapter store "
            f"(adapters/ below the scalpel home), such as ./adapters/{root.name}",
            param="output_dir",
            code="path_not_allowed",
        )
    return root.name


def _base(name: str, param: str) -> str:
    try:
        return model_store.get(name).name
    except ScalpelError as exc:
        raise ScalpelError(
            f"{exc.message}; register it with `scalpel models add {name} PATH`, or pass "
            f"`model` to train another registered base",
            param=param,
            code="model_not_found",
            status=404,
        ) from exc


def submit_plan_job(
    store: JobStore,
    config_data: object,
    *,
    dataset: str,
    eval_dataset: str | None = None,
    model: str | None = None,
    max_steps: int | None = None,
    nproc_per_node: int | None = None,
) -> Job:
    """/api/training/start: the plan's config file unchanged, plus where the data is (and, optionally, how many
    processes train it: torchrun's nproc_per_node; batch_size is then per process). A "preservation": false
    beside the config's fields trains without base preservation (on by default)."""
    preserve = True
    if isinstance(config_data, dict) and PRESERVATION_FIELD in config_data:
        config_data = dict(config_data)
        preserve = _preservation(config_data.pop(PRESERVATION_FIELD), PRESERVATION_FIELD)
    config = parse_config(config_data, "(request body)")
    stored = job_config(config, nproc_per_node)
    base = _base(model or config.model_name, "model" if model else "model_name")
    adapter = _adapter_for(config)
    train_path = resolve_dataset(store, dataset, "dataset")
    validate_dataset(train_path, "dataset")
    eval_path = resolve_dataset(store, eval_dataset, "eval_dataset") if eval_dataset else None
    if eval_path:
        validate_dataset(eval_path, "eval_dataset")
    if max_steps is not None and max_steps < 1:
        raise ScalpelError("max_steps must be at least 1", param="max_steps")
    return store.create(
        Job(
            id=new_id("job"),
            kind="plan",
            status="queued",
            model=base,
            adapter=adapter,
            config=stored,
            training_file=str(train_path),
            validation_file=str(eval_path) if eval_path else None,
            max_steps=max_steps,
            hyperparameters={PRESERVATION_FIELD: preserve},
        )
    )


# Base preservation (scalpel.preservation) is on for every job unless its request says false; the job keeps the
# choice in its hyperparameters, where the worker reads it.
PRESERVATION_FIELD = "preservation"


def _preservation(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise ScalpelError(
            f"{param} must be true or false (base preservation: the base's own answers mixed into training; "
            "on by default)",
            param=param,
        )
    return value


def preservation_on(job: Job) -> bool:
    """Whether a training job trains with base preservation (jobs stored before it was a choice: yes)."""
    return bool((job.hyperparameters or {}).get(PRESERVATION_FIELD, True))


# ----- OpenAI's fine-tuning API -----


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | str = Field("auto")
    batch_size: int | str = Field("auto")
    learning_rate_multiplier: float | str = Field("auto")
    preservation: bool = True  # not OpenAI's: false trains without base preservation (PRESERVATION_FIELD)


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = "supervised"
    supervised: Supervised | None = None


class FineTuningRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    seed: int | None = None
    integrations: list | None = None
    metadata: dict | None = None
    nproc_per_node: int | None = None  # not OpenAI's: processes that train the job (torchrun), batch_size each


def _choice(value: float | str, auto, name: str, *, low: float, high: float):
    if value == "auto":
        return auto
    if isinstance(value, str) or not low <= value <= high:
        raise ScalpelError(
            f"hyperparameters.{name} must be 'auto' or a number from {low:g} to {high:g}",
            param=f"hyperparameters.{name}",
        )
    return value


def parse_fine_tuning(body: object) -> FineTuningRequest:
    try:
        return FineTuningRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ScalpelError(f"{where}: {err['msg']}", param=where) from exc


def submit_fine_tuning_job(store: JobStore, request: FineTuningRequest) -> Job:
    """POST /v1/fine_tuning/jobs: OpenAI's fields mapped onto a surgical LoRA config."""
    if request.integrations:
        raise ScalpelError("integrations are not supported", param="integrations")
    if request.method and request.method.type != "supervised":
        raise ScalpelError(
            f"method.type {request.method.type!r} is not supported; only 'supervised'", param="method.type"
        )
    if request.suffix is not None and not SUFFIX_PATTERN.match(request.suffix):
        raise ScalpelError("suffix must be 1-40 letters, digits, '_' or '-'", param="suffix")
    if request.nproc_per_node is not None:
        launch_settings(nproc_per_node=request.nproc_per_node)  # a bad count fails before the data is read
    base = _base(request.model, "model")
    train_path = Path(store.get_file(request.training_file).path)
    n_examples = validate_dataset(train_path, "training_file")
    eval_path = Path(store.get_file(request.validation_file).path) if request.validation_file else None
    hp = (
        (request.method and request.method.supervised and request.method.supervised.hyperparameters)
        or request.hyperparameters
        or Hyperparameters()
    )
    n_epochs = _choice(hp.n_epochs, auto_epochs(n_examples), "n_epochs", low=1, high=50)
    batch_size = _choice(hp.batch_size, min(FT_AUTO_BATCH_SIZE, n_examples), "batch_size", low=1, high=256)
    multiplier = _choice(hp.learning_rate_multiplier, 1.0, "learning_rate_multiplier", low=0.01, high=10)
    job_id = new_id("ftjob")
    # batch_size examples on each process: N processes take a step over N times as many
    steps = math.ceil(n_examples / (int(batch_size) * (request.nproc_per_node or 1))) * n_epochs
    every = max(1, min(250, steps // 4))  # a checkpoint every quarter of the run: what a kill can cost
    config = TrainConfig(
        model_name=base,
        lora_config=LoraSettings(),
        training_config=TrainingSettings(
            num_epochs=n_epochs,
            batch_size=int(batch_size),
            learning_rate=FT_BASE_LEARNING_RATE * multiplier,
            warmup_steps=0,
            logging_steps=1,
            save_steps=every,
            eval_steps=every,
            seed=request.seed if request.seed is not None else 42,
        ),
        output_dir=f"./adapters/{job_id}",
        description=f"OpenAI fine-tuning job {job_id}",
    )
    return store.create(
        Job(
            id=job_id,
            kind="fine_tuning",
            status="queued",
            model=base,
            adapter=job_id,
            config=job_config(config, request.nproc_per_node),
            training_file=str(train_path),
            validation_file=str(eval_path) if eval_path else None,
            suffix=request.suffix,
            hyperparameters={
                "n_epochs": n_epochs,
                "batch_size": int(batch_size),
                "learning_rate_multiplier": multiplier,
                PRESERVATION_FIELD: hp.preservation,
            },
            fine_tuned_model=f"ft:{base}:{request.suffix or ''}:{job_id}",
        )
    )


# ----- the evening update over HTTP -----


def submit_update_job(
    store: JobStore, name: str, *, dataset: str, eval_suite: str | None = None, settings: dict | None = None
) -> Job:
    """POST /api/adapters/{name}/update: `scalpel update` as a job (validated now, run by a worker)."""
    from pydantic import ValidationError as SettingsError

    from scalpel.evaluate import load_suite
    from scalpel.update_settings import UpdateSettings

    live = adapter_store.resolve(name)
    train_path = resolve_dataset(store, dataset, "dataset")
    validate_dataset(train_path, "dataset")
    suite_path = resolve_dataset(store, eval_suite, "eval_suite") if eval_suite else None
    if suite_path:
        try:
            load_suite(suite_path)
        except ScalpelError as exc:
            raise ScalpelError(exc.message, param="eval_suite", code=exc.code) from exc
    try:
        parsed = UpdateSettings.model_validate(settings or {})
    except SettingsError as exc:
        err = exc.errors()[0]
        where = "settings." + ".".join(str(p) for p in err["loc"])
        raise ScalpelError(f"{where}: {err['msg']}", param=where) from exc
    return store.create(
        Job(
            id=new_id("update"),
            kind="update",
            status="queued",
            model=live.manifest.require_base().name,
            adapter=name,
            config=parsed.model_dump(),
            training_file=str(train_path),
            validation_file=str(suite_path) if suite_path else None,
        )
    )
