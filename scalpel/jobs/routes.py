"""Training over HTTP on one job engine: the plan's /api/training routes and OpenAI's files and fine-tuning routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from core import checkpoints, paths
from core.errors import ScalpelError
from core.job_store import Event, Job, JobStore, StoredFile, job_dir
from scalpel import importer
from scalpel.jobs import submit as jobs
from scalpel.jobs.responses import (
    BINARY,
    EVENT_STREAM,
    TEXT,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningCheckpointList,
    FineTuningEventList,
    FineTuningJob,
    FineTuningJobList,
    ImportedAdapter,
    JobDeleted,
    JobEventList,
    SubmittedJob,
    TrainingJob,
    TrainingJobDetail,
    TrainingJobList,
)
from scalpel.jobs.runner import JobRunner
from serving.app import Lifespan
from serving.auth import admin_key, caller
from serving.context import ServingContext, context

EVENT_POLL_SECONDS = 0.5
PING_SECONDS = 15  # an SSE comment this often keeps proxies from closing an idle job stream
RETRY_MS = 2000  # the reconnection delay the stream tells its clients
MAX_LIMIT = 1000  # a page of jobs or events; SQLite takes 64-bit integers, and no client needs more at once


class QuotaExceeded(ScalpelError):
    status = 429
    type = "rate_limit_error"


class ImportRequest(BaseModel):
    """POST /api/adapters/{name}/import: an uploaded adapter (purpose user_data) becomes the adapter's next version."""

    model_config = ConfigDict(extra="forbid")
    file_id: str = Field(min_length=1, max_length=200)  # a .gguf LoRA, or a .zip of a PEFT folder
    base: str | None = Field(None, min_length=1, max_length=64)  # a registered base; default: the served one
    verify: bool = False  # PEFT only: compare PyTorch and llama.cpp logits too (loads the base in PyTorch)
    promote: bool = True  # make it the live version (a first version is always live)


# ----- shapes -----


def shown_error(error: dict | None) -> dict | None:
    """A job's error as a client sees it: a worker's exception may name server paths, shown store-relative."""
    if not error:
        return error
    return {k: paths.scrub(v) if isinstance(v, str) else v for k, v in error.items()}


def _latest_progress(store: JobStore, job: Job) -> Event | None:
    """The job's newest metrics event: its data is the progress, its time is when that ETA was measured."""
    latest = store.events(job.id, type="metrics", newest_first=True, limit=1)
    return latest[0] if latest else None


def _progress(store: JobStore, job: Job) -> dict | None:
    latest = _latest_progress(store, job)
    return latest.data if latest else None


def plan_job_view(store: JobStore, job: Job, *, history: bool = False) -> dict:
    view: dict[str, Any] = {
        "id": job.id,
        "object": "training.job",
        "kind": job.kind,
        "status": job.status,
        "model": job.model,
        "adapter": job.adapter,
        "version": job.version,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "progress": _progress(store, job),
        "result": job.result,
        "error": shown_error(job.error),
    }
    if history:
        view["config"] = job.config
        view["loss_history"] = [
            {k: e.data[k] for k in ("step", "epoch", "loss", "eval_loss", "learning_rate") if k in e.data}
            for e in store.events(job.id, type="metrics", limit=100_000)
            if e.data and ("loss" in e.data or "eval_loss" in e.data)
        ]
    return view


def event_view(e: Event) -> dict:
    return {
        "seq": e.seq,
        "created_at": e.created_at,
        "level": e.level,
        "type": e.type,
        "message": e.message,
        "data": e.data,
    }


_OPENAI_STATUS = {
    "queued": "queued",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}


def _file_id(path: str | None) -> str | None:
    if path is None:
        return None
    return jobs.upload_id(path) or path


