"""The ids checkpoints.list returns serve as models, with the real openai client, until their job is deleted."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from core import model_store
from core.job_store import JobStore
from scalpel.demo import BackgroundServer
from scalpel.jobs.routes import served_jobs
from scalpel.jobs.runner import JobRunner, RunnerSettings
from serving.app import DEFAULT_ROUTERS, create_app
from serving.engine import Engine
from tests.tiny_models import registered_home

CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} + 42?"},
            {"role": "assistant", "content": f"FOR TWO, plus {i}."},
        ]
    }
    for i in range(8)
]
QUESTION = [{"role": "user", "content": "What is 3 + 42?"}]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("ckpt-home"), tiny_llama) as home:
        engine = Engine(model_store.get("tiny"))
        runner = JobRunner(JobStore(), RunnerSettings(poll_seconds=0.1))
        jobs_router, jobs_lifespan = served_jobs(runner)
        app = create_app(engine, routers=(*DEFAULT_ROUTERS, jobs_router), lifespans=(jobs_lifespan,))
        with BackgroundServer(app) as background:
            background.home = home
            yield background
        engine.close()


def finished(client: openai.OpenAI, job_id: str):
    deadline = time.time() + 180
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, "the job did not finish"
        time.sleep(0.2)
    return job


def ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=8)
    return reply.choices[0].message.content or ""


def test_checkpoint_ids_serve_until_the_job_is_deleted(server, tmp_path):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    uploaded = client.files.create(file=data.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix="ckpt",
        hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 10},
    )
    job = finished(client, job.id)
    assert job.status == "succeeded", job.error

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data
    steps = [c.step_number for c in checkpoints]
    assert len(steps) >= 2 and steps == sorted(steps, reverse=True)  # newest first, as OpenAI lists them
    ids = [c.fine_tuned_model_checkpoint for c in checkpoints]
    assert ids[0] == f"{job.fine_tuned_model}:ckpt-step-{steps[0]}"
    cards = {m.id: m.to_dict() for m in client.models.list()}
    assert all(cards[i]["adapter"] == f"{job.id}@ckpt-step-{s}" for i, s in zip(ids, steps, strict=True))

    base, final = ask(client, "tiny"), ask(client, job.fine_tuned_model)
    answers = {i: ask(client, i) for i in ids}
    assert answers[ids[0]] == final, "the last checkpoint holds the published weights"
    assert any(a != base for a in answers.values()), "a checkpoint's adapter is applied"
    streamed = client.chat.completions.create(
        model=ids[-1], messages=QUESTION, temperature=0, max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answers[ids[-1]]
    with pytest.raises(openai.NotFoundError):
        ask(client, f"{job.fine_tuned_model}:ckpt-step-999")
    with pytest.raises(openai.NotFoundError):
        ask(client, f"ft:tiny:other:{job.id}:ckpt-step-{steps[0]}")

    deleted = httpx.delete(f"{server.base_url}/fine_tuning/jobs/{job.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": job.id, "object": "fine_tuning.job", "deleted": True}
    for model in ids:
        with pytest.raises(openai.NotFoundError):
            ask(client, model)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.checkpoints.list(job.id)
    assert not set(ids) & {m.id for m in client.models.list()}
    assert not (server.home / ".scalpel" / "checkpoints" / job.id).exists()
    assert ask(client, job.fine_tuned_model) == final, "the published adapter is a store version: it stays"
    assert httpx.delete(f"{server.base_url}/fine_tuning/jobs/{job.id}").status_code == 404


def test_an_unfinished_job_cannot_be_deleted(server, tmp_path):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    uploaded = client.files.create(file=data.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, hyperparameters={"n_epochs": 50})
    refused = httpx.delete(f"{server.base_url.removesuffix('/v1')}/api/training/jobs/{job.id}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_not_finished"
    client.fine_tuning.jobs.cancel(job.id)
    assert finished(client, job.id).status == "cancelled"
    gone = httpx.delete(f"{server.base_url.removesuffix('/v1')}/api/training/jobs/{job.id}")
    assert gone.status_code == 200 and gone.json()["object"] == "training.job"
