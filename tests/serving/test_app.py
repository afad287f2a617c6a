"""The HTTP layer on a tiny base: Bearer keys, OpenAI-shaped errors, and adapters that never share a cache."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from core import model_store
from scalpel.cli.main import main
from scalpel.demo import BackgroundServer
from scalpel.publish import train_and_publish
from serving.app import create_app
from serving.engine import Engine, GenerationParams
from tests.tiny_models import registered_home
from training.config import parse_config


@pytest.fixture(scope="module")
def tiny_home(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("home"), tiny_llama) as home:
        data = home / "d.json"
        data.write_text(json.dumps([{"instruction": "hi", "output": "FOR TWO"}] * 4))
        config = parse_config(
            {
                "model_name": "tiny",
                "output_dir": "adapters/tiny_a",
                "training_config": {"num_epochs": 2, "learning_rate": 5e-2, "save_steps": 1000},
            }
        )
        train_and_publish(config, data, progress=False)
        other = home / "e.json"
        other.write_text(json.dumps([{"instruction": "hi", "output": "never 2 1"}] * 4))
        train_and_publish(
            parse_config(
                {
                    "model_name": "tiny",
                    "output_dir": "adapters/tiny_b",
                    "training_config": {"num_epochs": 2, "learning_rate": 5e-2, "save_steps": 1000},
                }
            ),
            other,
            progress=False,
        )
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
        bad_json = httpx.post(
            f"{server.base_url}/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert bad_json.status_code == 400 and set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
        n0 = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": "tiny", "n": 0, "messages": [{"role": "user", "content": "x"}]},
        )
        assert n0.status_code == 400 and n0.json()["error"]["param"] == "n"
        too_long = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "FOR TWO " * 3000}]},
        )
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
        missing = httpx.get(f"{server.base_url}/models/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


FRESH_ANSWER = """
import json, sys
from core import adapter_store, model_store
from serving.engine import Engine, GenerationParams
from tests.tiny_models import registered_home
engine = Engine(model_store.get("tiny"))
adapters = tuple((engine.load(adapter_store.resolve(name)), 1.0) for name in sys.argv[1:])
tokens = engine.chat_tokens([{"role": "user", "content": "hi"}])
params = GenerationParams(max_tokens=12, temperature=0)
print(json.dumps("".join(p.text for p in engine.generate(tokens, adapters, params))))
"""


def test_switching_adapters_never_reuses_the_cache(tiny_home):
    """Alternate base, adapter and another adapter on one prompt: each answer equals a fresh process's."""
    import subprocess
    import sys
    from pathlib import Path

    from core import adapter_store

    def fresh(*names):
        out = subprocess.run(
            [sys.executable, "-c", FRESH_ANSWER, *names],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    expected = {(): fresh(), ("tiny_a",): fresh("tiny_a"), ("tiny_b",): fresh("tiny_b")}
    assert len(set(expected.values())) == 3, "the adapters must change the answer for this test to mean anything"

    shared = Engine(model_store.get("tiny"))
    try:
        tokens = shared.chat_tokens([{"role": "user", "content": "hi"}])
        refs = {name: shared.load(adapter_store.resolve(name)) for name in ("tiny_a", "tiny_b")}
        for _ in range(2):
            for names, answer in expected.items():
                adapters = tuple((refs[n], 1.0) for n in names)
                got = "".join(
                    p.text for p in shared.generate(tokens, adapters, GenerationParams(max_tokens=12, temperature=0))
                )
                assert got == answer, names
    finally:
        shared.close()


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine)) as server:
        yield server


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_completions_whole_and_streamed(client):
    whole = client.completions.create(model="tiny", prompt="42 means", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens <= 8
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt="42 means", max_tokens=8, temperature=0, stream=True)
    )
    assert streamed == whole.choices[0].text


def test_max_tokens_gives_length_and_exact_usage(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 3


def test_logprobs_are_returned_per_token(client):
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-6  # greedy: the chosen token is the best


def test_json_object_response_format_parses(client):
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "json please"}],
        max_tokens=40,
        temperature=0.7,
        seed=1,
        response_format={"type": "json_object"},
    )
    text = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":
        json.loads(text)
    else:
        assert text.lstrip().startswith(("{", "["))


def test_stop_sequences_are_cut_and_never_streamed(client):
    whole = client.completions.create(model="tiny", prompt="FOR TWO", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    if len(text) > 4:
        stop = text[2:4]
        cut = client.completions.create(model="tiny", prompt="FOR TWO", max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model="tiny", prompt="FOR TWO", max_tokens=12, temperature=0, stop=[stop], stream=True
            )
        )
        assert streamed == cut.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    def ask():
        return (
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=1.0, seed=1234
            )
            .choices[0]
            .message.content
        )

    assert ask() == ask()