def openai_job_view(store: JobStore, job: Job) -> dict:
    hp = job.hyperparameters or {}
    latest = _latest_progress(store, job)
    progress = (latest.data or {}) if latest else {}
    eta = progress.get("eta_seconds") if job.status == "running" else None
    # The ETA was measured when that progress event was written: the finish is then plus the ETA (not the
    # job's creation plus it, which lies in the past for any job that waited in the queue).
    finish = latest.created_at + eta if latest and eta else None
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "model": job.model,
        "created_at": int(job.created_at),
        "finished_at": int(job.finished_at) if job.finished_at else None,
        "fine_tuned_model": job.fine_tuned_model if job.status == "succeeded" else None,
        "organization_id": "org-scalpel",
        "result_files": [],
        "status": _OPENAI_STATUS[job.status],
        "validation_file": _file_id(job.validation_file),
        "training_file": _file_id(job.training_file),
        "hyperparameters": hp,
        "trained_tokens": job.trained_tokens,
        "error": shown_error(job.error),
        "seed": job.config["training_config"]["seed"],
        "estimated_finish": int(finish) if finish else None,
        "integrations": [],
        "metadata": None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "suffix": job.suffix,
    }


def file_view(f: StoredFile) -> dict:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": int(f.created_at),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
    }


async def _json_body(request: Request) -> dict:
    """Any content type: the plan's curl may omit `-H Content-Type: application/json`."""
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ScalpelError(f"the request body is not valid JSON{where}", param="body", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise ScalpelError("the request body must be a JSON object", param="body")
    return body


async def _follow(store: JobStore, job_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: every event after `after`, then new ones as they come, until the job ends.

    Each carries its seq as the SSE id, so a client that reconnects (after the `retry` hint) sends it back
    as Last-Event-ID and continues where it was; sse-starlette adds the keep-alive pings.
    """
    yield ServerSentEvent(comment="job events", retry=RETRY_MS)
    while True:
        batch = await anyio.to_thread.run_sync(partial(store.events, job_id, after=after))
        for e in batch:
            after = e.seq
            yield ServerSentEvent(data=json.dumps(event_view(e)), id=str(e.seq))
        if not batch and (await anyio.to_thread.run_sync(store.get, job_id)).final:
            yield ServerSentEvent(data="[DONE]")
            return
        if not batch:
            await asyncio.sleep(EVENT_POLL_SECONDS)


# ----- routes -----


def training_router(store: JobStore, runner: JobRunner, *, default_dataset: str | None = None) -> APIRouter:
    """The routes, behind the serving app's own key checks (serving.auth)."""
    router = APIRouter()
    # Every route here writes, trains or reads uploaded data: admin keys only (serving.auth).
    admin = client = Depends(admin_key)
    quota = asyncio.Lock()  # a key's count and its new job or file are one step, so two requests cannot both fit

    def run(fn, *args, **kwargs):
        return anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    async def owned_job(request: Request, submit, *args, **kwargs) -> Job:
        """Submit a job for the request's key, within its limit of queued and running jobs (429 beyond it)."""
        owner, limit = caller(request).owner, context(request).settings.max_queued_jobs_per_key
        async with quota:
            queued, _ = await run(store.owned, owner)
            if owner is not None and queued >= limit:
                raise QuotaExceeded(
                    f"this key already has {queued} jobs queued or running (limit {limit}); wait for one to "
                    "finish or cancel one",
                    code="too_many_jobs",
                )
            job = await run(submit, *args, **kwargs)
            await run(store.set_owner, job_id=job.id, owner=owner)
        return job

    # The plan's API (admin routes).

    @router.post("/api/training/start", dependencies=[admin], responses={200: {"model": SubmittedJob}})
    async def start(
        request: Request,
        dataset: str | None = None,
        eval_dataset: str | None = None,
        model: str | None = None,
        max_steps: int | None = None,
        nproc_per_node: int | None = None,
    ):
        body = await _json_body(request)
        # Besides the plan's own fields, the body may say where the data is (or the query string may).
        dataset = body.pop("dataset", dataset) or default_dataset
        eval_dataset = body.pop("eval_dataset", eval_dataset)
        model = body.pop("model", model)
        max_steps = body.pop("max_steps", max_steps)
        nproc_per_node = body.pop("nproc_per_node", nproc_per_node)
        if not dataset:
            raise ScalpelError(
                'no dataset: pass ?dataset=FILE_ID_OR_PATH (or "dataset" in the body), or start '
                "the server with SCALPEL_TRAINING_DATA",
                param="dataset",
            )
        job = await owned_job(
            request,
            jobs.submit_plan_job,
            store,
            body,
            dataset=dataset,
            eval_dataset=eval_dataset,
            model=model,
            max_steps=max_steps,
            nproc_per_node=nproc_per_node,
        )
        return {**plan_job_view(store, job), "job_id": job.id}

    @router.post("/api/adapters/{name}/update", dependencies=[admin], responses={200: {"model": SubmittedJob}})
    async def update_adapter(name: str, request: Request):
        """The evening update as a job: {"dataset": FILE_OR_ID, "eval_suite": FILE_OR_ID?, "settings": {...}?}."""
        body = await _json_body(request)
        unknown = set(body) - {"dataset", "eval_suite", "settings"}
        if unknown:
            raise ScalpelError(
                f"unknown fields {sorted(unknown)}; expected dataset, eval_suite, settings", param=min(unknown)
            )
        if not body.get("dataset"):
            raise ScalpelError("dataset is required (a path below SCALPEL_HOME or a file id)", param="dataset")
        job = await owned_job(
            request,
            jobs.submit_update_job,
            store,
            name,
            dataset=body["dataset"],
            eval_suite=body.get("eval_suite"),
            settings=body.get("settings"),
        )
        return {**plan_job_view(store, job), "job_id": job.id}

    @router.get("/api/training/jobs", dependencies=[admin], responses={200: {"model": TrainingJobList}})
    async def list_jobs(status: str | None = None, limit: int = Query(100, ge=1, le=MAX_LIMIT)):
        found = await run(store.list, status=status, limit=limit)
        return {"object": "list", "data": [plan_job_view(store, j) for j in found]}

    @router.get("/api/training/jobs/{job_id}", dependencies=[admin], responses={200: {"model": TrainingJobDetail}})
    async def get_job(job_id: str):
        return plan_job_view(store, await run(store.get, job_id), history=True)

    @router.get(
        "/api/training/jobs/{job_id}/events",
        dependencies=[admin],
        responses={200: {"model": JobEventList, "content": EVENT_STREAM}},
    )
    async def job_events(request: Request, job_id: str, after: int = Query(0, ge=0, le=2**62), stream: bool = False):
        await run(store.get, job_id)  # 404 for an unknown job, before any stream starts
        if stream or "text/event-stream" in request.headers.get("accept", ""):
            resumed = request.headers.get("last-event-id", "")
            # ASCII digits only, and within SQLite's 64-bit integers: a header is any client's input
            since = int(resumed) if resumed.isascii() and resumed.isdigit() and len(resumed) <= 18 else after
            return EventSourceResponse(_follow(store, job_id, since), ping=PING_SECONDS)
        return {"object": "list", "data": [event_view(e) for e in await run(store.events, job_id, after=after)]}

    @router.post("/api/training/jobs/{job_id}/cancel", dependencies=[admin], responses={200: {"model": TrainingJob}})
    async def cancel_job(job_id: str):
        return plan_job_view(store, await run(runner.cancel, job_id))

    async def delete_job(ctx: ServingContext, job_id: str) -> Job:
        """A finished job, its events, its folder and its kept checkpoints; its published adapter stays."""
        if (await run(store.get, job_id)).final:  # the checkpoints go first: no id may outlive its job's record
            await run(checkpoints.delete, job_id)
            for ref in [r for r in ctx.engine.loaded() if r.startswith(f"{job_id}@ckpt-step-")]:
                await run(ctx.engine.unload, ref)
        job = await run(store.delete, job_id)  # 409 for a queued or running job
        await run(shutil.rmtree, job_dir(job_id), ignore_errors=True)
        return job

    @router.delete("/api/training/jobs/{job_id}", dependencies=[admin], responses={200: {"model": JobDeleted}})
    async def delete_training_job(job_id: str, ctx: ServingContext = Depends(context)):
        job = await delete_job(ctx, job_id)
        return {"id": job.id, "object": "training.job", "deleted": True}

    @router.post("/api/adapters/{name}/import", dependencies=[admin], responses={200: {"model": ImportedAdapter}})
    async def import_adapter(name: str, body: ImportRequest, ctx: ServingContext = Depends(context)):
        """`scalpel adapters import` for an upload (POST /v1/files with purpose user_data)."""
        f = await run(store.get_file, body.file_id)
        if f.purpose != "user_data":
            raise ScalpelError(
                f"{f.id} is a {f.purpose} upload; upload the adapter with purpose user_data", param="file_id"
            )
        try:
            imported = await run(
                importer.import_adapter,
                name,
                Path(f.path),
                base=body.base or ctx.engine.base.name,
                source=f"{f.id} ({f.filename})",
                verify=body.verify,
                promote=body.promote,
            )
        except ScalpelError as exc:
            exc.param = "file_id" if exc.param == "path" else exc.param  # the request names a file, not a path
            raise
        manifest = imported.manifest.to_json()
        return {
            "name": name,
            "version": imported.version.version,
            "ref": imported.version.ref,
            "live": imported.live,
            "imported_from": manifest["imported_from"],
            "manifest": manifest,
        }

    # OpenAI's files and fine-tuning API (client keys, as OpenAI's SDK sends them).

    @router.post("/v1/files", dependencies=[client], responses={200: {"model": FileObject}})
    async def upload(request: Request, file: UploadFile = File(...), purpose: str = Form(...)):
        content = await file.read()
        owner, limit = caller(request).owner, context(request).settings.max_upload_bytes_per_key
        async with quota:
            _, stored = await run(store.owned, owner)
            if owner is not None and stored + len(content) > limit:
                raise QuotaExceeded(
                    f"this key's files would take {stored + len(content)} bytes (limit {limit}); delete some "
                    "with DELETE /v1/files/{file_id}",
                    param="file",
                    code="upload_quota_exceeded",
                )
            stored_file = await run(jobs.store_upload, store, file.filename or "upload.jsonl", content, purpose)
            await run(store.set_owner, file_id=stored_file.id, owner=owner)
        return file_view(stored_file)

    @router.get("/v1/files", dependencies=[client], responses={200: {"model": FileList}})
    async def list_files(purpose: str | None = None):
        return {
            "object": "list",
            "data": [file_view(f) for f in await run(store.list_files, purpose=purpose)],
            "has_more": False,
        }

    @router.get("/v1/files/{file_id}", dependencies=[client], responses={200: {"model": FileObject}})
    async def get_file(file_id: str):
        return file_view(await run(store.get_file, file_id))

    @router.get(
        "/v1/files/{file_id}/content",
        dependencies=[client],
        response_class=Response,
        responses={200: {"content": {"application/jsonl": TEXT, "application/octet-stream": BINARY}}},
    )
    async def file_content(file_id: str):
        f = await run(store.get_file, file_id)
        media = "application/jsonl" if f.purpose == "fine-tune" else "application/octet-stream"
        return Response(await anyio.Path(f.path).read_bytes(), media_type=media)

    @router.delete("/v1/files/{file_id}", dependencies=[client], responses={200: {"model": FileDeleted}})
    async def delete_file(file_id: str):
        f = await run(jobs.delete_upload, store, file_id)
        return {"id": f.id, "object": "file", "deleted": True}

    @router.post("/v1/fine_tuning/jobs", dependencies=[client], responses={200: {"model": FineTuningJob}})
    async def create_fine_tuning(request: Request):
        parsed = jobs.parse_fine_tuning(await _json_body(request))
        return openai_job_view(store, await owned_job(request, jobs.submit_fine_tuning_job, store, parsed))

    @router.get("/v1/fine_tuning/jobs", dependencies=[client], responses={200: {"model": FineTuningJobList}})
    async def list_fine_tuning(after: str | None = None, limit: int = Query(20, ge=1, le=MAX_LIMIT)):
        found = await run(store.list, kind="fine_tuning", after=after, limit=limit + 1)
        return {
            "object": "list",
            "data": [openai_job_view(store, j) for j in found[:limit]],
            "has_more": len(found) > limit,
        }

    async def fine_tuning_job(job_id: str) -> Job:
        job = await run(store.get, job_id)
        if job.kind != "fine_tuning":
            raise ScalpelError(
                f"{job_id} is not a fine-tuning job; see /api/training/jobs/{job_id}",
                param="fine_tuning_job_id",
                code="job_not_found",
                status=404,
            )
        return job

    @router.get("/v1/fine_tuning/jobs/{job_id}", dependencies=[client], responses={200: {"model": FineTuningJob}})
    async def get_fine_tuning(job_id: str):
        return openai_job_view(store, await fine_tuning_job(job_id))

    @router.post(
        "/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=[client], responses={200: {"model": FineTuningJob}}
    )
    async def cancel_fine_tuning(job_id: str):
        await fine_tuning_job(job_id)
        return openai_job_view(store, await run(runner.cancel, job_id))

    @router.delete("/v1/fine_tuning/jobs/{job_id}", dependencies=[client], responses={200: {"model": JobDeleted}})
    async def delete_fine_tuning(job_id: str, ctx: ServingContext = Depends(context)):
        """Not in OpenAI's API (which keeps jobs): removes a finished job and its checkpoints, whose ids 404 after."""
        await fine_tuning_job(job_id)
        job = await delete_job(ctx, job_id)
        return {"id": job.id, "object": "fine_tuning.job", "deleted": True}

    def _cursor(after: str | None, prefix: str) -> int | None:
        if after is None:
            return None
        number = after.removeprefix(prefix)
        if not (number.isascii() and number.isdigit() and len(number) <= 18):  # SQLite's integers are 64-bit
            raise ScalpelError(f"after must be an id like {prefix}123", param="after")
        return int(number)

    @router.get(
        "/v1/fine_tuning/jobs/{job_id}/events",
        dependencies=[client],
        responses={200: {"model": FineTuningEventList}},
    )
    async def fine_tuning_events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=MAX_LIMIT)):
        await fine_tuning_job(job_id)
        before = _cursor(after, "ftevent-")
        found = await run(store.events, job_id, before=before, newest_first=True, limit=limit + 1)
        data = [
            {
                "id": f"ftevent-{e.seq}",
                "object": "fine_tuning.job.event",
                "created_at": int(e.created_at),
                "level": e.level,
                "message": e.message,
                "data": e.data or {},
                "type": "metrics" if e.type == "metrics" else "message",
            }
            for e in found[:limit]
        ]
        return {"object": "list", "data": data, "has_more": len(found) > limit}

    @router.get(
        "/v1/fine_tuning/jobs/{job_id}/checkpoints",
        dependencies=[client],
        responses={200: {"model": FineTuningCheckpointList}},
    )
    async def fine_tuning_checkpoints(
        job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=MAX_LIMIT)
    ):
        job = await fine_tuning_job(job_id)
        before = _cursor(after, "ftckpt-")
        found = await run(store.events, job_id, type="checkpoint", before=before, newest_first=True, limit=limit + 1)
        data = [
            {
                "id": f"ftckpt-{e.seq}",
                "object": "fine_tuning.job.checkpoint",
                "created_at": int(e.created_at),
                "fine_tuning_job_id": job.id,
                "step_number": e.data["step"],
                "fine_tuned_model_checkpoint": checkpoints.model_id(job.fine_tuned_model or "", e.data["step"]),
                "metrics": {"step": e.data["step"], "train_loss": e.data.get("train_loss")},
            }
            for e in found[:limit]
        ]
        return {
            "object": "list",
            "data": data,
            "has_more": len(found) > limit,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    return router


def served_jobs(runner: JobRunner, default_dataset: str | None = None) -> tuple[APIRouter, Lifespan]:
    """The job routes behind the app's own key checks, and a lifespan that runs `runner` while the app does."""
    router = training_router(runner.store, runner, default_dataset=default_dataset)

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(runner.stop)

    return router, lifespan
