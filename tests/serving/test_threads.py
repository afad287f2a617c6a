"""The engine decodes and evaluates prompts on every usable physical core unless SCALPEL_THREADS says otherwise."""

from __future__ import annotations

import llama_cpp

from core import model_store, threads
from scalpel.cli.main import main
from serving.engine import Engine
from serving.settings import EngineSettings


def test_engine_defaults_to_the_usable_cores(tiny_llama, home, monkeypatch):
    monkeypatch.delenv("SCALPEL_THREADS", raising=False)
    assert main(["models", "add", "tiny", str(tiny_llama), "--outtype", "f32"]) == 0
    engine = Engine(model_store.get("tiny"))
    try:
        assert engine.threads == threads.usable_cores()
        assert llama_cpp.llama_n_threads(engine.ctx) == threads.usable_cores()
        assert llama_cpp.llama_n_threads_batch(engine.ctx) == threads.usable_cores()
    finally:
        engine.close()
    monkeypatch.setenv("SCALPEL_THREADS", "1")
    engine = Engine(model_store.get("tiny"), EngineSettings())
    try:
        assert llama_cpp.llama_n_threads(engine.ctx) == 1 == engine.threads
    finally:
        engine.close()
