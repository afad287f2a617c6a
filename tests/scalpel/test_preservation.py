"""Base preservation from day one: the first version mixes the base's own answers into training as every update
does, unless it is turned off (`scalpel train --no-preservation`, a job's "preservation": false)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest

from core import adapter_store
from core.errors import ScalpelError
from core.job_store import JobStore
from scalpel import preservation
from scalpel.cli.main import main
from scalpel.jobs import submit as jobs
from scalpel.jobs import worker
from scalpel.publish import train_and_publish
from scalpel.update_settings import PreservationSettings, UpdateSettings
from tests.tiny_models import registered_home
from training.config import parse_config
from training.dataset import Example

FACTS = [
    {"instruction": f"What is fact {i}?", "output": f"Fact {i} is FOR TWO.", "concept": f"c{i % 3}"} for i in range(6)
]


def config(adapter: str, **training) -> dict:
    return {
        "model_name": "tiny",
        "output_dir": f"./adapters/{adapter}",
        "lora_config": {"r": 4, "lora_alpha": 8},
        "training_config": {"num_epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "save_steps": 1000, **training},
    }


@pytest.fixture(scope="module")
def tiny_home(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("preserve-home"), tiny_llama) as home:
        (home / "facts.json").write_text(json.dumps(FACTS))
        yield home


def test_the_first_version_preserves_the_base_by_default(tiny_home):
    result = train_and_publish(parse_config(config("day_one")), tiny_home / "facts.json", progress=False)
    manifest = result.version.manifest
    assert manifest.preservation is not None and manifest.preservation.enabled
    assert (manifest.preservation.examples, manifest.preservation.pool) == (3, 30), "0.5 per example, of 30"
    assert (manifest.preservation.loss, manifest.preservation.weight) == ("distill", 4.0)
    training = manifest.config["training_config"]
    assert training["distill_concepts"] == ["base_preservation"] and training["distill_weight"] == 4.0
    assert manifest.metrics.examples == 9 and manifest.metrics.concepts["base_preservation"] == 3
    kept = json.loads((result.version.path / "data" / "train.json").read_text())
    assert kept == FACTS, "the version keeps its own data: an update replays that, not the base's answers"
    assert manifest.to_json()["preservation"]["enabled"] is True, "written to manifest.json"


def test_no_preservation_trains_on_the_data_alone(tiny_home, capsys):
    path = tiny_home / "plain.json"
    path.write_text(json.dumps(config("plain")))
    assert main(["train", str(path), "--data", str(tiny_home / "facts.json"), "--no-preservation"]) == 0
    version = adapter_store.resolve("plain")
    manifest = version.manifest
    assert manifest.preservation is not None and not manifest.preservation.enabled
    assert manifest.preservation.examples == 0 and manifest.metrics.examples == len(FACTS)
    assert manifest.config["training_config"]["distill_concepts"] == []
    assert "Base preservation: off" in (version.path / "report.md").read_text()
    assert manifest.eval is not None and manifest.eval["base_regression"] is not None, "evaluated all the same"


def test_a_job_request_turns_preservation_off(tiny_home):
    store = JobStore()
    job = jobs.submit_plan_job(store, {**config("job_plain"), "preservation": False}, dataset="facts.json")
    assert not jobs.preservation_on(job) and "preservation" not in job.config, "beside the config, not in it"
    default = jobs.submit_plan_job(store, config("job_default"), dataset="facts.json")
    assert jobs.preservation_on(default)
    assert worker.run(job.id, store) == 0
    manifest = adapter_store.resolve("job_plain").manifest
    assert manifest.preservation is not None and not manifest.preservation.enabled
    assert manifest.metrics.examples == len(FACTS) and manifest.job_id == job.id
    with pytest.raises(ScalpelError) as err:
        jobs.submit_plan_job(store, {**config("x"), "preservation": "no"}, dataset="facts.json")
    assert err.value.param == "preservation"
    # OpenAI's fine-tuning API: a hyperparameter beside OpenAI's own, echoed in the job's hyperparameters.
    upload = jobs.store_upload(store, "facts.jsonl", _chat_lines().encode(), "fine-tune")
    off = jobs.parse_fine_tuning(
        {"model": "tiny", "training_file": upload.id, "hyperparameters": {"preservation": False}}
    )
    ft = jobs.submit_fine_tuning_job(store, off)
    assert ft.hyperparameters is not None and ft.hyperparameters["preservation"] is False
    assert not jobs.preservation_on(ft)
    on = jobs.submit_fine_tuning_job(store, jobs.parse_fine_tuning({"model": "tiny", "training_file": upload.id}))
    assert jobs.preservation_on(on)
    with pytest.raises(ScalpelError) as err:
        jobs.parse_fine_tuning({"model": "tiny", "training_file": upload.id, "hyperparameters": {"preservation": 3}})
    assert err.value.param == "hyperparameters.preservation"
    for queued in (default, ft, on):  # never run: a runner on this home must not find them
        store.request_cancel(queued.id)


def _examples(concept: str, n: int) -> list[Example]:
    return [
        Example(
            [{"role": "user", "content": f"{concept} {i}"}, {"role": "assistant", "content": "x"}], concept, f"d[{i}]"
        )
        for i in range(n)
    ]


def test_the_mix_and_the_config_follow_the_settings():
    """The first version's mix: a seeded sample of the pool, 0.5 per example, in one seeded order; the config
    distils the sample and keeps the concepts it already distilled."""
    own, pool = _examples("facts", 10), _examples(preservation.PRESERVATION_CONCEPT, 30)
    base_config = parse_config(config("x", distill_concepts=["style"]))
    mixed = preservation.with_preservation(base_config, own, pool, PreservationSettings())
    assert Counter(e.concept for e in mixed.examples) == {"facts": 10, "base_preservation": 5}
    assert mixed.examples[:10] != own, "shuffled together, not appended"
    assert mixed.config.training_config.distill_concepts == ["style", "base_preservation"]
    assert mixed.config.training_config.distill_weight == 4.0 and base_config.training_config.distill_weight == 1.0
    assert mixed.record == {"enabled": True, "examples": 5, "pool": 30, "ratio": 0.5, "loss": "distill", "weight": 4.0}
    again = preservation.with_preservation(base_config, own, pool, PreservationSettings())
    assert [e.messages for e in again.examples] == [e.messages for e in mixed.examples], "seeded"
    answers = preservation.with_preservation(base_config, own, pool, PreservationSettings(ratio=10, loss="answers"))
    assert len(answers.examples) == 40, "at most the whole pool"
    assert answers.config.training_config.distill_concepts == ["style"], "learned as answers: not distilled"
    assert preservation.described(preservation.record(None)).startswith("off")
    assert "distillation" in (preservation.described(mixed.record) or "")
    # The update draws from the same pool with the same rule, its settings mapped onto PreservationSettings.
    settings = UpdateSettings(preservation_ratio=0.2, preservation_loss="answers")
    assert settings.preservation() == PreservationSettings(ratio=0.2, loss="answers")
    assert len(preservation.sample(pool, 10, settings.preservation(), random.Random(0), scale=2.0)) == 4
    assert preservation.training_overrides(settings.preservation()) == {"distill_concepts": [], "distill_weight": 4.0}


def test_the_demo_shows_the_general_questions_side_by_side(tiny_home):
    """`scalpel demo`'s last part, through a real server and the openai client: each general question answered by
    the base and by the adapter, each marked right or wrong, then both scores."""
    from openai import OpenAI

    from core import model_store
    from scalpel import evaluate
    from scalpel.demo import BackgroundServer, general_side_by_side
    from serving.app import create_app
    from serving.engine import Engine

    train_and_publish(parse_config(config("shown")), tiny_home / "facts.json", progress=False)
    engine = Engine(model_store.get("tiny"))
    printed: list[str] = []
    try:
        with BackgroundServer(create_app(engine)) as server:
            client = OpenAI(base_url=server.base_url, api_key="not-needed")
            shown = general_side_by_side(client, ("tiny", "shown"), 100, log=printed.append)
    finally:
        engine.close()
    items = evaluate.general_questions()
    assert shown["total"] == len(items) == len(printed) - 1
    for item, answer, block in zip(items, shown["answers"], printed, strict=False):
        assert block.startswith(f"Q: {item.question}\nbase model - ")
        assert answer["base_right"] == item.passes(answer["base"]) and answer["right"] == item.passes(answer["adapter"])
        marks = ("right" if answer["base_right"] else "wrong", "right" if answer["right"] else "wrong")
        assert f"base model - {marks[0]}" in block and f"with the adapter - {marks[1]}" in block
    assert printed[-1].startswith(
        f"general questions with known answers: the base {shown['base']}/{len(items)}, "
        f"with the adapter {shown['adapter']}/{len(items)}"
    )
    cached = evaluate.base_answers(engine, items)
    assert [a["base"] for a in shown["answers"]] == cached, "the server answers as the evaluation's bare base did"


def test_the_plans_start_route_and_the_fine_tuning_api_take_the_switch(tiny_home):
    """Over HTTP: "preservation": false beside the plan's fields, and as a hyperparameter of OpenAI's job
    request through the real openai client; a bad value is a 400 naming the field."""
    import httpx
    from openai import OpenAI

    from core import model_store
    from scalpel.demo import BackgroundServer
    from scalpel.jobs.routes import served_jobs
    from scalpel.jobs.runner import JobRunner, RunnerSettings
    from serving.app import DEFAULT_ROUTERS, create_app
    from serving.engine import Engine

    engine = Engine(model_store.get("tiny"))
    runner = JobRunner(JobStore(), RunnerSettings(poll_seconds=0.1))
    jobs_router, jobs_lifespan = served_jobs(runner, default_dataset="facts.json")
    app = create_app(engine, routers=(*DEFAULT_ROUTERS, jobs_router), lifespans=(jobs_lifespan,))
    try:
        with BackgroundServer(app) as server:
            root = server.base_url.removesuffix("/v1")
            bad = httpx.post(f"{root}/api/training/start", json={**config("http_bad"), "preservation": "no"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "preservation"
            started = httpx.post(f"{root}/api/training/start", json={**config("http_plain"), "preservation": False})
            assert started.status_code == 200, started.text
            job_id = started.json()["job_id"]
            for _ in range(600):  # bounded: a tiny job takes seconds
                job = httpx.get(f"{root}/api/training/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.2)
            assert job["status"] == "succeeded", job
            manifest = adapter_store.resolve("http_plain").manifest
            assert manifest.preservation is not None and not manifest.preservation.enabled
            client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
            upload = client.files.create(file=("facts.jsonl", _chat_lines().encode()), purpose="fine-tune")
            created = client.fine_tuning.jobs.create(
                model="tiny",
                training_file=upload.id,
                hyperparameters={"preservation": False},  # not OpenAI's: scalpel's switch
            )
            assert created.hyperparameters.model_extra == {"preservation": False}
            client.fine_tuning.jobs.cancel(created.id)
    finally:
        engine.close()


def _chat_lines() -> str:
    return "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": f["instruction"]}, {"role": "assistant", "content": f["output"]}]}
        )
        + "\n"
        for f in FACTS
    )
