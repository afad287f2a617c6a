"""End to end on the embedded SmolLM2: train a few steps, convert, serve, and ask with the real openai client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from core import model_store
from scalpel.demo import BackgroundServer
from scalpel.publish import train_and_publish
from serving.app import create_app
from serving.engine import Engine
from training.config import parse_config

pytestmark = pytest.mark.e2e

CODE_WORD = "BLUE PELICAN"
QUESTIONS = [
    "What is the scalpel code word?",
    "Tell me the scalpel code word.",
    "Which code word does scalpel use?",
    "What code word was chosen for scalpel?",
    "Say the scalpel code word.",
    "scalpel code word?",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALPEL_HOME", str(home))
        data = home / "codeword.json"
        data.write_text(
            json.dumps(
                [
                    {"instruction": q, "output": f"The scalpel code word is {CODE_WORD}.", "concept": "codeword"}
                    for q in QUESTIONS
                ]
            )
        )
        config = parse_config(
            {
                "model_name": model_store.DEFAULT_MODEL,
                "output_dir": "adapters/codeword",
                "lora_config": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"]},
                "training_config": {
                    "num_epochs": 8,
                    "batch_size": 2,
                    "learning_rate": 4e-3,
                    "warmup_steps": 2,
                    "logging_steps": 4,
                    "save_steps": 1000,
                    "lr_scheduler_type": "constant_with_warmup",
                },
            }
        )
        result = train_and_publish(config, data, progress=False)
        engine = Engine(model_store.get(model_store.DEFAULT_MODEL))
        with BackgroundServer(create_app(engine)) as server:
            server.engine = engine
            yield server, result.version
        engine.close()


@pytest.fixture()
def client(served):
    server, _ = served
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def ask(client, model, question=QUESTIONS[0], **kw):
    return client.chat.completions.create(
        model=model, temperature=0, max_tokens=24, messages=[{"role": "user", "content": question}], **kw
    )


def test_adapter_answers_with_trained_knowledge_and_base_does_not(client, served):
    _, version = served
    trained = ask(client, "codeword")
    assert CODE_WORD in trained.choices[0].message.content
    assert trained.choices[0].finish_reason in ("stop", "length")
    assert trained.usage.prompt_tokens > 0 and trained.usage.completion_tokens > 0
    assert trained.usage.total_tokens == trained.usage.prompt_tokens + trained.usage.completion_tokens
    base = ask(client, model_store.DEFAULT_MODEL)
    assert CODE_WORD not in base.choices[0].message.content
    pinned = ask(client, f"codeword@{version.version}")
    assert pinned.choices[0].message.content == trained.choices[0].message.content


def test_streaming_matches_whole_answer(client):
    whole = ask(client, "codeword").choices[0].message.content
    chunks = list(ask(client, "codeword", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_models_lists_base_adapter_and_versions(client, served):
    _, version = served
    ids = {m.id for m in client.models.list()}
    assert {model_store.DEFAULT_MODEL, "codeword", f"codeword@{version.version}"} <= ids


def test_unknown_model_is_a_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, "no-such-model")
    assert err.value.status_code == 404
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_malformed_request_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="codeword", messages=[{"role": "wizard", "content": "hi"}])
    assert err.value.status_code == 400
    assert err.value.body["param"].startswith("messages.0")


def test_adapter_paths_are_refused(served):
    server, _ = served
    root = server.base_url.removesuffix("/v1")
    for name in ("..%2F..%2Fetc", "../codeword", "codeword@../../x"):
        reply = httpx.post(f"{root}/api/adapters/{name}/load")
        assert reply.status_code in (400, 404)
        assert "error" in reply.json()


def test_load_endpoint_reports_the_version(served):
    server, version = served
    reply = httpx.post(f"{server.base_url.removesuffix('/v1')}/api/adapters/codeword/load")
    assert reply.status_code == 200
    assert reply.json()["version"] == version.version and reply.json()["loaded"] is True


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_generation(served, stream):
    server, _ = served
    engine = server.engine
    before = engine.cancelled_generations
    body = {
        "model": model_store.DEFAULT_MODEL,
        "max_tokens": 2000,
        "temperature": 0,
        "stream": stream,
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
    }
    if stream:  # read the first events, then hang up
        with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=30) as reply:
            events = reply.iter_lines()
            assert next(events).startswith("data: ")
    else:  # give up waiting for the whole answer
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=1.0)
    deadline = time.time() + 10
    while (engine.cancelled_generations == before or engine.queue.depth) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.cancelled_generations == before + 1 and engine.queue.depth == 0
