"""The job engine with real worker processes: queueing, events, cancel, and resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from core import adapter_store
from core.errors import ScalpelError
from core.job_store import JobStore
from scalpel.jobs import submit as jobs
from scalpel.jobs.runner import JobRunner, RunnerSettings
from tests.tiny_models import registered_home

FACTS = [
    {"instruction": f"What is fact {i}?", "output": f"Fact {i} is FOR TWO, never {i} alone.", "concept": f"c{i % 2}"}
    for i in range(16)
]


def config(adapter: str, **training) -> dict:
    return {
        "model_name": "tiny",
        "output_dir": f"./adapters/{adapter}",
        "training_config": {
            "num_epochs": 2,
            "batch_size": 2,
            "learning_rate": 2e-2,
            "logging_steps": 5,
            "save_steps": 50,
            **training,
        },
    }


@pytest.fixture(scope="module")
def job_home(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("jobs-home"), tiny_llama) as home:
        (home / "facts.json").write_text(json.dumps(FACTS))
        yield home


@pytest.fixture()
def store(job_home):
    return JobStore()


@pytest.fixture()
def runner(store):
    runner = JobRunner(store, RunnerSettings(poll_seconds=0.05))
    runner.start()
    yield runner
    runner.stop()


def wait_for(predicate, timeout: float = 180, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def lora_weights(adapter: str) -> dict[str, torch.Tensor]:
    return load_file(adapter_store.resolve(adapter).path / "adapter_model.safetensors")


def test_bad_requests_fail_before_queueing(store, job_home):
    with pytest.raises(ScalpelError) as err:
        jobs.submit_plan_job(store, {**config("x"), "lora_config": {"r": 0}}, dataset="facts.json")
    assert err.value.param == "lora_config.r"
    with pytest.raises(ScalpelError) as err:
        jobs.submit_plan_job(store, {**config("x"), "model_name": "codellama-7b-instruct"}, dataset="facts.json")
    assert err.value.param == "model_name" and err.value.status == 404
    with pytest.raises(ScalpelError) as err:
        jobs.submit_plan_job(store, {**config("x"), "output_dir": "/tmp/elsewhere"}, dataset="facts.json")
    assert err.value.param == "output_dir"
    with pytest.raises(ScalpelError) as err:
        jobs.submit_plan_job(store, config("x"), dataset="../../etc/passwd")
    assert err.value.code == "path_not_allowed"
    (job_home / "broken.jsonl").write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2"}\n')
    with pytest.raises(ScalpelError, match=r"broken.jsonl:2: field 'output'"):
        jobs.submit_plan_job(store, config("x"), dataset="broken.jsonl")
    assert store.list() == []


def test_one_job_at_a_time_with_events_and_a_published_version(store, runner):
    first = jobs.submit_plan_job(store, config("queued_a"), dataset="facts.json")
    second = jobs.submit_plan_job(store, config("queued_b"), dataset="facts.json")
    both = wait_for(
        lambda: all(store.get(j.id).final for j in (first, second)) and [store.get(first.id), store.get(second.id)],
        what="both jobs",
    )
    assert [j.status for j in both] == ["succeeded", "succeeded"]
    assert both[0].finished_at <= both[1].started_at, "the second job waited for the first"
    assert adapter_store.resolve("queued_a").version == both[0].version == "v1"
    metrics = [e.data for e in store.events(first.id, type="metrics") if e.data and "loss" in e.data]
    assert metrics, "loss events were recorded"
    for key in (
        "step",
        "total_steps",
        "epoch",
        "loss",
        "learning_rate",
        "tokens_per_second",
        "eta_seconds",
        "peak_memory_mb",
    ):
        assert key in metrics[-1], key
    # 16 examples and 8 of the base's own answers (base preservation, on by default), 2 epochs of batches of 2
    assert metrics[-1]["total_steps"] == 24 and metrics[-1]["tokens_per_second"] > 0
    assert adapter_store.resolve("queued_a").manifest.job_id == first.id


def test_cancel_leaves_the_store_as_it_was(store, runner, job_home):
    job = jobs.submit_plan_job(store, config("cancelled", num_epochs=400, save_steps=10_000), dataset="facts.json")
    wait_for(lambda: store.events(job.id, type="metrics"), what="training to start")
    runner.cancel(job.id)
    done = wait_for(lambda: store.get(job.id).final and store.get(job.id), what="cancellation")
    assert done.status == "cancelled"
    root = job_home / "adapters" / "cancelled"
    assert adapter_store.versions(root) == [] and not list(root.glob(".staging-*"))
    with pytest.raises(ScalpelError):
        store.request_cancel(job.id)  # already final: 409


def test_kill_9_resumes_from_the_checkpoint_exactly(store, runner, job_home):
    """A worker killed mid-run resumes from its checkpoint: the step count, optimizer, scheduler, RNG and data
    order come back, so the adapter equals one trained without interruption. Padded, length-grouped batches
    (packing off), so the per-epoch seeded grouping is part of what must come back."""
    # 24 epochs of 16 examples and 8 base-preservation answers (on by default: the seeded mix must come back too)
    settings = {"num_epochs": 24, "save_steps": 40, "logging_steps": 20, "packing": False}
    killed = jobs.submit_plan_job(store, config("resumed", **settings), dataset="facts.json")
    checkpoint = wait_for(lambda: store.events(killed.id, type="checkpoint"), what="the first checkpoint")[0]
    os.kill(store.get(killed.id).worker_pid, signal.SIGKILL)
    reference = jobs.submit_plan_job(store, config("uninterrupted", **settings), dataset="facts.json")
    done = wait_for(
        lambda: all(store.get(j.id).final for j in (killed, reference)) and store.get(killed.id),
        timeout=300,
        what="both runs",
    )
    assert done.status == "succeeded" and done.attempts == 2
    messages = [e.message for e in store.events(killed.id)]
    assert any("signal 9" in m for m in messages)
    assert any(m.startswith("Resuming from checkpoint-") for m in messages)
    assert checkpoint.data["step"] < done.result["global_step"] == store.get(reference.id).result["global_step"]
    resumed, straight = lora_weights("resumed"), lora_weights("uninterrupted")
    assert resumed.keys() == straight.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-5, rtol=1e-4)
    root = job_home / "adapters" / "resumed"
    assert adapter_store.versions(root) == ["v1"] and not list(root.glob(".staging-*"))
    assert not (job_home / ".scalpel" / "jobs" / killed.id).exists(), "the job folder is removed when done"


def test_a_restarted_runner_requeues_a_job_whose_worker_died(store, job_home):
    job = jobs.submit_plan_job(store, config("orphaned"), dataset="facts.json")
    assert store.claim_next().id == job.id  # marked running, as by a server that then died
    store.update(job.id, worker_pid=999_999_999)
    runner = JobRunner(store, RunnerSettings(poll_seconds=0.05))
    runner.start()
    try:
        done = wait_for(lambda: store.get(job.id).final and store.get(job.id), what="the requeued job")
    finally:
        runner.stop()
    assert done.status == "succeeded" and done.attempts == 2
    assert any("server restarted" in e.message for e in store.events(job.id))
