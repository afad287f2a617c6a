"""The OpenAPI schema documents every operation's success: a 2xx response with a content schema."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import jsonschema_rs
import pytest

from core import adapter_store
from core.job_store import JobStore
from scalpel.demo import BackgroundServer
from scalpel.jobs.responses import DashboardState
from scalpel.jobs.routes import served_jobs, training_router
from scalpel.jobs.runner import JobRunner, RunnerSettings
from scalpel.ui.routes import ui_router
from serving.app import DEFAULT_ROUTERS, create_app
from tests.serving.test_app import engine, tiny_home  # noqa: F401  (module-scoped fixtures, one instance here)

FASTAPI_OWN = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


@pytest.fixture(scope="module")
def schema(engine):  # noqa: F811
    store = JobStore()
    app = create_app(engine, routers=(*DEFAULT_ROUTERS, training_router(store, JobRunner(store)), ui_router(store)))
    return app.openapi()


def operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in {"get", "put", "post", "delete", "patch", "head", "options"}:
                yield path, method, operation


def test_every_operation_documents_its_success_body(schema):
    found = list(operations(schema))
    assert len(found) >= 30
    missing = []
    for path, method, operation in found:
        successes = {s: r for s, r in operation["responses"].items() if s.startswith("2")}
        documented = [
            media
            for response in successes.values()
            for media, body in (response.get("content") or {}).items()
            if body.get("schema")  # {} says nothing: FastAPI's default for a route without a model
        ]
        if not documented:
            missing.append(f"{method.upper()} {path}")
    assert not missing, missing


def test_json_successes_name_a_model(schema):
    """Every JSON success is a component (an object with its fields), never a bare `{}` or string."""
    components = schema["components"]["schemas"]
    for path, method, operation in operations(schema):
        for status, response in operation["responses"].items():
            if not status.startswith("2") or "application/json" not in (response.get("content") or {}):
                continue
            ref = response["content"]["application/json"]["schema"].get("$ref", "")
            name = ref.removeprefix("#/components/schemas/")
            assert name in components, f"{method.upper()} {path}: {ref!r}"
            assert components[name].get("properties"), name


def test_streaming_routes_document_their_event_stream(schema):
    for path, method in [
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/responses", "post"),
        ("/api/training/jobs/{job_id}/events", "get"),
    ]:
        content = schema["paths"][path][method]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}, path
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert not FASTAPI_OWN & set(schema["paths"])


# ----- the documented success bodies are what the routes really send -----

CHAT = [
    {"messages": [{"role": "user", "content": f"What is {i} + 42?"}, {"role": "assistant", "content": "FOR TWO."}]}
    for i in range(4)
]


@pytest.fixture(scope="module")
def live(engine, schema):  # noqa: F811
    runner = JobRunner(JobStore(), RunnerSettings(poll_seconds=0.1))
    jobs_router, jobs_lifespan = served_jobs(runner)
    app = create_app(
        engine, routers=(*DEFAULT_ROUTERS, jobs_router, ui_router(runner.store)), lifespans=(jobs_lifespan,)
    )
    with BackgroundServer(app) as server:
        yield server.base_url.removesuffix("/v1"), app.openapi()


def sse_events(text: str) -> list[dict]:
    events = []
    for block in re.split(r"\r?\n\r?\n", text):
        lines = [line for line in re.split(r"\r?\n", block) if line and not line.startswith(":")]
        fields: dict = {}
        for line in lines:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = f"{fields[name]}\n{value}" if name == "data" and name in fields else value
        if "data" in fields:
            events.append({**fields, **({"retry": int(fields["retry"])} if "retry" in fields else {})})
    return events


class Checked:
    """Calls the live app and checks each 2xx answer against the schema the operation documents for it."""

    def __init__(self, root: str, doc: dict):
        self.root, self.doc = root, doc
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, method: str, path: str, template: str | None = None, **kwargs) -> httpx.Response:
        response = httpx.request(method, f"{self.root}{path}", timeout=120, **kwargs)
        assert response.is_success, (method, path, response.status_code, response.text[:300])
        template = template or path
        documented = self.doc["paths"][template][method.lower()]["responses"][str(response.status_code)]["content"]
        media = response.headers["content-type"].split(";")[0]
        assert media in documented, (method, template, media, list(documented))
        bodies: list[Any]
        if media == "text/event-stream":
            schema, bodies = documented[media]["itemSchema"], sse_events(response.text)
            assert bodies, (method, template)
        elif media == "application/json":
            schema, bodies = documented[media]["schema"], [response.json()]
        else:
            schema, bodies = documented[media]["schema"], [response.text]
        validator = jsonschema_rs.Draft202012Validator({**schema, "components": self.doc["components"]})
        for body in bodies:
            errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(body)]
            assert not errors, (method, template, errors[:5])
        self.seen.add((method.lower(), template))
        return response


def wait_final(call: Checked, job_id: str) -> dict:
    deadline = time.time() + 180
    while time.time() < deadline:
        job = call("GET", f"/api/training/jobs/{job_id}", "/api/training/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError("the job did not finish")


def test_every_success_body_matches_its_schema(live, tmp_path):
    root, doc = live
    call = Checked(root, doc)
    call("GET", "/health")
    call("GET", "/metrics")
    call("GET", "/v1/models")
    call("GET", "/v1/models/tiny_a", "/v1/models/{model_id}")
    chat = {"model": "tiny_a", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    call("POST", "/v1/chat/completions", json=chat)
    call("POST", "/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 2})
    call("POST", "/v1/chat/completions", json={**chat, "stream": True, "stream_options": {"include_usage": True}})
    text = {"model": "tiny", "max_tokens": 2, "prompt": "hi"}
    call("POST", "/v1/completions", json=text)
    call("POST", "/v1/completions", json={**text, "logprobs": 2})
    call("POST", "/v1/completions", json={**text, "stream": True})
    call("POST", "/v1/embeddings", json={"model": "tiny", "input": ["hi", "there"]})
    call("POST", "/v1/embeddings", json={"model": "tiny_a", "input": [1, 2], "encoding_format": "base64"})
    call("POST", "/tokenize", json={"content": "hi"})
    call("POST", "/tokenize", json={"content": "hi", "with_pieces": True})
    call("POST", "/detokenize", json={"tokens": [1, 2]})
    answer = {"model": "tiny", "input": "hi", "max_output_tokens": 2}
    response_id = call("POST", "/v1/responses", json=answer).json()["id"]
    call("POST", "/v1/responses", json={**answer, "stream": True, "include": ["message.output_text.logprobs"]})
    call("GET", f"/v1/responses/{response_id}", "/v1/responses/{response_id}")
    call("DELETE", f"/v1/responses/{response_id}", "/v1/responses/{response_id}")

    # OpenAI's files and fine-tuning, one real job to the end
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    upload = {"file": ("chat.jsonl", data.read_bytes())}
    file_id = call("POST", "/v1/files", files=upload, data={"purpose": "fine-tune"}).json()["id"]
    call("GET", "/v1/files")
    call("GET", f"/v1/files/{file_id}", "/v1/files/{file_id}")
    call("GET", f"/v1/files/{file_id}/content", "/v1/files/{file_id}/content")
    created = {"model": "tiny", "training_file": file_id, "suffix": "facts", "hyperparameters": {"n_epochs": 1}}
    ft = call("POST", "/v1/fine_tuning/jobs", json=created).json()["id"]
    assert wait_final(call, ft)["status"] == "succeeded"
    call("GET", "/v1/fine_tuning/jobs")
    call("GET", f"/v1/fine_tuning/jobs/{ft}", "/v1/fine_tuning/jobs/{job_id}")
    call("GET", f"/v1/fine_tuning/jobs/{ft}/events", "/v1/fine_tuning/jobs/{job_id}/events")
    call("GET", f"/v1/fine_tuning/jobs/{ft}/checkpoints", "/v1/fine_tuning/jobs/{job_id}/checkpoints")
    call("GET", f"/api/training/jobs/{ft}/events", "/api/training/jobs/{job_id}/events")
    call("GET", f"/api/training/jobs/{ft}/events?stream=true", "/api/training/jobs/{job_id}/events")

    # the plan's training routes: a second version of tiny_a, then the adapter routes on its two versions
    config = {"model_name": "tiny", "output_dir": "adapters/tiny_a", "training_config": {"num_epochs": 1}}
    job = call("POST", "/api/training/start?dataset=d.json", "/api/training/start", json=config).json()["job_id"]
    assert wait_final(call, job)["status"] == "succeeded"
    call("GET", "/api/training/jobs")
    waiting = call("POST", "/api/adapters/tiny_b/update", "/api/adapters/{name}/update", json={"dataset": "e.json"})
    call("POST", f"/api/training/jobs/{waiting.json()['id']}/cancel", "/api/training/jobs/{job_id}/cancel")
    queued = call("POST", "/v1/fine_tuning/jobs", json=created).json()["id"]
    call("POST", f"/v1/fine_tuning/jobs/{queued}/cancel", "/v1/fine_tuning/jobs/{job_id}/cancel")

    call("GET", "/api/adapters")
    call("GET", "/api/adapters/tiny_a", "/api/adapters/{name}")
    versions = call("GET", "/api/adapters/tiny_a", "/api/adapters/{name}").json()["versions"]
    assert len(versions) >= 2, versions
    old, new = versions[0], versions[-1]
    call("GET", f"/api/adapters/tiny_a/diff?a={old}&b={new}", "/api/adapters/{name}/diff")
    call("POST", "/api/adapters/tiny_a/load", "/api/adapters/{name}/load", json={"version": old})
    call("POST", "/api/adapters/tiny_a/unload", "/api/adapters/{name}/unload", json={"version": old})
    call("POST", "/api/adapters/tiny_a/promote", "/api/adapters/{name}/promote", json={"version": new})
    call("POST", "/api/adapters/tiny_a/rollback", "/api/adapters/{name}/rollback")
    live_now = call("GET", "/api/adapters/tiny_a", "/api/adapters/{name}").json()["active_version"]
    spare = next(v for v in versions if v != live_now)
    call("DELETE", f"/api/adapters/tiny_a/versions/{spare}", "/api/adapters/{name}/versions/{version}")
    # an adapter brought from elsewhere (a GGUF LoRA, uploaded), then the finished jobs deleted
    gguf = {"file": ("from-elsewhere.gguf", adapter_store.resolve("tiny_a").gguf.read_bytes())}
    adapter_file = call("POST", "/v1/files", files=gguf, data={"purpose": "user_data"}).json()["id"]
    call("GET", f"/v1/files/{adapter_file}/content", "/v1/files/{file_id}/content")
    call("POST", "/api/adapters/tiny_c/import", "/api/adapters/{name}/import", json={"file_id": adapter_file})
    call("DELETE", f"/v1/fine_tuning/jobs/{ft}", "/v1/fine_tuning/jobs/{job_id}")
    call("DELETE", f"/api/training/jobs/{job}", "/api/training/jobs/{job_id}")
    call("DELETE", f"/v1/files/{file_id}", "/v1/files/{file_id}")
    # The dashboard's JSON is left out of the schema (its router is include_in_schema=False): its model instead.
    state = DashboardState.model_validate(httpx.get(f"{root}/ui/api/state", timeout=60).raise_for_status().json())
    assert state.jobs_served and state.adapters and state.bases

    assert call.seen == set(operations_of(doc)), set(operations_of(doc)) - call.seen


def operations_of(doc: dict) -> set[tuple[str, str]]:
    return {(method, path) for path, method, _ in operations(doc)}
