"""A tiny base registered without adapters, served by a real uvicorn server, for tests of the request fields."""

from __future__ import annotations

import openai
import pytest

from core import model_store
from scalpel.demo import BackgroundServer
from serving.app import create_app
from serving.engine import Engine
from tests.tiny_models import registered_home


@pytest.fixture(scope="module")
def tiny_base(tiny_llama, tmp_path_factory):
    """The tiny model registered as "tiny" in a home of its own (no adapters: nothing to train)."""
    with registered_home(tmp_path_factory.mktemp("base-home"), tiny_llama) as home:
        yield home


@pytest.fixture(scope="module")
def base_engine(tiny_base):
    engine = Engine(model_store.get("tiny"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def base_server(base_engine):
    with BackgroundServer(create_app(base_engine)) as server:
        yield server


@pytest.fixture()
def sdk(base_server):
    """The openai SDK's client against the tiny base's server."""
    return openai.OpenAI(base_url=base_server.base_url, api_key="unused", max_retries=0)
