"""Client keys and admin keys (issue 24): who may call which route, and the per-key limits on jobs and uploads."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from core.job_store import JobStore
from scalpel.jobs.routes import training_router
from scalpel.jobs.runner import JobRunner
from serving.app import DEFAULT_ROUTERS, create_app
from tests.serving.test_app import engine, tiny_home  # noqa: F401  (module-scoped fixtures, one instance here)

CONFIG = {"model_name": "tiny", "output_dir": "adapters/roles", "training_config": {"num_epochs": 1}}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
ADMIN_ROUTES = [
    ("get", "/api/adapters"),
    ("post", "/api/adapters/tiny_a/promote"),
    ("get", "/api/training/jobs"),
    ("post", "/api/training/start"),
    ("get", "/v1/files"),
    ("delete", "/v1/files/file-x"),
    ("get", "/v1/fine_tuning/jobs"),
    ("post", "/v1/fine_tuning/jobs"),
]


def app_with(engine, **settings):  # noqa: F811
    store = JobStore()
    return TestClient(
        create_app(engine, routers=(*DEFAULT_ROUTERS, training_router(store, JobRunner(store))), **settings),
        raise_server_exceptions=False,
    )


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_client_keys_infer_and_admin_keys_do_everything(engine):  # noqa: F811
    web = app_with(engine, api_keys={"c"}, admin_keys={"a"})
    for key in ("c", "a"):
        assert web.get("/v1/models", headers=bearer(key)).status_code == 200
        assert web.post("/v1/chat/completions", json=CHAT, headers=bearer(key)).status_code == 200
    for method, route in ADMIN_ROUTES:
        refused = getattr(web, method)(route, headers=bearer("c"))
        assert refused.status_code == 403, (route, refused.text)
        assert refused.json()["error"]["type"] == "permission_error"
        assert getattr(web, method)(route).status_code == 401
        assert getattr(web, method)(route, headers=bearer("a")).status_code not in (401, 403), route
    assert web.get("/api/adapters", headers=bearer("a")).status_code == 200


def test_beyond_loopback_without_an_admin_key_nothing_writes_or_trains(engine):  # noqa: F811
    open_server = app_with(engine, host="0.0.0.0")
    assert open_server.get("/v1/models").status_code == 200
    keyed = app_with(engine, host="0.0.0.0", api_keys={"c"})
    for method, route in ADMIN_ROUTES:
        assert getattr(open_server, method)(route).status_code == 401, route
        refused = getattr(keyed, method)(route, headers=bearer("c"))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required", route
    upload = open_server.post("/v1/files", files={"file": ("d.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert upload.status_code == 401


def test_on_loopback_one_client_key_is_the_local_operator(engine):  # noqa: F811
    web = app_with(engine, api_keys={"c"})
    assert web.get("/api/adapters", headers=bearer("c")).status_code == 200
    assert web.get("/api/adapters", headers=bearer("x")).status_code == 401


def test_key_file_lines_carry_their_role(tmp_path, monkeypatch):
    from scalpel.serve import ServeSettings

    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("# operators\nadmin:boss\nclient:app\nplain\n\n")
    monkeypatch.setenv("SCALPEL_ADMIN_KEYS", '["env-admin"]')
    settings = ServeSettings(_env_file=None, api_key_file=keyfile, api_keys={"flag"}).app_settings()
    assert settings.admin_keys == {"boss", "env-admin"} and settings.api_keys == {"app", "plain", "flag"}


def test_per_key_limits_on_queued_jobs_and_uploaded_bytes(engine, tiny_home):  # noqa: F811
    web = app_with(engine, admin_keys={"a", "b"}, max_queued_jobs_per_key=1, max_upload_bytes_per_key=2048)
    first = web.post("/api/training/start", params={"dataset": "d.json"}, json=CONFIG, headers=bearer("a"))
    assert first.status_code == 200, first.text
    second = web.post("/api/training/start", params={"dataset": "d.json"}, json=CONFIG, headers=bearer("a"))
    assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_jobs"
    other = web.post("/api/training/start", params={"dataset": "d.json"}, json=CONFIG, headers=bearer("b"))
    assert other.status_code == 200, other.text

    line = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y" * 40}]})
    content = ("\n".join([line] * 20) + "\n").encode()[:1500]
    content = content[: content.rfind(b"\n") + 1]

    def upload(key: str):
        return web.post(
            "/v1/files", files={"file": ("d.jsonl", content)}, data={"purpose": "fine-tune"}, headers=bearer(key)
        )

    kept = upload("a")
    assert kept.status_code == 200, kept.text
    over = upload("a")
    assert over.status_code == 429 and over.json()["error"]["code"] == "upload_quota_exceeded"
    assert upload("b").status_code == 200
    assert web.delete(f"/v1/files/{kept.json()['id']}", headers=bearer("a")).status_code == 200
    assert upload("a").status_code == 200


@pytest.mark.parametrize("role", ["client", "admin"])
def test_a_wrong_key_of_either_role_is_a_401(engine, role):  # noqa: F811
    web = app_with(engine, api_keys={"c"}, admin_keys={"a"})
    route = "/v1/models" if role == "client" else "/api/adapters"
    assert web.get(route, headers=bearer("a" * 40)).json()["error"]["code"] == "invalid_api_key"
