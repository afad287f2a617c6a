"""Regression tests for issue 24: inputs and damaged store entries that used to answer 500, and how they answer now."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient

from core import adapter_store, paths
from core.job_store import JobStore
from scalpel.demo import BackgroundServer
from scalpel.jobs.routes import training_router
from scalpel.jobs.runner import JobRunner
from serving.app import DEFAULT_ROUTERS, create_app
from tests.serving.test_app import engine, tiny_home  # noqa: F401  (module-scoped fixtures, one instance here)

ERROR_KEYS = {"message", "type", "param", "code"}


def openai_error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == ERROR_KEYS
    return error


@pytest.fixture(scope="module")
def jobs_app(engine):  # noqa: F811
    store = JobStore()
    router = training_router(store, JobRunner(store))  # never started: submitted jobs stay queued
    return create_app(engine, routers=(*DEFAULT_ROUTERS, router))


@pytest.fixture(scope="module")
def web(jobs_app):
    return TestClient(jobs_app, raise_server_exceptions=False)


@pytest.fixture()
def damaged(tiny_home):  # noqa: F811
    """A copy of tiny_a under another name, for a test to damage; removed afterwards."""
    root = paths.adapters_dir() / "dmg"
    shutil.copytree(paths.adapters_dir() / "tiny_a", root)
    getattr(adapter_store, "_reported", {}).pop("dmg", None)  # each test's damage is logged afresh
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("route", ["/api/training/jobs", "/v1/fine_tuning/jobs"])
def test_a_huge_limit_is_a_400_not_a_sqlite_overflow(web, route):
    error = openai_error(web.get(route, params={"limit": "99999999999999999999"}), 400)
    assert error["param"] == "limit"


def test_an_empty_prompt_in_a_list_is_refused(web):
    error = openai_error(web.post("/v1/completions", json={"model": "tiny", "prompt": [""]}), 400)
    assert error["param"] == "prompt"


@pytest.mark.parametrize("content", ["", "{not json", "[1]", '{"versionx": 1}', '{"version": "v99"}'])
def test_a_damaged_active_pointer_breaks_only_its_adapter(web, damaged, content, caplog):
    (damaged / "active.json").write_text(content)
    with caplog.at_level(logging.WARNING):
        models = web.get("/v1/models")
        assert models.status_code == 200
        ids = {m["id"] for m in models.json()["data"]}
        assert "tiny_a" in ids and "dmg" not in ids
        listing = web.get("/api/adapters")
    assert listing.status_code == 200
    by_name = {a["name"]: a for a in listing.json()["data"]}
    assert by_name["tiny_a"]["available"] is True
    assert by_name["dmg"]["available"] is False and "active.json" in by_name["dmg"]["problem"]
    assert any("dmg" in r.getMessage() for r in caplog.records)
    assert web.get("/v1/models/tiny_a").status_code == 200
    openai_error(web.get("/v1/models/dmg"), 404)
    unknown = web.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    openai_error(unknown, 404)
    chat = web.post("/v1/chat/completions", json={"model": "dmg", "messages": [{"role": "user", "content": "x"}]})
    error = openai_error(chat, 409)
    assert error["code"] == "adapter_damaged" and str(paths.home()) not in error["message"]


@pytest.mark.parametrize("content", ["", "[]", "{bad"])
def test_an_empty_manifest_is_reported_not_a_500(web, damaged, content):
    (damaged / "v1" / "manifest.json").write_text(content)
    for route in ("/api/adapters/dmg", "/api/adapters/dmg/diff?a=v1&b=v1"):
        error = openai_error(web.get(route), 409)
        assert "manifest.json" in error["message"] and str(paths.home()) not in error["message"]
    assert web.get("/api/adapters").status_code == 200


def test_an_adapter_whose_bytes_changed_is_refused(web, damaged):
    gguf = damaged / "v1" / "adapter.gguf"
    data = bytearray(gguf.read_bytes())
    data[-4096:] = b"\xff" * 4096  # tensor data at the end of the file: NaN
    gguf.write_bytes(bytes(data))
    load = web.post("/api/adapters/dmg/load")
    error = openai_error(load, 409)
    assert error["code"] == "adapter_damaged" and "sha256" in error["message"]
    listing = {a["name"]: a for a in web.get("/api/adapters").json()["data"]}
    assert listing["dmg"]["available"] is False and "adapter.gguf" in listing["dmg"]["problem"]
    assert "dmg@v1" not in web.get("/health").json()["loaded_adapters"]


def test_an_adapter_with_non_finite_logits_is_refused(engine, damaged):  # noqa: F811
    """Its hashes match (the manifest was rewritten to the damaged bytes), so only the probe can catch it."""
    from core.manifest import read_manifest, write_manifest
    from serving.engine import Engine

    gguf = damaged / "v1" / "adapter.gguf"
    data = bytearray(gguf.read_bytes())
    data[-4096:] = b"\xff" * 4096
    gguf.write_bytes(bytes(data))
    manifest = read_manifest(damaged / "v1" / "manifest.json")
    manifest.files.pop("adapter.gguf", None)
    write_manifest(damaged / "v1" / "manifest.json", manifest)
    with pytest.raises(Exception) as caught:
        engine.load(adapter_store.resolve("dmg"))
    assert getattr(caught.value, "code", None) == "adapter_not_finite"
    assert "dmg@v1" not in engine.loaded()
    assert isinstance(engine, Engine)


@pytest.mark.parametrize("bad", ["a\x00b.json", "x" * 300 + ".json", "d/" + "y" * 300])
def test_nul_bytes_and_long_names_in_paths_are_a_400(web, bad):
    config = {"model_name": "tiny", "output_dir": "adapters/fine", "training_config": {"num_epochs": 1}}
    as_query = web.post("/api/training/start", params={"dataset": bad}, json=config)
    assert openai_error(as_query, 400)["param"] == "dataset"
    in_body = web.post("/api/training/start", json={**config, "dataset": bad})
    assert openai_error(in_body, 400)["param"] == "dataset"
    out = web.post("/api/training/start", json={**config, "output_dir": f"adapters/{bad}", "dataset": "d.json"})
    assert openai_error(out, 400)["param"] == "output_dir"
    update = web.post("/api/adapters/tiny_a/update", json={"dataset": bad})
    assert openai_error(update, 400)["param"] == "dataset"


def test_the_connection_survives_a_refused_request(jobs_app):
    with BackgroundServer(jobs_app) as server, httpx.Client() as http:
        root = server.base_url.removesuffix("/v1")
        config = {"model_name": "tiny", "output_dir": "adapters/fine", "training_config": {"num_epochs": 1}}
        refused = http.post(f"{root}/api/training/start", params={"dataset": "a\x00b"}, json=config)
        assert openai_error(refused, 400)["param"] == "dataset"
        assert http.get(f"{root}/health").status_code == 200


def test_a_non_ascii_bearer_token_is_a_401(engine):  # noqa: F811
    web = TestClient(create_app(engine, api_keys={"sekret"}), raise_server_exceptions=False)
    for route in ("/v1/models", "/api/adapters"):
        reply = web.get(route, headers={"Authorization": "Bearer s\u00e9kret \u2603".encode()})
        assert openai_error(reply, 401)["type"] == "authentication_error"


@pytest.mark.parametrize("content", [b"\x00\xff\xfe binary", b"not json {", b"[1, 2]", b""])
def test_models_add_with_a_bad_config_json_names_the_file(home, tmp_path, content, capsys):
    from scalpel.cli.main import main

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(content)
    assert main(["models", "add", "broken", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and "Traceback" not in err


def test_an_unexpected_error_is_a_logged_and_counted_500(engine, caplog):  # noqa: F811
    boom = APIRouter()

    @boom.get("/boom")
    def explode():
        raise RuntimeError(f"secret detail in {paths.home()}")

    app = create_app(engine, routers=(*DEFAULT_ROUTERS, boom))
    with BackgroundServer(app) as server, httpx.Client() as http, caplog.at_level(logging.INFO):
        root = server.base_url.removesuffix("/v1")
        error = openai_error(http.get(f"{root}/boom"), 500)
        assert error["type"] == "server_error" and "secret" not in error["message"]
        assert http.get(f"{root}/health").status_code == 200  # same connection, still open
        metrics = http.get(f"{root}/metrics").text
    assert 'scalpel_requests_total{route="/boom",status="500"}' in metrics
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith('{"event"')]
    assert {"event": "request", "path": "/boom", "status": 500}.items() <= next(
        line for line in lines if line["path"] == "/boom"
    ).items()


def test_paths_in_messages_are_store_relative(web, tiny_home):  # noqa: F811
    config = {"model_name": "tiny", "output_dir": "/tmp/elsewhere/x", "training_config": {"num_epochs": 1}}
    replies = [
        web.post("/api/training/start", params={"dataset": "missing.json"}, json=config),
        web.post("/api/training/start", params={"dataset": "../../etc/passwd"}, json=config),
        web.post(
            "/api/training/start",
            params={"dataset": "d.json"},
            json={**config, "output_dir": "/tmp/elsewhere/x"},
        ),
    ]
    for reply in replies:
        assert reply.status_code in (400, 404), reply.text
        assert str(paths.home()) not in reply.text


def test_a_chunked_body_over_the_limit_is_a_413_everywhere(engine):  # noqa: F811
    app = create_app(engine, max_body_bytes=4096)
    with BackgroundServer(app) as server:

        def chunks():
            for _ in range(8):
                yield b'{"model": "tiny", "messages": [' + b" " * 1024

        for route in ("/chat/completions", "/completions"):
            reply = httpx.post(
                f"{server.base_url}{route}", content=chunks(), headers={"Content-Type": "application/json"}
            )
            assert openai_error(reply, 413)["code"] == "request_too_large"


def test_tokenizing_a_huge_prompt_does_not_block_health(engine):  # noqa: F811
    with BackgroundServer(create_app(engine)) as server:
        root = server.base_url.removesuffix("/v1")
        prompt = "FOR TWO never " * 270_000  # about 3.8 MB
        done = threading.Event()
        slowest = [0.0]

        def poll():
            with httpx.Client() as http:
                while not done.is_set():
                    begun = time.perf_counter()
                    assert http.get(f"{root}/health").status_code == 200
                    slowest[0] = max(slowest[0], time.perf_counter() - begun)
                    time.sleep(0.02)

        poller = threading.Thread(target=poll)
        begun = time.perf_counter()
        poller.start()
        try:
            reply = httpx.post(
                f"{server.base_url}/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1}, timeout=60
            )
        finally:
            done.set()
            poller.join()
        took = time.perf_counter() - begun
        assert openai_error(reply, 400)["code"] == "context_length_exceeded"
        assert slowest[0] < max(0.3, took / 3), (slowest[0], took)


def test_store_helpers_never_raise_on_damage(damaged):
    (damaged / "active.json").write_text("")
    problems = adapter_store.problems("dmg")
    assert problems and "active.json" in problems[0]
    assert "dmg" not in adapter_store.list_adapters()
    assert Path(paths.adapters_dir() / "tiny_a").is_dir() and "tiny_a" in adapter_store.list_adapters()


def test_a_broken_gguf_is_named_store_relative(web, damaged):
    from core.manifest import read_manifest, write_manifest

    manifest = read_manifest(damaged / "v1" / "manifest.json")
    manifest.files.pop("adapter.gguf")  # no recorded hash: the GGUF reader itself refuses the file
    write_manifest(damaged / "v1" / "manifest.json", manifest)
    gguf = damaged / "v1" / "adapter.gguf"
    gguf.write_bytes(gguf.read_bytes()[:300])
    reply = web.post("/api/adapters/dmg/load")
    error = openai_error(reply, 400)
    assert error["code"] == "invalid_gguf" and "adapters/dmg/v1/adapter.gguf" in error["message"]
    assert str(paths.home()) not in reply.text


def test_a_job_error_is_shown_without_server_paths(tiny_home):  # noqa: F811
    from scalpel.jobs.routes import shown_error

    raw = {"message": f"FileNotFoundError: {paths.home()}/adapters/x/v1/adapter.gguf", "code": "training_failed"}
    assert shown_error(raw) == {"message": "FileNotFoundError: adapters/x/v1/adapter.gguf", "code": "training_failed"}


@pytest.mark.parametrize("last_event_id", ["9" * 30, "\u00b2", "-1"])
def test_a_strange_last_event_id_resumes_from_the_start(web, tiny_home, last_event_id):  # noqa: F811
    config = {"model_name": "tiny", "output_dir": "adapters/resumed", "training_config": {"num_epochs": 1}}
    job = web.post("/api/training/start", params={"dataset": "d.json"}, json=config)
    assert job.status_code == 200, job.text
    job_id = job.json()["job_id"]
    assert web.post(f"/api/training/jobs/{job_id}/cancel").status_code == 200  # queued: final at once
    headers = {"Accept": "text/event-stream", "Last-Event-ID": last_event_id.encode()}
    stream = web.get(f"/api/training/jobs/{job_id}/events", headers=headers)
    assert stream.status_code == 200 and "Created" in stream.text and "[DONE]" in stream.text
