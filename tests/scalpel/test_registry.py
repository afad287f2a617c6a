"""The adapter registry: promote, roll back, diff and delete versions, from Python, the CLI and HTTP."""

from __future__ import annotations

import json

import httpx
import pytest

from core import adapter_store, model_store
from core.errors import ConflictError, NotFoundError
from scalpel.cli.main import main
from scalpel.demo import BackgroundServer
from scalpel.publish import train_and_publish
from serving.app import create_app
from serving.engine import Engine
from tests.tiny_models import registered_home
from training.config import parse_config

FACTS = [{"instruction": f"What is fact {i}?", "output": f"Fact {i} is FOR TWO."} for i in range(6)]


def config(lr: float) -> dict:
    return {
        "model_name": "tiny",
        "output_dir": "adapters/reg",
        "lora_config": {"r": 4, "lora_alpha": 8},
        "training_config": {"num_epochs": 2, "batch_size": 2, "learning_rate": lr, "save_steps": 1000},
    }


@pytest.fixture(scope="module")
def three_versions(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("registry"), tiny_llama) as home:
        data = home / "facts.json"
        data.write_text(json.dumps(FACTS))
        for lr in (1e-3, 2e-2, 5e-2):
            train_and_publish(parse_config(config(lr)), data, progress=False)
        yield home


@pytest.fixture()
def reg(three_versions):
    adapter_store.set_active(adapter_store.root_for_name("reg"), "v3", reason="test reset")
    return adapter_store.root_for_name("reg")


def test_promote_and_rollback_follow_the_history(reg):
    assert adapter_store.versions(reg) == ["v1", "v2", "v3"] and adapter_store.active_version(reg) == "v3"
    assert adapter_store.promote("reg", "v1") == "v3"
    assert adapter_store.rollback("reg") == ("v1", "v3")  # back to what was live before
    assert adapter_store.rollback("reg", "v2") == ("v3", "v2")
    reasons = [h["reason"] for h in adapter_store.activation_history(reg)[-3:]]
    assert reasons == ["promoted (was v3)", "rolled back from v1", "rolled back from v3"]
    with pytest.raises(ConflictError):
        adapter_store.rollback("reg", "v2")  # already live
    with pytest.raises(NotFoundError):
        adapter_store.promote("reg", "v9")


def test_delete_refuses_the_live_version_and_never_reuses_a_number(reg, three_versions):
    with pytest.raises(ConflictError, match="live"):
        adapter_store.delete_version("reg", "v3")
    assert (reg / "v3").is_dir()
    data = three_versions / "facts.json"
    train_and_publish(parse_config(config(1e-3)), data, progress=False)  # v4
    adapter_store.set_active(reg, "v3")
    adapter_store.delete_version("reg", "v4")
    assert adapter_store.versions(reg) == ["v1", "v2", "v3"] and not list(reg.glob(".deleted-*"))
    fifth = train_and_publish(parse_config(config(1e-3)), data, progress=False)
    assert fifth.version.version == "v4"  # the deleted number's folder is gone, so it is the next free one
    adapter_store.set_active(reg, "v3")
    adapter_store.delete_version("reg", "v4")


def test_diff_reports_config_and_weight_changes(reg, capsys):
    assert main(["adapters", "diff", "reg", "v1", "v3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["training_config.learning_rate"] == {"from": 1e-3, "to": 5e-2}
    assert result["datasets"] == {} and not result["base_changed"]
    assert result["weights"]["comparable"] and result["weights"]["mean_relative_change"] > 0.01
    assert main(["adapters", "diff", "reg", "v2", "v2"]) == 0
    assert "0.0% on average" in capsys.readouterr().out


def test_cli_lists_shows_promotes_and_rolls_back(reg, capsys):
    assert main(["adapters", "list"]) == 0
    assert "live v3" in capsys.readouterr().out
    assert main(["adapters", "promote", "reg", "v2"]) == 0
    assert "v3 -> v2" in capsys.readouterr().out
    assert main(["adapters", "show", "reg"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("reg@v2  (live)") and "promoted (was v3)" in shown
    assert main(["adapters", "rollback", "reg"]) == 0
    assert "v2 -> v3" in capsys.readouterr().out
    assert main(["adapters", "delete", "reg", "v3"]) == 2
    assert "live version" in capsys.readouterr().err


@pytest.fixture(scope="module")
def served(three_versions):
    """One server over the registry for the HTTP tests: (server, the adapter's admin URL)."""
    engine = Engine(model_store.get("tiny"))
    try:
        with BackgroundServer(create_app(engine)) as server:
            yield server, server.base_url.removesuffix("/v1") + "/api/adapters/reg"
    finally:
        engine.close()


def answer(server, question: str) -> str:
    """The live version's greedy answer, through the server."""
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        timeout=60,
        json={"model": "reg", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": question}]},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_http_routes_and_a_server_that_follows_promotions(reg, served):
    server, api = served
    on_v3 = answer(server, "What is fact 1?")
    r = httpx.post(f"{api}/promote", json={"version": "v1"})
    assert r.status_code == 200 and r.json()["active_version"] == "v1"
    assert r.json()["previous_version"] == "v3"
    on_v1 = answer(server, "What is fact 1?")
    assert on_v1 != on_v3, "the running server follows the promotion"
    r = httpx.post(f"{api}/rollback")
    assert r.status_code == 200 and r.json()["active_version"] == "v3"
    assert answer(server, "What is fact 1?") == on_v3, "a rollback restores the exact earlier answers"
    assert httpx.post(f"{api}/promote", json={"version": "latest"}).status_code == 400
    r = httpx.delete(f"{api}/versions/v3")
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_active"
    diff = httpx.get(f"{api}/diff", params={"a": "v1", "b": "v2"})
    assert diff.status_code == 200 and "training_config.learning_rate" in diff.json()["config"]


def test_promotions_during_traffic_never_serve_a_half_loaded_adapter(reg, served):
    """Requests racing promotions and rollbacks get exactly one version's answer, never an error or a mix."""
    import threading

    server, api = served
    known = {"v3": answer(server, "What is fact 2?")}
    httpx.post(f"{api}/promote", json={"version": "v1"})
    known["v1"] = answer(server, "What is fact 2?")
    assert known["v1"] != known["v3"]
    seen, failures, stop = [], [], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                seen.append(answer(server, "What is fact 2?"))
            except Exception as exc:  # any failure is a finding
                failures.append(repr(exc))

    clients = [threading.Thread(target=traffic) for _ in range(3)]
    for c in clients:
        c.start()
    for i in range(12):
        r = httpx.post(f"{api}/promote", json={"version": "v3" if i % 2 == 0 else "v1"})
        assert r.status_code == 200
    stop.set()
    for c in clients:
        c.join(timeout=60)
    assert not failures
    assert seen and set(seen) <= set(known.values())
