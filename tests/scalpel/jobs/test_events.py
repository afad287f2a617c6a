"""A job's progress as the operator sees it: its event stream (SSE with ids and a retry hint), the ETA as
a time in the future, and the final loss in `scalpel jobs list/show`."""

from __future__ import annotations

import time
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.job_store import Job, JobStore
from scalpel.jobs.client import summary
from scalpel.jobs.routes import openai_job_view, training_router
from scalpel.jobs.runner import JobRunner
from serving.settings import AppSettings


def _store(tmp_path, status: str = "running") -> tuple[JobStore, Job]:
    store = JobStore(tmp_path / "jobs.db")
    job = Job(
        id="ftjob-1",
        kind="fine_tuning",
        status=status,
        model="tiny",
        adapter="a",
        config={"training_config": {"seed": 0}},
        training_file="d.json",
        created_at=time.time() - 3600,
    )
    store.create(job)
    store.add_event(job.id, "Step 5/10", type="metrics", data={"step": 5, "total_steps": 10, "eta_seconds": 120.0})
    return store, job


def test_the_estimated_finish_lies_ahead_for_a_job_that_queued(tmp_path):
    store, job = _store(tmp_path)  # created an hour ago, running now, 2 minutes to go
    finish = openai_job_view(store, store.get(job.id))["estimated_finish"]
    assert time.time() + 100 < finish < time.time() + 140


def test_the_event_stream_carries_ids_and_a_retry_hint(tmp_path):
    store, job = _store(tmp_path, status="succeeded")
    app = FastAPI()
    app.state.serving = SimpleNamespace(settings=AppSettings())  # what serving.auth reads: loopback, no keys
    app.include_router(training_router(store, JobRunner(store)))
    client = TestClient(app)
    with client.stream("GET", f"/api/training/jobs/{job.id}/events", headers={"Accept": "text/event-stream"}) as sse:
        lines = [line for line in sse.iter_lines() if line]
    assert any(line.startswith("retry:") for line in lines)
    ids = [int(line.removeprefix("id:").strip()) for line in lines if line.startswith("id:")]
    assert ids == sorted(ids) and len(ids) == len(store.events(job.id))
    assert lines[-1] == "data: [DONE]"
    last = ids[-2]  # a client that reconnects with Last-Event-ID gets only what came after it
    with client.stream(
        "GET",
        f"/api/training/jobs/{job.id}/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": str(last)},
    ) as again:
        resumed = [line for line in again.iter_lines() if line.startswith("id:")]
    assert [int(line.removeprefix("id:").strip()) for line in resumed] == [ids[-1]]


def test_a_finished_job_shows_its_final_loss():
    job = {
        "id": "job-1",
        "status": "succeeded",
        "adapter": "a",
        "version": "v1",
        "model": "tiny",
        "progress": {"step": 8, "total_steps": 8, "train_loss": 2.5},
        "result": {"final_loss": 2.1234},
    }
    assert "loss 2.1234" in summary(job)
    running = {**job, "status": "running", "result": None, "progress": {"step": 3, "total_steps": 8, "loss": 3.5}}
    assert "loss 3.5000" in summary(running)
