"""The engine in its own process: served like the in-process engine, and a kill -9 of it is survived."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from core import adapter_store, model_store
from scalpel.demo import BackgroundServer
from scalpel.publish import train_and_publish
from serving.app import create_app
from serving.engine import Engine, GenerationParams
from serving.engine_process import EngineProcess
from serving.settings import EngineSettings
from tests.tiny_models import registered_home
from training.config import parse_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adapter_home(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("process-home"), tiny_llama) as home:
        data = home / "a.json"
        data.write_text(json.dumps([{"instruction": "hi", "output": "FOR TWO"}] * 4))
        config = {
            "model_name": "tiny",
            "output_dir": "adapters/tiny_a",
            "training_config": {"num_epochs": 2, "learning_rate": 5e-2, "save_steps": 1000},
        }
        train_and_publish(parse_config(config), data, progress=False)
        yield home


@pytest.fixture(scope="module")
def engine(adapter_home):
    engine = EngineProcess(model_store.get("tiny"), EngineSettings(slots=2))
    yield engine
    engine.close()


def test_answers_equal_the_in_process_engine(engine):
    local = Engine(model_store.get("tiny"), EngineSettings(slots=2))
    try:
        tokens = engine.chat_tokens([{"role": "user", "content": "hi"}])
        assert tokens == local.chat_tokens([{"role": "user", "content": "hi"}])
        params = GenerationParams(max_tokens=12, temperature=0, logprobs=True, top_logprobs=1)
        for name in (None, "tiny_a"):
            version = [adapter_store.resolve(name)] if name else []
            remote = tuple((engine.load(v), 1.0) for v in version)
            here = tuple((local.load(v), 1.0) for v in version)
            far, near = list(engine.generate(tokens, remote, params)), list(local.generate(tokens, here, params))
            assert [p.text for p in far] == [p.text for p in near]
            assert far[-1].usage == near[-1].usage and far[-1].logprobs == near[-1].logprobs
        scores = engine.score(tokens, ())
        assert (scores.choices == local.score(tokens, ()).choices).all()
        assert engine.loaded() == ["tiny_a@v1"]
    finally:
        local.close()


def test_errors_cross_the_process_boundary(engine):
    tokens = engine.text_tokens("hello")
    with pytest.raises(Exception) as bad:
        engine.generate(tokens, (), GenerationParams(grammar="root ::= ("))
    assert getattr(bad.value, "param", None) == "grammar" and bad.value.status == 400
    with pytest.raises(Exception) as missing:
        list(engine.generate(tokens, (("nobody@v1", 1.0),), GenerationParams(max_tokens=2)))
    assert getattr(missing.value, "code", None) == "adapter_not_loaded"


def never_ending(engine) -> dict[str, int]:
    """OpenAI's logit_bias that bans every end-of-generation token: the answer runs until it is stopped."""
    return {str(t): -100 for t in range(engine.tokenizer.n_vocab) if engine.tokenizer.is_eog(t)}


def test_kill_9_mid_generation_ends_it_with_a_503(engine):
    tokens = engine.text_tokens("hello")
    bias = tuple((int(t), -100.0) for t in never_ending(engine))
    stream = engine.generate(tokens, (), GenerationParams(max_tokens=4000, logit_bias=bias))
    next(stream)
    os.kill(engine.process.pid, signal.SIGKILL)
    with pytest.raises(Exception) as cut:
        list(stream)
    assert getattr(cut.value, "status", None) == 503 and cut.value.code == "engine_restarting"
    assert engine.wait_ready(30)
    assert "".join(p.text for p in engine.generate(tokens, (), GenerationParams(max_tokens=3)))


def test_kill_9_mid_stream_then_recovery(engine):
    """The front end stays up; the stream that was running ends with a 503-shaped error; the engine comes back
    with its adapters, and new requests succeed within 30 s."""
    engine.load(adapter_store.resolve("tiny_a"))
    with BackgroundServer(create_app(engine)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        root = server.base_url.removesuffix("/v1")
        stream = client.chat.completions.create(
            model="tiny_a",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4000,
            temperature=1.0,
            stream=True,
            logit_bias=never_ending(engine),
        )
        chunks = iter(stream)
        next(chunks)
        killed = engine.process.pid
        os.kill(killed, signal.SIGKILL)
        with pytest.raises(openai.APIError) as cut:
            for _ in chunks:
                pass
        assert "engine stopped" in str(cut.value)
        during = httpx.get(f"{root}/health")
        assert during.status_code in (200, 503) and during.json()["engine"] in ("restarting", "ready")
        begun = time.monotonic()
        assert engine.wait_ready(30)
        reply = client.chat.completions.create(
            model="tiny_a", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content and time.monotonic() - begun < 30
        assert engine.process.pid != killed and engine.restarts >= 1
        assert engine.loaded() == ["tiny_a@v1"]
        health = httpx.get(f"{root}/health")
        assert health.status_code == 200 and health.json()["engine"] == "ready"


def test_a_whole_request_in_flight_gets_a_503(engine):
    with BackgroundServer(create_app(engine)) as server:
        assert engine.wait_ready(30)
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        import threading

        outcome: dict = {}

        def ask():
            try:
                client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=4000,
                    logit_bias=never_ending(engine),
                )
                outcome["status"] = 200
            except openai.APIStatusError as exc:
                outcome["status"], outcome["body"] = exc.status_code, exc.body

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 10
        while engine.queue.depth == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        os.kill(engine.process.pid, signal.SIGKILL)
        asker.join(30)
        assert outcome["status"] == 503 and outcome["body"]["code"] == "engine_restarting"
        assert engine.wait_ready(30)


FRONT_END_DIES = """
import os
from core import adapter_store, model_store
from serving.engine import GenerationParams
from serving.engine_process import EngineProcess

engine = EngineProcess(model_store.get("tiny"))
ref = engine.load(adapter_store.resolve("tiny_a"))
tokens = engine.text_tokens("hi")
assert list(engine.generate(tokens, ((ref, 1.0),), GenerationParams(max_tokens=2)))
print("engine", engine.process.pid, flush=True)
os._exit(0)  # the front end dies without closing the engine: its pipe is gone
"""


def test_an_engine_whose_front_end_died_shuts_down_quietly(adapter_home):
    """It serves an adapter set, so shutting down switches it off, which it used to report to the front end that
    was gone: a BrokenPipeError traceback on its way out. Now it leaves in silence (stderr is read to its end,
    which comes when the engine process has exited too, as it holds the same stderr)."""
    env = {**os.environ, "SCALPEL_HOME": str(adapter_home), "SCALPEL_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FRONT_END_DIES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("engine "), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr[-2000:]
