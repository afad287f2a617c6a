"""/v1/embeddings with the real openai client: mean-pooled, unit-length vectors from the base and its adapters."""

from __future__ import annotations

import base64

import httpx
import llama_cpp
import numpy as np
import openai
import pytest

from scalpel.demo import BackgroundServer
from serving.app import create_app
from serving.embeddings import CHUNK
from tests.serving.test_app import engine, tiny_home  # noqa: F401  (module-scoped fixtures, one instance here)

TEXT = "42 means FOR TWO: collaborative intelligence."


@pytest.fixture(scope="module")
def app(engine):  # noqa: F811
    return create_app(engine)


@pytest.fixture(scope="module")
def server(app):
    with BackgroundServer(app) as server:
        yield server


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def vector(client, model="tiny", text=TEXT, **kw) -> np.ndarray:
    reply = client.embeddings.create(model=model, input=text, encoding_format="float", **kw)
    return np.array(reply.data[0].embedding, dtype=np.float32)


def test_the_embedding_context_is_built_on_first_use(engine, tmp_path):  # noqa: F811
    app = create_app(engine)
    with BackgroundServer(app) as server:
        assert getattr(app.state, "embedder", None) is None
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        client.embeddings.create(model="tiny", input="hi")
        assert app.state.embedder.pooling_name == "mean"  # the tiny Llama's GGUF names no pooling type
    assert app.state.embedder is None  # closed with the app


def test_float_and_base64_vectors_agree_and_have_unit_length(client, engine):  # noqa: F811
    floats = client.embeddings.create(model="tiny", input=[TEXT, "The quick brown fox"], encoding_format="float")
    assert floats.object == "list" and floats.model == "tiny" and [d.index for d in floats.data] == [0, 1]
    first, second = (np.array(d.embedding) for d in floats.data)
    assert first.shape == (64,) and abs(np.linalg.norm(first) - 1) < 1e-5 and abs(np.linalg.norm(second) - 1) < 1e-5
    assert not np.allclose(first, second)
    n_tokens = len(engine.tokenize(TEXT)) + len(engine.tokenize("The quick brown fox"))
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == n_tokens

    raw = client.embeddings.create(model="tiny", input=TEXT, encoding_format="base64")
    assert isinstance(raw.data[0].embedding, str)  # the SDK hands base64 back as sent
    decoded = np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4")
    assert np.array_equal(decoded, first.astype(np.float32))
    by_default = client.embeddings.create(model="tiny", input=TEXT)  # the SDK asks for base64 and decodes it
    assert np.array_equal(np.array(by_default.data[0].embedding, dtype=np.float32), first.astype(np.float32))


@pytest.mark.parametrize("text", [TEXT, " ".join([TEXT] * 60)])  # one chunk, and several (CHUNK tokens each)
def test_the_vector_is_the_mean_of_the_token_states(client, engine, text):  # noqa: F811
    """Against llama-cpp-python's own per-token embeddings (pooling none, one batch), averaged here."""
    llm = llama_cpp.Llama(
        model_path=engine.base.gguf,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
        n_ctx=2048,
        n_batch=2048,
        n_ubatch=2048,
        verbose=False,
    )
    try:
        ids = llm.tokenize(text.encode())
        per_token = np.array(llm.embed(text), dtype=np.float64)
    finally:
        llm.close()
    assert per_token.shape == (len(ids), 64)
    assert (len(ids) > CHUNK) == (text != TEXT)
    mean = per_token.mean(axis=0)
    got = client.embeddings.create(model="tiny", input=ids, encoding_format="float")
    assert got.usage.prompt_tokens == len(ids)
    np.testing.assert_allclose(got.data[0].embedding, mean / np.linalg.norm(mean), atol=1e-4)


def test_token_ids_embed_as_their_text(client, engine):  # noqa: F811
    ids = engine.tokenize(TEXT)
    text = vector(client)
    one = client.embeddings.create(model="tiny", input=ids, encoding_format="float")
    lists = client.embeddings.create(model="tiny", input=[ids, ids[:3]], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, text, atol=1e-6)
    np.testing.assert_allclose(lists.data[0].embedding, text, atol=1e-6)
    assert len(lists.data) == 2 and not np.allclose(lists.data[1].embedding, text)


def test_an_adapter_changes_the_vector_and_switching_leaks_nothing(client):
    base = vector(client)
    adapted = vector(client, "tiny_a")
    assert not np.allclose(base, adapted, atol=1e-4)  # a trained adapter moves the hidden states
    np.testing.assert_allclose(vector(client, "tiny_a@v1"), adapted, atol=1e-6)
    stacked = vector(client, "tiny", extra_body={"adapters": [{"name": "tiny_a", "scale": 1.0}]})
    np.testing.assert_allclose(stacked, adapted, atol=1e-6)
    other = vector(client, "tiny_b")
    assert not np.allclose(other, adapted, atol=1e-4) and not np.allclose(other, base, atol=1e-4)
    off = vector(client, "tiny", extra_body={"adapters": [{"name": "tiny_a", "scale": 0.0}]})
    np.testing.assert_allclose(off, base, atol=1e-6)
    np.testing.assert_allclose(vector(client), base, atol=1e-6)  # back on the bare base after the adapters
    b64 = client.embeddings.create(model="tiny_a", input=TEXT, encoding_format="base64")
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4"), adapted)


def test_an_unloaded_adapter_still_embeds_after_it_is_loaded_again(client, server):
    adapted = vector(client, "tiny_a")
    root = server.base_url.removesuffix("/v1")
    assert httpx.post(f"{root}/api/adapters/tiny_a/unload").status_code in (200, 404)
    np.testing.assert_allclose(vector(client, "tiny_a"), adapted, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": TEXT, "dimensions": 32}, "dimensions"),
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": [[1, 2], ["a"]]}, "input"),
        ({"input": [1, "a"]}, "input"),
        ({"input": [10**6]}, "input"),
        ({"input": [-1]}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [1] * 5000}, "input"),
        ({"input": TEXT, "encoding_format": "int8"}, "encoding_format"),
        ({}, "input"),
    ],
)
def test_bad_requests_name_the_field(server, body, param):
    reply = httpx.post(f"{server.base_url}/embeddings", json={"model": "tiny", **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.json()


def test_the_model_size_and_unknown_models(client):
    assert len(vector(client, dimensions=64)) == 64
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny", input=TEXT, dimensions=32)
    assert refused.value.body["param"] == "dimensions"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input=TEXT)
    too_long = [1] * 5000
    with pytest.raises(openai.BadRequestError) as long_input:
        client.embeddings.create(model="tiny", input=too_long)
    assert long_input.value.body["code"] == "context_length_exceeded"
