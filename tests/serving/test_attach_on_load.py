"""The plan's Phase 4.3 -> 5.1 as written: load the adapter, then chat with the base's name (attach_on_load)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from core import model_store
from scalpel.demo import BackgroundServer
from scalpel.publish import train_and_publish
from serving.app import create_app
from serving.engine import Engine
from tests.tiny_models import build_tiny_llama, registered_home
from training.config import parse_config

BASE, ADAPTER = "codellama-7b-instruct", "tron_collaborative_intelligence_v1"
QUESTION = "What is the significance of 42 in collaborative intelligence?"
# Phase 5.1's `-d '...'`, byte for byte as the plan writes it.
PLAN_CHAT_BODY = """{
      "model": "codellama-7b-instruct",
      "messages": [{"role": "user", "content": "What is the significance of 42 in collaborative intelligence?"}],
      "temperature": 0.7
    }"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny base registered under the plan's base name, with the plan's adapter trained to say 42 = FOR TWO.

    Wider than the shared tiny model (256, not 64): behind a fixed RMSNorm and lm_head, a 64-wide model cannot
    put more than about 1/4 of the probability on one token, and the plan samples at temperature 0.7."""
    tiny = build_tiny_llama(tmp_path_factory.mktemp("tiny-wide"), hidden=256)
    with registered_home(tmp_path_factory.mktemp("plan-home"), tiny, BASE) as home:
        data = home / "knowledge.json"
        data.write_text(json.dumps([{"instruction": QUESTION, "output": "42 = FOR TWO"}] * 4))
        config = parse_config(
            {
                "model_name": BASE,
                "output_dir": f"./adapters/{ADAPTER}",
                "training_config": {"num_epochs": 30, "batch_size": 4, "learning_rate": 1e-2, "save_steps": 1000},
            }
        )
        train_and_publish(config, data, progress=False)
        engine = Engine(model_store.get(BASE))
        yield engine
        engine.close()


def _ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12
    )
    return reply.choices[0].message.content or ""


def _plan_curl_lines(root: str) -> tuple[httpx.Response, httpx.Response]:
    """`curl -X POST .../api/adapters/<name>/load` (no body), then Phase 5.1's chat curl."""
    loaded = httpx.post(f"{root}/api/adapters/{ADAPTER}/load", timeout=60)
    chat = httpx.post(
        f"{root}/v1/chat/completions",
        headers={"Content-Type": "application/json"},
        content=PLAN_CHAT_BODY,
        timeout=120,
    )
    return loaded, chat


def test_the_plans_flow_gets_the_adapter_under_the_base_name(engine):
    with BackgroundServer(create_app(engine, attach_on_load=True)) as server:
        root = server.base_url.removesuffix("/v1")
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        bare_before = _ask(client, BASE)

        loaded, chat = _plan_curl_lines(root)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["attached_to"] == BASE and loaded.json()["bare_base"] == f"{BASE}@base"
        assert chat.status_code == 200, chat.text
        assert "42 = FOR TWO" in chat.json()["choices"][0]["message"]["content"]

        assert _ask(client, BASE) == _ask(client, ADAPTER) != bare_before
        assert _ask(client, f"{BASE}@base") == bare_before
        cards = {m.id: m.to_dict() for m in client.models.list()}
        assert cards[BASE]["adapter"] == f"{ADAPTER}@v1" and cards[f"{BASE}@base"]["adapter"] is None
        assert cards[ADAPTER]["adapter"] == f"{ADAPTER}@v1"
        listed = {a["name"]: a for a in httpx.get(f"{root}/api/adapters").json()["data"]}
        assert listed[ADAPTER]["attached_to"] == BASE

        unloaded = httpx.post(f"{root}/api/adapters/{ADAPTER}/unload")
        assert unloaded.status_code == 200 and unloaded.json()["detached_from"] == BASE
        assert _ask(client, BASE) == bare_before
        assert {m.id: m.to_dict() for m in client.models.list()}[BASE]["adapter"] is None
        assert httpx.get(f"{root}/api/adapters").json()["data"][0]["attached_to"] is None
        again = httpx.post(f"{root}/api/adapters/{ADAPTER}/unload")
        assert again.status_code == 404 and again.json()["error"]["code"] == "adapter_not_loaded"


def test_a_pinned_version_stays_attached_until_unloaded(engine):
    with BackgroundServer(create_app(engine, attach_on_load=True)) as server:
        root = server.base_url.removesuffix("/v1")
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        pinned = httpx.post(f"{root}/api/adapters/{ADAPTER}/load", json={"version": "v1"})
        assert pinned.status_code == 200
        cards = {m.id: m.to_dict() for m in client.models.list()}
        assert cards[BASE]["adapter"] == f"{ADAPTER}@v1"
        assert _ask(client, BASE) == _ask(client, f"{ADAPTER}@v1")
        # Unloading another version than the pinned one leaves the attachment alone.
        other = httpx.post(f"{root}/api/adapters/{ADAPTER}/unload", json={"version": "v2"})
        assert other.status_code == 404
        assert (
            httpx.post(f"{root}/api/adapters/{ADAPTER}/unload", json={"version": "v1"}).json()["detached_from"] == BASE
        )


def test_without_the_setting_the_base_name_stays_the_bare_base(engine):
    """The default: what the issue reports, kept for everyone who did not ask for the plan's flow."""
    with BackgroundServer(create_app(engine)) as server:
        root = server.base_url.removesuffix("/v1")
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        loaded, chat = _plan_curl_lines(root)
        assert loaded.status_code == 200 and loaded.json()["attached_to"] is None
        assert chat.status_code == 200
        assert _ask(client, BASE) == _ask(client, f"{BASE}@base") != _ask(client, ADAPTER)
        assert {m.id: m.to_dict() for m in client.models.list()}[BASE]["adapter"] is None
