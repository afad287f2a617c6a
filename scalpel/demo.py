"""`scalpel demo`: the whole loop on the embedded SmolLM2 (register, check, train, convert, serve, ask).

The answers come side by side, the bare base's and the adapter's: first questions the adapter was taught, then
general questions with known answers (scalpel/reference/general_questions.json), scored, to show that the
base's own skills survived the new knowledge (base preservation is on unless `--no-preservation`).
"""

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
from scalpel import evaluate
from scalpel.publish import train_and_publish
from scalpel.update_settings import PreservationSettings
from serving.app import create_app
from serving.engine import Engine
from training.config import load_config
from training.dataset import load_examples

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIG = EXAMPLES / "demo_config.json"
DATA = EXAMPLES / "tron_collaborative_intelligence_training.json"
EVAL = EXAMPLES / "tron_collaborative_intelligence_eval.json"
KNOWLEDGE_QUESTIONS = 6  # of the eval suite's, asked side by side


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


def _side_by_side(question: str, left: str, right: str, width: int, marks: tuple[str, str] = ("", "")) -> str:
    col = (width - 3) // 2
    heads = f"{'base model' + marks[0]:<{col}} | {'with the adapter' + marks[1]:<{col}}"
    lines = [f"Q: {question}", heads, f"{'-' * col}-+-{'-' * col}"]
    wrapped_l = textwrap.wrap(" ".join(left.split()), col) or [""]
    wrapped_r = textwrap.wrap(" ".join(right.split()), col) or [""]
    for a, b in itertools.zip_longest(wrapped_l, wrapped_r, fillvalue=""):
        lines.append(f"{a:<{col}} | {b}")
    return "\n".join(lines)


def ask_both(client: OpenAI, models: tuple[str, str], question: str, max_tokens: int) -> tuple[str, str]:
    """One question to the bare base and to the adapter, greedy, through the server."""
    pair = []
    for model in models:
        reply = client.chat.completions.create(
            model=model, temperature=0, max_tokens=max_tokens, messages=[{"role": "user", "content": question}]
        )
        pair.append(reply.choices[0].message.content or "")
    return pair[0], pair[1]


def general_side_by_side(client: OpenAI, models: tuple[str, str], width: int, log=print) -> dict:
    """The general questions with known answers, each answered by the base and by the adapter and scored, then
    both scores: whether the adapter still answers as the base does."""
    items = evaluate.general_questions()
    answers: list[dict] = []
    for item in items:
        base, adapter = ask_both(client, models, item.question, evaluate.GENERAL_TOKENS)
        base_right, adapter_right = item.passes(base), item.passes(adapter)
        answers.append(
            {
                "question": item.question,
                "base": base,
                "adapter": adapter,
                "base_right": base_right,
                "right": adapter_right,
            }
        )
        marks = (" - right" if base_right else " - wrong", " - right" if adapter_right else " - wrong")
        log(_side_by_side(item.question, base, adapter, width, marks) + "\n")
    base_score = sum(a["base_right"] for a in answers)
    adapter_score = sum(a["right"] for a in answers)
    log(
        f"general questions with known answers: the base {base_score}/{len(items)}, "
        f"with the adapter {adapter_score}/{len(items)}\n"
    )
    return {"answers": answers, "base": base_score, "adapter": adapter_score, "total": len(items)}


def run_demo(max_steps: int | None = None, preservation: bool = True) -> dict:
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
        f"{'/'.join(config.lora_config.target_modules)}) for {config.training_config.num_epochs:g} epochs, "
        + ("with base preservation" if preservation else "without base preservation")
    )
    t = time.time()
    result = train_and_publish(
        config,
        DATA,
        model=base.name,
        max_steps=max_steps,
        eval_suites=(EVAL,),
        preserve=PreservationSettings() if preservation else None,
    )
    timings["train"] = result.train_seconds
    timings["convert to GGUF"] = result.convert_seconds
    # Besides training and conversion: the base's answers for preservation (the first time on this base) and
    # the evaluation of the version through llama.cpp.
    timings["preserve and evaluate"] = max(time.time() - t - result.train_seconds - result.convert_seconds, 0.0)
    version = result.version
    size_mb = version.gguf.stat().st_size / 1e6
    print(f"[4/5] adapter {version.ref}: {size_mb:.2f} MB GGUF, final loss {version.manifest.metrics.final_loss:.3f}")
    print("\n".join(evaluate.outcome_lines(version.manifest.eval)))

    t = time.time()
    engine = Engine(base)
    questions = [q["question"] for q in json.loads(EVAL.read_text(encoding="utf-8"))[:KNOWLEDGE_QUESTIONS]]
    answers = []
    with BackgroundServer(create_app(engine)) as server:
        timings["start server"] = time.time() - t
        print(f"[5/5] serving on {server.base_url}; asking through the openai client\n")
        client = OpenAI(base_url=server.base_url, api_key="not-needed")
        t = time.time()
        width = min(shutil.get_terminal_size((120, 20)).columns, 140)
        models = (base.name, version.name)
        print("What the adapter was taught:\n")
        for question in questions:
            pair = ask_both(client, models, question, 80)
            answers.append({"question": question, "base": pair[0], "adapter": pair[1]})
            print(_side_by_side(question, pair[0], pair[1], width) + "\n")
        print("What the base already knew, still answered as the base answers it:\n")
        general = general_side_by_side(client, models, width)
        timings["answer questions"] = time.time() - t
    engine.close()

    print("stage                 seconds")
    for stage, seconds in timings.items():
        print(f"  {stage:20} {seconds:7.1f}")
    print(f"  {'total':20} {sum(timings.values()):7.1f}")
    print(f"\nadapter size: {size_mb:.2f} MB (GGUF f32) in {version.path}")
    print(f"training report with loss and learning-rate plots and the scores: {version.path / 'report.md'}")
    print(f"serve it yourself:  scalpel serve   then use model={version.name!r} in any OpenAI client")
    return {"timings": timings, "answers": answers, "general": general, "adapter": version.ref, "size_mb": size_mb}
