"""A bounded soak of `scalpel serve` on the tiny model: 8 concurrent clients over 2 adapters, with hot swaps,
uploads and a training job all at once. Reports errors, p99 latency, RSS growth, leaked file descriptors and
answers that differ from a fresh process (goals: 0, bounded, 0, 0). Not in CI: `bench/` runs it.

    .venv/bin/python bench/soak.py [--seconds 120] [--clients 8] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_SECONDS = 300  # the bound: a soak never runs longer than 5 minutes
PROMPTS = ["hi", "What is 2 + 2?", "Tell me about lighthouses."]
MODELS = ["tiny", "soak_a", "soak_b@v1", "soak_b@v2"]
FRESH = """
import json, sys
from core import adapter_store, model_store
from serving.engine import Engine, GenerationParams
engine = Engine(model_store.get("tiny"))
out = {}
for model in json.loads(sys.argv[1]):
    adapters = () if model == "tiny" else ((engine.load(adapter_store.resolve(model)), 1.0),)
    for prompt in json.loads(sys.argv[2]):
        tokens = engine.chat_tokens([{"role": "user", "content": prompt}])
        params = GenerationParams(max_tokens=8, temperature=0, seed=1)
        out[f"{model}|{prompt}"] = "".join(p.text for p in engine.generate(tokens, adapters, params))
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(home: Path) -> None:
    """The tiny base, adapter soak_a (v1) and soak_b (v1, v2), and a dataset for uploads and training."""
    from scalpel.cli.main import main
    from scalpel.publish import train_and_publish
    from tests.tiny_models import build_tiny_llama
    from training.config import parse_config

    os.environ["SCALPEL_HOME"] = str(home)
    assert main(["models", "add", "tiny", str(build_tiny_llama(home / "hf")), "--outtype", "f32"]) == 0
    for name, answers in (("soak_a", ["FOR TWO"]), ("soak_b", ["never 2 1", "21 again"])):
        for answer in answers:
            data = home / f"{name}-{answer[:3]}.json"
            data.write_text(json.dumps([{"instruction": "hi", "output": answer}] * 4))
            config = {"model_name": "tiny", "output_dir": f"adapters/{name}", "training_config": {"num_epochs": 2}}
            train_and_publish(parse_config(config), data, progress=False)
    (home / "train.json").write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)]))


