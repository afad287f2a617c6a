"""Check `scalpel export vllm` on a GPU: vLLM serves the exported PEFT folder, and its greedy answers agree with
our llama.cpp answers on an eval suite.

    .venv/bin/python bench/vllm_agreement.py [REF] [--suite FILE] [--base-model HF_FOLDER] [--out bench/results]

It needs a CUDA GPU, the `vllm` package, and the base's Hugging Face weights on disk (a folder, or the HF cache:
nothing is downloaded). Without any of them it says which is missing and exits 0, so it never fails a CPU
machine. Both sides answer every question at temperature 0 with the same chat template (the base's) and the
same token budget. vLLM serves the HF weights (bf16) while scalpel serves the quantized GGUF, so answers may
differ token for token; what must agree is whether each answer carries the suite's facts. Results:
bench/results/vllm_agreement.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving import free_port, wait_ready  # noqa: E402

DEFAULT_REF = "tron_collaborative_intelligence_v1"
DEFAULT_SUITE = ROOT / "examples" / "tron_collaborative_intelligence_eval.json"


def missing_requirement(base_model: str) -> str | None:
    """Why this machine cannot run the check, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm)"
    if not Path(base_model).is_dir():
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(base_model, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means the weights are not on disk
            return f"the weights of {base_model} are not on disk (pass --base-model with a local HF folder)"
    return None


def vllm_answers(export, questions: list[str], max_tokens: int) -> list[str]:
    port = free_port()
    command = export.serve_command()
    command[command.index("--port") + 1] = str(port)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    server = subprocess.Popen(command, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", server, timeout=900)
        answers = []
        for question in questions:
            reply = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={
                    "model": export.lora_name,
                    "messages": [{"role": "user", "content": question}],
                    "temperature": 0,
                    "max_tokens": max_tokens,
                },
                timeout=300,
            )
            reply.raise_for_status()
            answers.append(reply.json()["choices"][0]["message"]["content"] or "")
        return answers
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ref", nargs="?", default=DEFAULT_REF)
    p.add_argument("--suite", type=Path, default=DEFAULT_SUITE)
    p.add_argument("--base-model", help="the base's HF folder or id (default: from the base's profile)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()

    from core import adapter_store, model_store
    from scalpel import evaluate
    from scalpel.export import export_vllm
    from serving.engine import Engine
    from serving.settings import EngineSettings

    export = export_vllm(args.ref, base_model=args.base_model)
    why = missing_requirement(export.base_model)
    if why:
        print(f"skipped: {why}")
        return 0
    items = evaluate.load_suite(args.suite)
    questions = [item.question for item in items]

    version = adapter_store.resolve(export.ref)
    base = version.manifest.require_base()
    engine = Engine(model_store.get(base.name), EngineSettings())
    try:
        ours = [evaluate.ask(engine, ((engine.load(version), 1.0),), q) for q in questions]
    finally:
        engine.close()
    started = time.perf_counter()
    theirs = vllm_answers(export, questions, evaluate.ANSWER_TOKENS)

    rows = [
        {"question": q, "scalpel": a, "vllm": b, "scalpel_passed": item.passes(a), "vllm_passed": item.passes(b)}
        for item, q, a, b in zip(items, questions, ours, theirs, strict=True)
    ]
    n = len(rows)
    result = {
        "ref": export.ref,
        "base_model": export.base_model,
        "questions": n,
        "scalpel_accuracy": sum(r["scalpel_passed"] for r in rows) / n,
        "vllm_accuracy": sum(r["vllm_passed"] for r in rows) / n,
        "verdict_agreement": sum(r["scalpel_passed"] == r["vllm_passed"] for r in rows) / n,
        "identical_text": sum(r["scalpel"].strip() == r["vllm"].strip() for r in rows) / n,
        "vllm_seconds": time.perf_counter() - started,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_agreement.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(
        f"{export.ref} on {export.base_model}: scalpel {result['scalpel_accuracy']:.0%}, "
        f"vLLM {result['vllm_accuracy']:.0%}, same verdict on {result['verdict_agreement']:.0%}, "
        f"identical text on {result['identical_text']:.0%} of {n} questions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