def test_async_client_and_concurrent_requests_queue_fairly(server):
    import asyncio

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        jobs = [
            client.chat.completions.create(
                model="tiny" if i % 2 else "tiny_a",
                max_tokens=6,
                temperature=0,
                messages=[{"role": "user", "content": "hi"}],
            )
            for i in range(6)
        ]
        return await asyncio.gather(*jobs)

    replies = asyncio.run(main())
    by_model = {}
    for r in replies:
        by_model.setdefault(r.model, set()).add(r.choices[0].message.content)
    assert all(len(answers) == 1 for answers in by_model.values())  # same model, same answer, whatever the order


def test_full_queue_answers_429(tiny_home):
    from serving.engine import EngineSettings

    engine = Engine(model_store.get("tiny"), EngineSettings(max_waiting=0, slots=1))
    try:
        with BackgroundServer(create_app(engine)) as server:
            held = engine.queue.reserve()  # someone is being served in the one slot
            try:
                reply = httpx.post(
                    f"{server.base_url}/chat/completions",
                    json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
                )
                assert reply.status_code == 429 and reply.json()["error"]["code"] == "queue_full"
                with pytest.raises(openai.RateLimitError):
                    openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0).chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": "x"}]
                    )
            finally:
                engine.queue.release(held)
            ok = httpx.post(
                f"{server.base_url}/chat/completions",
                json={"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
            )
            assert ok.status_code == 200
    finally:
        engine.close()


def test_body_limit_and_admin_routes_beyond_loopback(engine):
    with BackgroundServer(create_app(engine, host="0.0.0.0", max_body_bytes=2048)) as server:
        root = server.base_url.removesuffix("/v1")
        big = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]},
        )
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        assert httpx.get(f"{root}/api/adapters").status_code == 401  # no key configured, not loopback
        assert httpx.get(f"{server.base_url}/models").status_code == 200  # client routes stay open without keys


def test_metrics_count_requests_tokens_and_queue(server, client):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    text = httpx.get(f"{server.base_url.removesuffix('/v1')}/metrics").text
    assert 'scalpel_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'scalpel_tokens_total{kind="completion"}' in text
    for name in (
        "scalpel_queue_depth",
        "scalpel_loaded_adapters",
        "scalpel_adapter_switches",
        "scalpel_request_seconds_bucket",
        "process_resident_memory_bytes",
    ):
        assert name in text


def test_adapter_routes(server, client, tiny_home):
    root = server.base_url.removesuffix("/v1")
    listed = {a["name"]: a for a in httpx.get(f"{root}/api/adapters").json()["data"]}
    assert {"tiny_a", "tiny_b"} <= set(listed) and listed["tiny_a"]["versions"] == ["v1"]
    info = httpx.get(f"{root}/api/adapters/tiny_a").json()
    assert info["active_version"] == "v1" and info["manifest"]["base"]["name"] == "tiny"
    assert httpx.get(f"{root}/api/adapters/nope").status_code == 404
    full = (
        client.chat.completions.create(
            model="tiny_a", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
        )
        .choices[0]
        .message.content
    )
    loaded = httpx.post(f"{root}/api/adapters/tiny_a/load", json={"scale": 0.0}).json()
    assert loaded["scale"] == 0.0
    off = (
        client.chat.completions.create(
            model="tiny_a", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
        )
        .choices[0]
        .message.content
    )
    base = (
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
        )
        .choices[0]
        .message.content
    )
    assert off == base != full  # scale 0 is the bare base
    stacked = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        extra_body={"adapters": [{"name": "tiny_a", "scale": 1.0}]},
    )
    assert stacked.choices[0].message.content == full
    httpx.post(f"{root}/api/adapters/tiny_a/load", json={"scale": 1.0})
    assert httpx.post(f"{root}/api/adapters/tiny_a/unload").json()["unloaded"] == ["tiny_a@v1"]
    assert httpx.post(f"{root}/api/adapters/tiny_a/unload").status_code == 404


def test_corrupt_or_foreign_adapter_is_refused_and_serving_goes_on(server, client, tiny_home):
    import shutil

    from core import adapter_store

    good = adapter_store.resolve("tiny_a")
    broken = tiny_home / "adapters" / "broken" / "v1"
    shutil.copytree(good.path, broken)
    (broken.parent / "active.json").write_text('{"version": "v1"}')
    (broken / "adapter.gguf").write_bytes(good.gguf.read_bytes()[:500])
    reply = httpx.post(f"{server.base_url.removesuffix('/v1')}/api/adapters/broken/load")
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "adapter_damaged"  # its sha256 changed
    from core.manifest import read_manifest, write_manifest

    manifest = read_manifest(broken / "manifest.json")  # without a recorded hash, the GGUF check still refuses it
    manifest.files.pop("adapter.gguf")
    write_manifest(broken / "manifest.json", manifest)
    reply = httpx.post(f"{server.base_url.removesuffix('/v1')}/api/adapters/broken/load")
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_gguf"
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_hot_load_and_unload_under_concurrent_requests(server, client):
    from concurrent.futures import ThreadPoolExecutor

    root = server.base_url.removesuffix("/v1")

    def ask(model):
        return (
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
            )
            .choices[0]
            .message.content
        )

    expected = {"tiny": ask("tiny"), "tiny_a": ask("tiny_a")}
    with ThreadPoolExecutor(4) as pool:
        asks = [pool.submit(lambda m=m: (m, ask(m))) for m in ["tiny", "tiny_a"] * 6]
        for _ in range(5):
            assert httpx.post(f"{root}/api/adapters/tiny_a/unload").status_code in (200, 404)
            assert httpx.post(f"{root}/api/adapters/tiny_a/load").status_code == 200
        for future in asks:
            model, answer = future.result()
            assert answer == expected[model]