def fresh_answers(home: Path) -> dict[str, str]:
    env = {**os.environ, "SCALPEL_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(MODELS), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


class Soak:
    def __init__(self, root: str, expected: dict[str, str], deadline: float):
        self.root, self.expected, self.deadline = root, expected, deadline
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.differing: list[str] = []
        self.counts = {"chat": 0, "swaps": 0, "uploads": 0}
        self.lock = threading.Lock()

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)

    def client(self, index: int) -> None:
        with httpx.Client(timeout=60) as http:
            n = index
            while time.time() < self.deadline:
                model, prompt = MODELS[n % len(MODELS)], PROMPTS[n % len(PROMPTS)]
                n += 1
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 8,
                    "temperature": 0,
                    "seed": 1,
                }
                begun = time.perf_counter()
                try:
                    reply = http.post(f"{self.root}/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    self.error(f"chat {model}: {type(exc).__name__}")
                    continue
                took = time.perf_counter() - begun
                if reply.status_code == 429:
                    continue  # the bounded waiting line doing its job, not an error
                if reply.status_code != 200:
                    self.error(f"chat {model}: {reply.status_code} {reply.text[:120]}")
                    continue
                with self.lock:
                    self.latencies.append(took)
                    self.counts["chat"] += 1
                    if reply.json()["choices"][0]["message"]["content"] != self.expected[f"{model}|{prompt}"]:
                        self.differing.append(f"{model}|{prompt}")

    def swapper(self) -> None:
        """Hot swaps: soak_b's live version flips, soak_a is unloaded and loaded again."""
        with httpx.Client(timeout=60) as http:
            flip = 0
            while time.time() < self.deadline:
                flip += 1
                steps = [
                    ("post", "/api/adapters/soak_b/promote", {"version": f"v{1 + flip % 2}"}),
                    ("post", "/api/adapters/soak_a/unload", None),
                    ("post", "/api/adapters/soak_a/load", None),
                ]
                for method, route, body in steps:
                    reply = http.request(method, f"{self.root}{route}", json=body)
                    if reply.status_code != 200 and not (route.endswith("unload") and reply.status_code == 404):
                        self.error(f"swap {route}: {reply.status_code} {reply.text[:120]}")
                with self.lock:
                    self.counts["swaps"] += 1
                time.sleep(0.5)

    def uploader(self, data: bytes) -> None:
        with httpx.Client(timeout=60) as http:
            while time.time() < self.deadline:
                reply = http.post(
                    f"{self.root}/v1/files", files={"file": ("soak.jsonl", data)}, data={"purpose": "fine-tune"}
                )
                if reply.status_code != 200:
                    self.error(f"upload: {reply.status_code} {reply.text[:120]}")
                else:
                    gone = http.delete(f"{self.root}/v1/files/{reply.json()['id']}")
                    if gone.status_code != 200:
                        self.error(f"delete file: {gone.status_code}")
                    with self.lock:
                        self.counts["uploads"] += 1
                time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120, help=f"the soak's length (at most {MAX_SECONDS})")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    seconds = min(args.seconds, MAX_SECONDS)
    home = Path(tempfile.mkdtemp(prefix="scalpel-soak-"))
    prepare(home)
    expected = fresh_answers(home)
    port = free_port()
    env = {**os.environ, "SCALPEL_HOME": str(home)}
    server = subprocess.Popen(
        [sys.executable, "-m", "scalpel.cli", "serve", "--model", "tiny", "--port", str(port)],
        cwd=home,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        proc = psutil.Process(server.pid)
        for model in MODELS:  # load every adapter once before the baseline of memory and descriptors
            httpx.post(
                f"{root}/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                timeout=60,
            )
        soak = Soak(root, expected, time.time() + seconds)
        rss_start, fds_start = proc.memory_info().rss, proc.num_fds()
        job = httpx.post(
            f"{root}/api/training/start",
            params={"dataset": "train.json", "max_steps": 4},
            json={"model_name": "tiny", "output_dir": "adapters/soak_job", "training_config": {"num_epochs": 1}},
            timeout=60,
        )
        if job.status_code != 200:
            soak.error(f"training start: {job.status_code} {job.text[:200]}")
        line = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
        workers = [threading.Thread(target=soak.client, args=(i,)) for i in range(args.clients)]
        rss_samples: list[int] = []

        def sample() -> None:  # memory over time: growth that levels off is bounded, steady growth is a leak
            while time.time() < soak.deadline:
                rss_samples.append(proc.memory_info().rss)
                time.sleep(1)

        workers.append(threading.Thread(target=sample))
        workers += [
            threading.Thread(target=soak.swapper),
            threading.Thread(target=soak.uploader, args=((line + "\n").encode() * 4,)),
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        job_status = None
        if job.status_code == 200:
            job_id = job.json()["job_id"]
            for _ in range(600):
                job_status = httpx.get(f"{root}/api/training/jobs/{job_id}", timeout=30).json()["status"]
                if job_status in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.5)
            if job_status != "succeeded":
                soak.error(f"training job: {job_status}")
        time.sleep(1)
        rss_end, fds_end = proc.memory_info().rss, proc.num_fds()
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {
        "seconds": seconds,
        "clients": args.clients,
        "requests": soak.counts["chat"],
        "hot_swap_rounds": soak.counts["swaps"],
        "uploads": soak.counts["uploads"],
        "training_job": job_status,
        "errors": len(soak.errors),
        "error_samples": soak.errors[:10],
        "p50_s": round(percentile(soak.latencies, 0.50), 3),
        "p99_s": round(percentile(soak.latencies, 0.99), 3),
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_mb": round((rss_end - rss_start) / 2**20, 1),
        "rss_growth_second_half_mb": round((rss_samples[-1] - rss_samples[len(rss_samples) // 2]) / 2**20, 1)
        if rss_samples
        else None,
        "leaked_fds": fds_end - fds_start,
        "answers_differing_from_fresh": len(soak.differing),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
