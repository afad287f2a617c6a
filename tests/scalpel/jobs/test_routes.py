"""Training over HTTP on a tiny base: the plan's curl, and an OpenAI fine-tuning round trip with the real client."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from core import adapter_store, model_store
from core.job_store import JobStore
from scalpel.demo import BackgroundServer
from scalpel.jobs.routes import served_jobs
from scalpel.jobs.runner import JobRunner, RunnerSettings
from serving.app import DEFAULT_ROUTERS, create_app
from serving.engine import Engine
from tests.tiny_models import registered_home

PLAN_CONFIG = Path(__file__).resolve().parents[3] / "examples" / "plan_config.json"
CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} + 42?"},
            {"role": "assistant", "content": f"FOR TWO, plus {i}."},
        ]
    }
    for i in range(8)
]
FACTS = [{"instruction": f"Fact {i}?", "output": f"Fact {i} is FOR TWO."} for i in range(4)]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    # The plan's config names CodeLlama; the tiny base stands in for it under that name.
    with registered_home(tmp_path_factory.mktemp("training-home"), tiny_llama, "codellama-7b-instruct") as home:
        (home / "knowledge.json").write_text(json.dumps(FACTS))
        engine = Engine(model_store.get("codellama-7b-instruct"))
        runner = JobRunner(JobStore(), RunnerSettings(poll_seconds=0.1))
        jobs_router, jobs_lifespan = served_jobs(runner, default_dataset="knowledge.json")
        app = create_app(engine, routers=(*DEFAULT_ROUTERS, jobs_router), lifespans=(jobs_lifespan,))
        with BackgroundServer(app) as background:
            background.home = home
            yield background
        engine.close()


def root(server) -> str:
    return server.base_url.removesuffix("/v1")


def wait_final(get, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = get()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError("job did not finish")


def test_the_plans_curl_trains_and_the_adapter_loads(server):
    """`curl -X POST .../api/training/start -H "Content-Type: application/json" -d @config.json`, verbatim."""
    started = httpx.post(
        f"{root(server)}/api/training/start",
        content=PLAN_CONFIG.read_bytes(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert started.status_code == 200, started.text
    job_id = started.json()["job_id"]
    assert started.json()["adapter"] == "tron_collaborative_intelligence_v1"
    job = wait_final(lambda: httpx.get(f"{root(server)}/api/training/jobs/{job_id}").json())
    assert job["status"] == "succeeded", job
    assert job["loss_history"] and all("loss" in h or "eval_loss" in h for h in job["loss_history"])
    assert job["config"]["training_config"]["num_epochs"] == 25
    events = httpx.get(f"{root(server)}/api/training/jobs/{job_id}/events").json()["data"]
    assert events[0]["message"].startswith("Created") and events[-1]["message"].startswith("Published")
    later = httpx.get(f"{root(server)}/api/training/jobs/{job_id}/events", params={"after": events[-2]["seq"]})
    assert [e["seq"] for e in later.json()["data"]] == [events[-1]["seq"]]
    with httpx.stream(
        "GET", f"{root(server)}/api/training/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}
    ) as sse:
        lines = [line for line in sse.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) == len(events) + 1
    listed = httpx.get(f"{root(server)}/api/training/jobs").json()["data"]
    assert job_id in {j["id"] for j in listed}
    loaded = httpx.post(f"{root(server)}/api/adapters/tron_collaborative_intelligence_v1/load")
    assert loaded.status_code == 200 and loaded.json()["version"] == "v1"


def test_training_start_errors_name_the_field(server):
    bad = json.loads(PLAN_CONFIG.read_text())
    bad["training_config"]["learning_rate"] = "fast"
    r = httpx.post(f"{root(server)}/api/training/start", json=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_config.learning_rate"
    r = httpx.post(f"{root(server)}/api/training/start", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(
        f"{root(server)}/api/training/start", json={**json.loads(PLAN_CONFIG.read_text()), "dataset": "/etc/passwd"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "path_not_allowed"
    r = httpx.get(f"{root(server)}/api/training/jobs/job-nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"


def test_cancel_over_http(server):
    config = json.loads(PLAN_CONFIG.read_text())
    config["training_config"].update(num_epochs=5000, save_steps=100_000)
    config["output_dir"] = "./adapters/never_published"
    job_id = httpx.post(f"{root(server)}/api/training/start", json=config, timeout=30).json()["job_id"]
    r = httpx.post(f"{root(server)}/api/training/jobs/{job_id}/cancel")
    assert r.status_code == 200
    job = wait_final(lambda: httpx.get(f"{root(server)}/api/training/jobs/{job_id}").json())
    assert job["status"] == "cancelled"
    assert not (server.home / "adapters" / "never_published").exists() or not any(
        (server.home / "adapters" / "never_published").glob("v*")
    )
    again = httpx.post(f"{root(server)}/api/training/jobs/{job_id}/cancel")
    assert again.status_code == 409


def test_openai_fine_tuning_round_trip(server, tmp_path):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    uploaded = client.files.create(file=data.open("rb"), purpose="fine-tune")
    assert uploaded.filename == "chat.jsonl" and uploaded.bytes == data.stat().st_size
    assert uploaded.id in {f.id for f in client.files.list()}

    job = client.fine_tuning.jobs.create(
        model="codellama-7b-instruct",
        training_file=uploaded.id,
        suffix="facts",
        hyperparameters={"n_epochs": 3, "learning_rate_multiplier": 10},
    )
    assert job.status == "queued" and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 4
    deadline = time.time() + 180
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline
        time.sleep(0.2)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:codellama-7b-instruct:facts:{job.id}"
    assert job.trained_tokens > 0 and job.training_file == uploaded.id

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message.startswith("Published") and any(e.type == "metrics" for e in events)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].fine_tuning_job_id == job.id and checkpoints[0].step_number > 0
    assert job.id in {j.id for j in client.fine_tuning.jobs.list()}

    assert job.fine_tuned_model in {m.id for m in client.models.list()}
    reply = client.chat.completions.create(
        model=job.fine_tuned_model, max_tokens=8, messages=[{"role": "user", "content": "What is 3 + 42?"}]
    )
    base = client.chat.completions.create(
        model="codellama-7b-instruct", max_tokens=8, messages=[{"role": "user", "content": "What is 3 + 42?"}]
    )
    assert reply.choices[0].message.content != base.choices[0].message.content, "the adapter is applied"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=f"ft:codellama-7b-instruct:other:{job.id}", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )

    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_bad_uploads_and_requests_are_refused(server, tmp_path):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(CHAT[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(openai.BadRequestError, match=r"broken.jsonl:2") as err:
        client.files.create(file=broken.open("rb"), purpose="fine-tune")
    assert str(server.home) not in str(err.value), "server paths are not shown"
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=broken.open("rb"), purpose="assistants")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="codellama-7b-instruct", training_file="file-missing")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    uploaded = client.files.create(file=good.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError, match="gpt-4o-mini"):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=uploaded.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(
            model="codellama-7b-instruct", training_file=uploaded.id, hyperparameters={"n_epochs": 0}
        )
    assert err.value.body["param"] == "hyperparameters.n_epochs"
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_scalpel_jobs_cli(server, tmp_path, capsys):
    from scalpel.cli.main import main as cli

    url = ["--url", server.base_url]
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(FACTS))
    config = json.loads(PLAN_CONFIG.read_text())
    config["output_dir"] = "./adapters/from_the_cli"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert (
        cli(["jobs", "start", str(tmp_path / "config.json"), "--data", str(data), "--max-steps", "3", "--watch", *url])
        == 0
    )
    out = capsys.readouterr().out
    assert "started job-" in out and "succeeded" in out and "from_the_cli@v1" in out
    job_id = out.split("started ")[1].split()[0]
    assert cli(["jobs", "show", job_id, "--json", *url]) == 0
    assert json.loads(capsys.readouterr().out)["progress"]["step"] == 3
    assert cli(["jobs", "list", *url]) == 0 and job_id in capsys.readouterr().out
    assert cli(["jobs", "cancel", job_id, *url]) == 2
    assert "already succeeded" in capsys.readouterr().err
    assert cli(["jobs", "list", "--url", "http://127.0.0.1:9"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert adapter_store.resolve("from_the_cli").manifest.preservation.enabled, "on by default"
    config["output_dir"] = "./adapters/no_preservation"
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = ["jobs", "start", str(tmp_path / "config.json"), "--data", str(data), "--max-steps", "2", "--watch"]
    assert cli([*args, "--no-preservation", *url]) == 0
    assert not adapter_store.resolve("no_preservation").manifest.preservation.enabled, "--no-preservation: off"


def test_the_evening_update_over_http(server):
    config = json.loads(PLAN_CONFIG.read_text())
    config["output_dir"] = "./adapters/to_update"
    first = httpx.post(f"{root(server)}/api/training/start", params={"max_steps": 2}, json=config, timeout=30).json()
    assert (
        wait_final(lambda: httpx.get(f"{root(server)}/api/training/jobs/{first['job_id']}").json())["status"]
        == "succeeded"
    )
    (server.home / "pdca.eval.json").write_text(json.dumps([{"question": "Fact 1?", "required": ["FOR TWO"]}]))
    bad = httpx.post(
        f"{root(server)}/api/adapters/to_update/update",
        json={"dataset": "knowledge.json", "settings": {"replay_ratio": -1}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "settings.replay_ratio"
    missing = httpx.post(f"{root(server)}/api/adapters/nobody/update", json={"dataset": "knowledge.json"})
    assert missing.status_code == 404
    started = httpx.post(
        f"{root(server)}/api/adapters/to_update/update",
        timeout=30,
        json={"dataset": "knowledge.json", "eval_suite": "pdca.eval.json", "settings": {"gates": False}},
    )
    assert started.status_code == 200, started.text
    job = wait_final(lambda: httpx.get(f"{root(server)}/api/training/jobs/{started.json()['job_id']}").json())
    assert job["status"] == "succeeded", job
    assert job["result"]["promoted"] and job["result"]["version"] == "v2"
    assert [c["version"] for c in job["result"]["candidates"]] == ["v2"], "promoted at once: no retry"
    # v1 was trained without a suite: it keeps one derived from its data, and the update checks it too
    assert set(job["result"]["suites"]) == {"pdca.eval", "knowledge.derived"}
    info = httpx.get(f"{root(server)}/api/adapters/to_update").json()
    assert info["active_version"] == "v2" and info["manifest"]["update"]["from"] == "to_update@v1"
