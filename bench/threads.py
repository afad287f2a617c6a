"""Does `scalpel serve` with no flags use the machine? Whole (non-streamed) completions on the default model,
against llama-cpp-python's own server at --n_threads <usable cores> and at its default, in the same run.

    .venv/bin/pip install -e ".[bench]"      # llama_cpp.server's own extras
    .venv/bin/python bench/threads.py [--out bench/results] [--max-tokens 128] [--rounds 5]

Requests alternate between the servers round by round, so a noisy neighbour slows all of them alike; the
figure that counts is the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving import free_port, wait_ready  # noqa: E402

PROMPT = [{"role": "user", "content": "Explain in detail how a lighthouse works, step by step."}]


def whole_tps(url: str, model: str, max_tokens: int) -> float:
    started = time.perf_counter()
    reply = httpx.post(
        f"{url}/chat/completions",
        timeout=600,
        json={"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0},
    )
    reply.raise_for_status()
    return reply.json()["usage"]["completion_tokens"] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from core import model_store, threads

    cores = threads.usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "SCALPEL_HOME": tmp}
        env.pop("SCALPEL_THREADS", None)
        os.environ["SCALPEL_HOME"] = tmp
        gguf = model_store.ensure_default().gguf
        servers: dict[str, tuple[subprocess.Popen, str, str]] = {}
        commands = {
            "scalpel serve (no flags)": ([sys.executable, "-m", "scalpel.cli", "serve"], "smollm2-135m-instruct"),
            f"llama_cpp.server --n_threads {cores}": (
                [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    gguf,
                    "--n_threads",
                    str(cores),
                    "--model_alias",
                    "m",
                ],
                "m",
            ),
            "llama_cpp.server (its default threads)": (
                [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "m"],
                "m",
            ),
        }
        try:
            for label, (cmd, model) in commands.items():
                port = free_port()
                proc = subprocess.Popen(
                    cmd + ["--port", str(port)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                servers[label] = (proc, f"http://127.0.0.1:{port}/v1", model)
                wait_ready(f"http://127.0.0.1:{port}/v1/models", proc)
                whole_tps(servers[label][1], model, 8)  # warm
            runs: dict[str, list[float]] = {label: [] for label in servers}
            for _ in range(args.rounds):
                for label, (_, url, model) in servers.items():
                    runs[label].append(whole_tps(url, model, args.max_tokens))
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    medians = {label: statistics.median(values) for label, values in runs.items()}
    ours, anchor = list(medians.values())[:2]
    result = {
        "usable_cores": cores,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "tokens_per_second": {k: round(v, 1) for k, v in medians.items()},
        "ours_over_anchor": round(ours / anchor, 3),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "threads.json").write_text(json.dumps(result, indent=2))
    for label, value in medians.items():
        print(f"{label:42} {value:6.1f} tok/s (whole completion, median of {args.rounds})")
    print(
        f"scalpel serve over llama_cpp.server --n_threads {cores}: {result['ours_over_anchor']:.3f}x (target >= 0.95)"
    )


if __name__ == "__main__":
    main()