def test_adapter_for_another_base_is_a_409(tiny_home, tiny_llama, tmp_path):
    from core import adapter_store
    from tests.tiny_models import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", seed=5)
    assert main(["models", "add", "tiny_other", str(other), "--outtype", "f32"]) == 0
    engine = Engine(model_store.get("tiny_other"))  # same shapes, different weights: only the fingerprint differs
    try:
        with BackgroundServer(create_app(engine)) as server:
            reply = httpx.post(
                f"{server.base_url}/chat/completions",
                json={"model": "tiny_a", "messages": [{"role": "user", "content": "x"}]},
            )
            assert reply.status_code == 409 and reply.json()["error"]["code"] == "base_mismatch"
            assert adapter_store.resolve("tiny_a")  # the store is untouched
    finally:
        engine.close()


def test_model_cards_for_base_adapters_and_versions(client):
    assert client.models.retrieve("tiny").owned_by == "scalpel"
    assert client.models.retrieve("tiny_a@v1").id == "tiny_a@v1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny_a@v9")


def test_keys_from_env_and_file(tiny_home, tmp_path, monkeypatch):
    from scalpel.serve import ServeSettings

    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("from-file\n\n")
    monkeypatch.setenv("SCALPEL_API_KEYS", '["from-env"]')
    monkeypatch.setenv("SCALPEL_API_KEY_FILE", str(keyfile))
    assert ServeSettings().keys() == {"from-env", "from-file"}


def test_shutting_down_answers_503(tiny_home):
    engine = Engine(model_store.get("tiny"))
    try:
        with BackgroundServer(create_app(engine)) as server:
            engine.queue.close()
            reply = httpx.post(
                f"{server.base_url}/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
            )
            assert reply.status_code == 503 and reply.json()["error"]["code"] == "shutting_down"
    finally:
        engine.close()


def test_nothing_a_client_sends_crashes_the_server(server):
    import random

    rng = random.Random(0)
    values = [
        None,
        0,
        -1,
        1e309,
        "",
        "x" * 300,
        [],
        {},
        [{"role": "user"}],
        {"role": "user", "content": 5},
        True,
        "tiny",
        "../../etc/passwd",
        "tiny_a@v0",
        [1, 2, 3],
    ]
    fields = [
        "model",
        "messages",
        "prompt",
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "seed",
        "n",
        "stream",
        "logprobs",
        "top_logprobs",
        "response_format",
        "adapters",
        "stream_options",
    ]
    for _ in range(60):
        body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(1, 6))}
        for route in ("/chat/completions", "/completions"):
            reply = httpx.post(
                f"{server.base_url}{route}",
                content=json.dumps(body),
                timeout=30,  # allows Infinity
                headers={"Content-Type": "application/json"},
            )
            assert reply.status_code < 500, (route, body, reply.text)
            if reply.status_code >= 400:
                assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.base_url.removesuffix('/v1')}/health").status_code == 200


def test_routers_are_mounted_by_the_caller(engine):
    """An app serves the routers it is given: the OpenAI router alone has no admin routes, and a bare app
    (no job routes, no runner) answers 404 on the training routes that `scalpel serve` mounts."""
    from fastapi.testclient import TestClient

    from serving import openai_routes

    only_openai = TestClient(create_app(engine, routers=(openai_routes.router,)))
    assert "tiny" in {m["id"] for m in only_openai.get("/v1/models").json()["data"]}
    assert only_openai.get("/api/adapters").status_code == 404
    assert only_openai.get("/health").status_code == 404
    bare = TestClient(create_app(engine))
    assert bare.get("/api/adapters").status_code == 200
    missing = bare.get("/api/training/jobs")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_serve_settings_take_their_defaults_from_the_stage():
    from scalpel.serve import ServeSettings
    from serving.settings import AppSettings, EngineSettings

    settings = ServeSettings(_env_file=None)
    assert settings.engine_settings() == EngineSettings()
    assert settings.app_settings() == AppSettings()
    assert ServeSettings(_env_file=None, threads=3, n_ctx=512).engine_settings().threads == 3
