"""The HTTP layer on a tiny base: Bearer keys, OpenAI-shaped errors, and adapters that never share a cache."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from scalpel import model_store
from scalpel.cli import main
from scalpel.demo import BackgroundServer
from scalpel.pipeline import train_and_publish
from serving.app import create_app
from serving.engine import Engine, GenerationParams
from training.config import parse_config


@pytest.fixture(scope="module")
def tiny_home(tiny_llama, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALPEL_HOME", str(home))
        assert main(["models", "add", "tiny", str(tiny_llama), "--outtype", "f32"]) == 0
        data = home / "d.json"
        data.write_text(json.dumps([{"instruction": "hi", "output": "FOR TWO"}] * 4))
        config = parse_config({"model_name": "tiny", "output_dir": "adapters/tiny_a",
                               "training_config": {"num_epochs": 2, "learning_rate": 5e-2, "save_steps": 1000}})
        train_and_publish(config, data, progress=False)
        yield home


@pytest.fixture(scope="module")
def engine(tiny_home):
    engine = Engine(model_store.get("tiny"))
    yield engine
    engine.close()


def test_keys_guard_every_route_but_health(engine):
    with BackgroundServer(create_app(engine, api_keys={"sekret"})) as server:
        root = server.base_url.removesuffix("/v1")
        assert httpx.get(f"{root}/health").status_code == 200
        denied = httpx.get(f"{server.base_url}/models")
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{root}/api/adapters", headers={"Authorization": "Bearer nope"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=server.base_url, api_key="sekret", max_retries=0)
        assert "tiny" in {m.id for m in client.models.list()}


def test_errors_are_openai_shaped(engine):
    with BackgroundServer(create_app(engine)) as server:
        bad_json = httpx.post(f"{server.base_url}/chat/completions", content=b"{not json",
                              headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 400 and set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
        n2 = httpx.post(f"{server.base_url}/chat/completions",
                        json={"model": "tiny", "n": 2, "messages": [{"role": "user", "content": "x"}]})
        assert n2.status_code == 400 and n2.json()["error"]["param"] == "n"
        too_long = httpx.post(f"{server.base_url}/chat/completions",
                              json={"model": "tiny", "messages": [{"role": "user", "content": "FOR TWO " * 3000}]})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
        missing = httpx.get(f"{server.base_url}/models/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_switching_adapters_never_reuses_the_cache(tiny_home):
    tokens = None
    params = GenerationParams(max_tokens=12, temperature=0)

    def answer(engine, adapters):
        return "".join(piece.text for piece in engine.generate(tokens, adapters, params))

    fresh = Engine(model_store.get("tiny"))
    tokens = fresh.chat_tokens([{"role": "user", "content": "hi"}])
    from scalpel import adapter_store
    ref = fresh.load(adapter_store.resolve("tiny_a"))
    base_alone = answer(fresh, ())
    fresh.close()
    fresh = Engine(model_store.get("tiny"))
    fresh.load(adapter_store.resolve("tiny_a"))
    adapter_alone = answer(fresh, ((ref, 1.0),))
    fresh.close()
    assert base_alone != adapter_alone, "the adapter must change the answer for this test to mean anything"

    shared = Engine(model_store.get("tiny"))
    shared.load(adapter_store.resolve("tiny_a"))
    for _ in range(2):
        assert answer(shared, ()) == base_alone
        assert answer(shared, ((ref, 1.0),)) == adapter_alone
    shared.close()
