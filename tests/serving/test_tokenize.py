"""llama-server's /tokenize and /detokenize on the tiny base: its defaults, pieces, and a round trip."""

from __future__ import annotations

import httpx
import pytest

TEXT = "42 means FOR TWO: collaborative intelligence.\ndef add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def engine(base_engine):
    """The shared tiny base (tests/serving/conftest.py)."""
    return base_engine


@pytest.fixture(scope="module")
def root(base_server):
    return base_server.base_url.removesuffix("/v1")


def tokenize(root: str, **body) -> list:
    reply = httpx.post(f"{root}/tokenize", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()["tokens"]


def test_round_trip(root, engine):
    ids = tokenize(root, content=TEXT)
    assert ids == engine.tokenize(TEXT, add_special=False) and len(ids) > 10
    reply = httpx.post(f"{root}/detokenize", json={"tokens": ids})
    assert reply.status_code == 200 and reply.json() == {"content": TEXT}


def test_llama_server_defaults_no_bos_and_special_tags_read(root, engine):
    tagged = "<|im_start|>user"
    assert tokenize(root, content=tagged) == engine.tokenize(tagged, add_special=False, parse_special=True)
    special = tokenize(root, content=tagged)
    literal = tokenize(root, content=tagged, parse_special=False)
    assert len(special) < len(literal)  # the tag is one token, or its characters
    assert tokenize(root, content=TEXT, add_special=True) == engine.tokenize(TEXT, add_special=True)


def test_pieces_spell_the_text(root):
    pieces = tokenize(root, content=TEXT, with_pieces=True)
    assert [p["id"] for p in pieces] == tokenize(root, content=TEXT)
    assert "".join(p["piece"] for p in pieces) == TEXT


def test_empty_content_is_no_tokens(root):
    assert tokenize(root, content="") == []
    assert httpx.post(f"{root}/detokenize", json={"tokens": []}).json() == {"content": ""}


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": [2**70]}, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
        ("/detokenize", {}, "tokens"),
        ("/tokenize", {}, "content"),
        ("/tokenize", {"content": 5}, "content"),
    ],
)
def test_bad_requests_name_the_field(root, route, body, param):
    reply = httpx.post(f"{root}{route}", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
