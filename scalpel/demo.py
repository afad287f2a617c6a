"""`scalpel demo`: the whole loop on the embedded SmolLM2 (register, check, train, convert, serve, ask)."""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import textwrap
import threading
import time
from pathlib import Path

import uvicorn
from openai import OpenAI

from core import model_store
from scalpel.publish import train_and_publish
from serving.app import create_app
from serving.engine import Engine
from training.config import load_config
from training.dataset import load_examples

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIG = EXAMPLES / "demo_config.json"
DATA = EXAMPLES / "tron_collaborative_intelligence_training.json"
EVAL = EXAMPLES / "tron_collaborative_intelligence_eval.json"
GENERAL_QUESTIONS = ["What is the capital of France?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn in a thread on 127.0.0.1, for the demo and the tests."""

    def __init__(self, app, port: int | None = None):
        self.port = port or _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _side_by_side(question: str, left: str, right: str, width: int) -> str:
    col = (width - 3) // 2
    lines = [f"Q: {question}", f"{'base model':<{col}} | {'with the adapter':<{col}}", f"{'-' * col}-+-{'-' * col}"]
    wrapped_l = textwrap.wrap(" ".join(left.split()), col) or [""]
    wrapped_r = textwrap.wrap(" ".join(right.split()), col) or [""]
    for a, b in itertools.zip_longest(wrapped_l, wrapped_r, fillvalue=""):
        lines.append(f"{a:<{col}} | {b}")
    return "\n".join(lines)


def run_demo(max_steps: int | None = None) -> dict:
    timings: dict[str, float] = {}
    t = time.time()
    base = model_store.ensure_default()
    timings["register base"] = time.time() - t
    print(f"[1/5] base model {base.name}: {base.gguf} ({Path(base.gguf).stat().st_size / 1e6:.0f} MB)")

    t = time.time()
    examples = load_examples(DATA)
    concepts = sorted({e.concept for e in examples})
    timings["check data"] = time.time() - t
    print(f"[2/5] dataset {DATA.name}: {len(examples)} examples in {len(concepts)} concepts")

    config = load_config(CONFIG)
    print(
        f"[3/5] training a surgical LoRA (r={config.lora_config.r}, alpha={config.lora_config.lora_alpha:g}, "
        f"{'/'.join(config.lora_config.target_modules)}) for {config.training_config.num_epochs:g} epochs"
    )
    result = train_and_publish(config, DATA, model=base.name, max_steps=max_steps)
    timings["train"] = result.train_seconds
    timings["convert to GGUF"] = result.convert_seconds
    version = result.version
    size_mb = version.gguf.stat().st_size / 1e6
    print(f"[4/5] adapter {version.ref}: {size_mb:.2f} MB GGUF, final loss {version.manifest.metrics.final_loss:.3f}")

    t = time.time()
    engine = Engine(base)
    questions = [q["question"] for q in json.loads(EVAL.read_text(encoding="utf-8"))[:6]] + GENERAL_QUESTIONS
    answers = []
    with BackgroundServer(create_app(engine)) as server:
        timings["start server"] = time.time() - t
        print(f"[5/5] serving on {server.base_url}; asking through the openai client\n")
        client = OpenAI(base_url=server.base_url, api_key="not-needed")
        t = time.time()
        width = min(shutil.get_terminal_size((120, 20)).columns, 140)
        for question in questions:
            pair = []
            for model in (base.name, version.name):
                reply = client.chat.completions.create(
                    model=model, temperature=0, max_tokens=80, messages=[{"role": "user", "content": question}]
                )
                pair.append(reply.choices[0].message.content or "")
            answers.append({"question": question, "base": pair[0], "adapter": pair[1]})
            print(_side_by_side(question, pair[0], pair[1], width) + "\n")
        timings["answer questions"] = time.time() - t
    engine.close()

    print("stage                 seconds")
    for stage, seconds in timings.items():
        print(f"  {stage:20} {seconds:7.1f}")
    print(f"  {'total':20} {sum(timings.values()):7.1f}")
    print(f"\nadapter size: {size_mb:.2f} MB (GGUF f32) in {version.path}")
    print(f"training report with loss and learning-rate plots: {version.path / 'report.md'}")
    print(f"serve it yourself:  scalpel serve   then use model={version.name!r} in any OpenAI client")
    return {"timings": timings, "answers": answers, "adapter": version.ref, "size_mb": size_mb}
