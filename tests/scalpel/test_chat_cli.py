"""`scalpel chat` driven through piped stdin: against a running server, and with one it starts itself."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from core import model_store
from scalpel.cli.main import main
from scalpel.demo import BackgroundServer
from scalpel.importer import import_adapter
from serving.app import create_app
from serving.engine import Engine
from tests.scalpel.test_importer import peft_adapter
from tests.tiny_models import registered_home

ROOT = Path(__file__).resolve().parents[2]
ANSWER = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("chat-home"), tiny_llama) as home:
        import_adapter("chat_a", peft_adapter(tiny_llama, home / "peft"), base="tiny")
        engine = Engine(model_store.get("tiny"))
        with BackgroundServer(create_app(engine)) as background:
            background.home = home
            yield background
        engine.close()


def answer(server, model: str, history: list[dict]) -> str:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    return client.chat.completions.create(model=model, messages=history, **ANSWER).choices[0].message.content or ""


def turns(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def test_chat_keeps_the_history_switches_models_and_resets(server, monkeypatch, capsys):
    script = "hi\n/model chat_a\nhi\n/model no-such-model\n/help\n/reset\nhello\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code = main(
        ["chat", "tiny", "--url", server.base_url.removesuffix("/v1"), "--temperature", "0", "--max-tokens", "8"]
    )
    assert code == 0
    out = capsys.readouterr().out
    first = answer(server, "tiny", turns("hi"))
    second = answer(server, "chat_a", turns("hi", first, "hi"))  # the history goes along to the new model
    third = answer(server, "chat_a", turns("hello"))  # and is gone after /reset
    assert first != answer(server, "chat_a", turns("hi")), "the adapter changes the answer"
    expected_start = f"{first}\nmodel: chat_a (1 earlier turns kept)\n{second}\nerror 404: "
    assert out.startswith(expected_start), out
    assert "/model NAME" in out and "never read" not in out
    assert out.endswith(f"(conversation cleared)\n{third}\n"), out


def test_chat_reads_the_url_from_the_environment_and_ends_at_end_of_input(server, monkeypatch, capsys):
    monkeypatch.setenv("SCALPEL_URL", server.base_url)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/model\n\nhi"))  # no newline at the end, then Ctrl-D
    assert main(["chat", "chat_a", "--temperature", "0", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == f"model: chat_a\n{answer(server, 'chat_a', turns('hi'))}\n"


def test_chat_starts_its_own_server_without_a_url(server):
    """A separate process, as a user runs it: no --url, no SCALPEL_URL, so it serves the adapter's base itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("SCALPEL_URL", "SCALPEL_API_KEY")}
    done = subprocess.run(
        [sys.executable, "-m", "scalpel.cli", "chat", "chat_a", "--temperature", "0", "--max-tokens", "8"],
        input="hi\n/model tiny\nhi\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**env, "SCALPEL_HOME": str(server.home)},
    )
    assert done.returncode == 0, done.stderr
    first = answer(server, "chat_a", turns("hi"))
    second = answer(server, "tiny", turns("hi", first, "hi"))
    assert done.stdout == f"{first}\nmodel: tiny (1 earlier turns kept)\n{second}\n"


def test_chat_says_when_no_server_answers_or_the_model_is_unknown(server, capsys):
    assert main(["chat", "tiny", "--url", "http://127.0.0.1:9"]) == 2
    assert "cannot reach a scalpel server" in capsys.readouterr().err
    assert main(["chat", "no-such-model", "--url", server.base_url]) == 2
    assert "the server has no model 'no-such-model'; it offers tiny, tiny@base, chat_a" in capsys.readouterr().err
