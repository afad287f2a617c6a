"""Which adapter version a fleet request is routed by: read from the body's `model` and the live pointer,
and "" (any replica) for the base and for whatever the replica will refuse with the single server's error."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from core import adapter_store
from scalpel.cli.main import main
from serving.fleet_routing import Forwarded, routed_model, stored_version
from tests.tiny_models import registered_home


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    """The tiny base with one adapter, alpha, in two versions (v1 live)."""
    with registered_home(tmp_path_factory.mktemp("routing-home"), tiny_llama) as home:
        for seed, flags in ((0, []), (1, ["--no-promote"])):
            torch.manual_seed(seed)
            model = get_peft_model(
                LlamaForCausalLM.from_pretrained(tiny_llama),
                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False),
            )
            model.save_pretrained(home / f"lora-{seed}", safe_serialization=True)
            assert main(["adapters", "import", "alpha", str(home / f"lora-{seed}"), "--base", "tiny", *flags]) == 0
        yield home


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_an_adapter_routes_by_its_live_version(store):
    assert routed_model("POST", "/v1/chat/completions", b"", body(model="alpha"), "tiny") == "alpha@v1"
    assert routed_model("POST", "/v1/completions", b"", body(model="alpha@v2"), "tiny") == "alpha@v2"
    adapter_store.promote("alpha", "v2")
    try:
        assert routed_model("POST", "/v1/chat/completions", b"", body(model="alpha"), "tiny") == "alpha@v2"
    finally:
        adapter_store.promote("alpha", "v1")
    assert stored_version("alpha@v2") == adapter_store.resolve("alpha@v2")


def test_a_get_routes_by_its_model_query_parameter(store):
    assert routed_model("GET", "/health", b"model=alpha", b"", "tiny") == "alpha@v1"
    assert routed_model("GET", "/health", b"model=alpha%40v2&x=1", b"", "tiny") == "alpha@v2"
    assert routed_model("GET", "/health", b"", body(model="alpha"), "tiny") == ""  # a GET's body names nothing
    assert routed_model("GET", "/health", b"model=tiny", b"", "tiny") == ""
    assert routed_model("DELETE", "/api/adapters/alpha/versions/v2", b"model=alpha", b"", "tiny") == ""


def test_the_adapter_load_route_routes_by_the_version_it_loads(store):
    assert routed_model("POST", "/api/adapters/alpha/load", b"", b"", "tiny") == "alpha@v1"
    assert routed_model("POST", "/api/adapters/alpha/load", b"", body(version="v2", scale=0.5), "tiny") == "alpha@v2"


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("POST", body(model="tiny")),
        ("POST", body(model="tiny@base")),
        ("POST", body(model="nothing")),
        ("POST", body(model="alpha@v9")),
        ("POST", body(model="ft:tiny:x:nojob")),
        ("POST", body(model=["alpha"])),
        ("POST", body(messages=[])),
        ("POST", b"{not json"),
        ("POST", b"[1, 2]"),
        ("POST", b"\xff\xfe"),
        ("PUT", body(model="alpha")),
    ],
)
def test_the_base_and_refused_names_go_to_any_replica(store, method, raw):
    assert routed_model(method, "/v1/chat/completions", b"", raw, "tiny") == ""


def test_a_forwarded_request_is_an_asgi_scope():
    scope = Forwarded("POST", "/v1/models", b"/v1/models", b"a=1", [(b"host", b"x")], b"{}").scope()
    assert scope["type"] == "http" and scope["path"] == "/v1/models" and scope["query_string"] == b"a=1"
    assert scope["headers"] == [(b"host", b"x")] and scope["root_path"] == ""
