"""Benchmark `scalpel serve` against llama-cpp-python's server and llama.cpp's own llama-server, in one run:
same GGUF, same adapters, same threads and context per request, one after the other on the same machine.

Measured for each server (end-of-generation tokens are banned with logit_bias, so every answer has its length):
streamed and whole decode speed, time to first token, a cached 1-token request, adapter switching on a
300-token shared prompt, 1/4/8 concurrent clients (8 spread over the base and 2 adapters), server memory with
1 and 10 adapters; for scalpel also how often concurrent greedy answers equal the single-request answer.
First, bench/decode_ceiling.py measures what llama.cpp's own decode allows, with no server at all.

    .venv/bin/pip install -e '.[bench]'    # llama_cpp.server's own dependencies
    .venv/bin/python bench/serving.py [--threads 2] [--out bench/results]

It builds llama-server once (bench/llama_server.py). Results: bench/results/serving.json and serving.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.conversion import make_peft_adapter  # noqa: E402
from bench.llama_server import llama_server  # noqa: E402

SHARED = "You are a helpful assistant for a lighthouse museum. " * 30  # about 300 tokens shared by every prompt
QUESTION = "Explain in detail how a lighthouse works, step by step."
N_CTX = 2048  # per request, for every server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def make_adapters(home: Path, n: int) -> list[str]:
    """Random (untrained) surgical adapters in the store: speed does not depend on what they learned."""
    from conversion.architecture import layout_from_gguf
    from conversion.lora_to_gguf import convert_lora
    from core import model_store
    from core.gguf_meta import BASE_FINGERPRINT_KEY
    from core.manifest import MANIFEST_NAME, Manifest, write_manifest

    base = model_store.ensure_default()
    layout = layout_from_gguf(base.gguf_path)
    profile = json.loads((ROOT / "conversion" / "profiles" / "smollm2-135m-instruct.json").read_text())
    names = []
    for i in range(n):
        name = f"bench_{i}"
        version = home / "adapters" / name / "v1"
        peft = make_peft_adapter(home / "peft" / name, profile, 8, ["q_proj", "k_proj", "v_proj"])
        version.mkdir(parents=True)
        convert_lora(peft, layout, version / "adapter.gguf", metadata={BASE_FINGERPRINT_KEY: base.fingerprint})
        write_manifest(version / MANIFEST_NAME, Manifest.model_validate({"adapter": name, "bench": True}))
        (version.parent / "active.json").write_text(json.dumps({"version": "v1"}))
        names.append(name)
    return names


class Server:
    """One running server and how to name a model (base or adapter i) in a request to it."""

    def __init__(self, kind: str, cmd: list[str], port: int, env: dict, health: str):
        self.kind, self.port = kind, port
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        wait_ready(f"http://127.0.0.1:{port}{health}", self.proc)
        self.names: list[str] = []
        self.base = "base"

    def body(self, adapter: int | None) -> dict:
        """The request fields that pick the base (None) or adapter i."""
        if self.kind == "scalpel":
            return {"model": self.base if adapter is None else self.names[adapter]}
        if self.kind == "llama-server":
            return {"model": "x", "lora": [{"id": i, "scale": 1.0 if i == adapter else 0.0} for i in range(2)]}
        return {"model": "x"}  # llama_cpp.server: one model, its adapter fixed at start

    def rss_mb(self) -> float:
        proc = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 1e6

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def messages(question: str = QUESTION, prefix: str = SHARED) -> list[dict]:
    return [{"role": "system", "content": prefix}, {"role": "user", "content": question}]


def ask(server: Server, adapter: int | None, max_tokens: int, *, stream: bool, msgs=None, ban_eos=True) -> dict:
    """One chat request; returns its wall time, time to first token and completion tokens."""
    body = {
        **server.body(adapter),
        "messages": msgs or messages(),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if ban_eos:
        body["logit_bias"] = server.eos_bias  # type: ignore[attr-defined]
    started = time.perf_counter()
    if not stream:
        reply = httpx.post(f"{server.url}/chat/completions", json=body, timeout=600)
        reply.raise_for_status()
        data = reply.json()
        wall = time.perf_counter() - started
        return {"wall": wall, "ttft": wall, "tokens": data["usage"]["completion_tokens"],
                "text": data["choices"][0]["message"]["content"]}  # fmt: skip
    first, pieces, text = None, 0, ""
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=600) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and (content := chunk["choices"][0]["delta"].get("content")):
                first = first or time.perf_counter()
                pieces += 1
                text += content
    wall = time.perf_counter() - started
    return {"wall": wall, "ttft": (first or started) - started, "tokens": pieces, "text": text}


def decode_rates(server: Server, max_tokens: int, repeats: int = 3) -> dict:
    """Tokens per second of a long answer, prompt cached, whole and streamed (median of `repeats`): completion
    tokens over the request's whole time, measured the same way for both."""
    ask(server, None, 4, stream=False)
    out = {}
    for stream in (False, True):
        runs = [ask(server, None, max_tokens, stream=stream) for _ in range(repeats)]
        key = "streamed" if stream else "whole"
        out[f"{key}_tps"] = round(statistics.median(r["tokens"] / r["wall"] for r in runs), 1)  # same for both
    return out


def ttft_fresh(server: Server, repeats: int = 5) -> float:
    """Time to the first streamed token of a ~300-token prompt nobody sent before, ms."""
    runs = [
        ask(server, None, 2, stream=True, msgs=messages(prefix=f"[session {time.time_ns()}-{i}] " + SHARED))["ttft"]
        for i in range(repeats)
    ]
    return round(statistics.median(runs) * 1000, 1)


def cached_one_token(server: Server, repeats: int = 20) -> float:
    """A whole 1-token chat request whose prompt is cached, ms (p50)."""
    short = [{"role": "user", "content": "Say OK."}]
    ask(server, None, 1, stream=False, msgs=short)
    runs = [ask(server, None, 1, stream=False, msgs=short)["wall"] for _ in range(repeats)]
    return round(statistics.median(runs) * 1000, 2)


def switching(server: Server, repeats: int = 24) -> dict:
    """1-token requests on the 300-token shared prompt alternating base and adapter, minus same-model ones."""
    for adapter in (None, 0):
        ask(server, adapter, 1, stream=False)
    same = [ask(server, 0, 1, stream=False)["wall"] * 1000 for _ in range(repeats // 2)]
    alternating = [ask(server, None if i % 2 else 0, 1, stream=False)["wall"] * 1000 for i in range(repeats)]
    cost = [a - statistics.median(same) for a in alternating]
    return {
        "same_p50_ms": round(statistics.median(same), 2),
        "switching_p50_ms": round(statistics.median(alternating), 2),
        "switch_cost_p50_ms": round(statistics.median(cost), 2),
        "switch_cost_p95_ms": round(sorted(cost)[int(0.95 * (len(cost) - 1))], 2),
    }


def clients(server: Server, n: int, adapters: list[int | None], max_tokens: int) -> float:
    """Aggregate completion tokens per second of n clients, each asking twice; client i uses adapters[i % k]."""

    def one(i):
        return ask(server, adapters[i % len(adapters)], max_tokens, stream=False)["tokens"]

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))  # warm every slot's prompt
        started = time.perf_counter()
        tokens = sum(pool.map(one, range(2 * n)))
    return round(tokens / (time.perf_counter() - started), 1)


def concurrent_agreement(server: Server, n: int = 8) -> float:
    """Share of greedy answers, asked by n concurrent clients over base and 2 adapters, equal to the same
    request asked alone."""
    questions = [f"{QUESTION} (part {i})" for i in range(n)]
    choice = [None, 0, 1]
    alone = [
        ask(server, choice[i % 3], 24, stream=False, msgs=messages(q), ban_eos=False)["text"]
        for i, q in enumerate(questions)
    ]
    with ThreadPoolExecutor(n) as pool:
        together = list(
            pool.map(
                lambda i: ask(server, choice[i % 3], 24, stream=False, msgs=messages(questions[i]), ban_eos=False)[
                    "text"
                ],
                range(n),
            )
        )
    return round(sum(a == b for a, b in zip(alone, together, strict=True)) / n, 3)


def measure(server: Server, max_tokens: int, *, adapters: bool) -> dict:
    results = {**decode_rates(server, max_tokens), "ttft_fresh_ms": ttft_fresh(server)}
    results["cached_1_token_ms"] = cached_one_token(server)
    results["clients_1_tps"] = clients(server, 1, [None], 64)
    results["clients_4_tps"] = clients(server, 4, [None], 64)
    results["clients_8_tps"] = clients(server, 8, [None], 64)
    if adapters:
        results["switch"] = switching(server)
        results["clients_8_mixed_tps"] = clients(server, 8, [None, 0, 1], 64)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--deterministic", action="store_true", help="serve scalpel with --deterministic")
    parser.add_argument("--skip", nargs="*", default=[], choices=["llama_cpp.server", "llama-server"])
    args = parser.parse_args()
    if "llama_cpp.server" not in args.skip and importlib.util.find_spec("starlette_context") is None:
        parser.error("llama_cpp.server needs the bench extra: pip install -e '.[bench]' (or --skip llama_cpp.server)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    threads = str(args.threads)
    binary = None if "llama-server" in args.skip else llama_server()
    results: dict = {
        "threads": args.threads,
        "n_ctx_per_request": N_CTX,
        "slots": args.slots,
        "max_tokens": args.max_tokens,
    }
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        env["SCALPEL_HOME"] = os.environ["SCALPEL_HOME"] = str(home)
        names = make_adapters(home, 10)
        from core import model_store

        base = model_store.ensure_default()
        ggufs = [str(home / "adapters" / n / "v1" / "adapter.gguf") for n in names]
        eos = {str(t): -100 for t in base_eog_tokens(base)}

        # --- llama.cpp alone: the ceiling every server works under ------------------------------------
        ceiling = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "decode_ceiling.py"), "--threads", threads,
             "--adapter", ggufs[0], "--adapter", ggufs[1]],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        results["llama.cpp decode"] = json.loads(ceiling.stdout.splitlines()[-1])

        # --- scalpel --------------------------------------------------------------------------------
        port = free_port()
        cmd = [sys.executable, "-m", "scalpel.cli", "serve", "--port", str(port), "--n-ctx", str(N_CTX),
               "--threads", threads, "--slots", str(args.slots)]  # fmt: skip
        cmd += ["--deterministic"] if args.deterministic else []
        ours = Server("scalpel", cmd, port, env, "/health")
        ours.names, ours.base, ours.eos_bias = names, base.name, eos  # type: ignore[attr-defined]
        try:
            rss = {"1 adapter": 0.0, "10 adapters": 0.0}
            ask(ours, 0, 1, stream=False)
            rss["1 adapter"] = ours.rss_mb()
            results["scalpel"] = measure(ours, args.max_tokens, adapters=True)
            results["scalpel"]["concurrent_agreement"] = concurrent_agreement(ours)
            for i in range(1, 10):
                ask(ours, i, 1, stream=False)
            rss["10 adapters"] = ours.rss_mb()
            results["scalpel"]["rss_mb"] = {k: round(v) for k, v in rss.items()}
        finally:
            ours.stop()

        # --- llama.cpp's llama-server -------------------------------------------------------------
        if binary:
            port = free_port()
            cmd = [str(binary), "-m", str(base.gguf), "--port", str(port), "-t", threads, "-tb", threads,
                   "-c", str(N_CTX * args.slots), "--parallel", str(args.slots), "--lora-init-without-apply",
                   *[x for g in ggufs[:2] for x in ("--lora", g)]]  # fmt: skip
            theirs = Server("llama-server", cmd, port, env, "/health")
            theirs.eos_bias = eos  # type: ignore[attr-defined]
            try:
                results["llama-server"] = measure(theirs, args.max_tokens, adapters=True)
                results["llama-server"]["rss_mb"] = {"2 adapters": round(theirs.rss_mb())}
            finally:
                theirs.stop()
            cmd[cmd.index("--lora-init-without-apply") + 1 :] = [x for g in ggufs for x in ("--lora", g)]
            port = free_port()
            cmd[cmd.index("--port") + 1] = str(port)
            ten = Server("llama-server", cmd, port, env, "/health")
            try:
                results["llama-server"]["rss_mb"]["10 adapters"] = round(ten.rss_mb())
            finally:
                ten.stop()

        # --- llama-cpp-python's server --------------------------------------------------------------
        if "llama_cpp.server" not in args.skip:
            port = free_port()
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(base.gguf), "--port", str(port),
                   "--n_ctx", str(N_CTX), "--n_threads", threads, "--n_threads_batch", threads]  # fmt: skip
            py = Server("llama_cpp.server", cmd, port, env, "/v1/models")
            py.eos_bias = eos  # type: ignore[attr-defined]
            try:
                results["llama_cpp.server"] = measure(py, args.max_tokens, adapters=False)
            finally:
                py.stop()

    results["targets"] = targets(results)
    stem = "serving-deterministic" if args.deterministic else "serving"
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"{stem}.md").write_text(table(results))
    print(table(results))


def base_eog_tokens(base) -> list[int]:
    """The base's end-of-generation tokens (banned while measuring speed, so every answer runs its length)."""
    from serving.tokenizer import Tokenizer

    tokenizer = Tokenizer(base)
    try:
        return [t for t in range(tokenizer.n_vocab) if tokenizer.is_eog(t)]
    finally:
        tokenizer.close()


def targets(r: dict) -> dict:
    """Issue 17's targets, each True or False (None where a comparison server was skipped)."""
    ours = r["scalpel"]
    ls, py = r.get("llama-server"), r.get("llama_cpp.server")
    return {
        "streamed >= 0.95 x whole": ours["streamed_tps"] >= 0.95 * ours["whole_tps"],
        "streamed >= llama_cpp.server": None if not py else ours["streamed_tps"] >= py["streamed_tps"],
        "streamed >= llama-server": None if not ls else ours["streamed_tps"] >= ls["streamed_tps"],
        "cached 1-token <= llama-server": None if not ls else ours["cached_1_token_ms"] <= ls["cached_1_token_ms"],
        "switch cost p50 <= 25 ms": ours["switch"]["switch_cost_p50_ms"] <= 25,
        "4 clients >= 2 x 1 client": ours["clients_4_tps"] >= 2 * ours["clients_1_tps"],
        "8 mixed clients within 10% of 4 clients": ours["clients_8_mixed_tps"] >= 0.9 * ours["clients_4_tps"],
    }


def table(r: dict) -> str:
    servers = [s for s in ("scalpel", "llama-server", "llama_cpp.server") if s in r]
    rows = [
        ("decode tok/s, whole answer", lambda x: x["whole_tps"]),
        ("decode tok/s, streamed", lambda x: x["streamed_tps"]),
        ("time to first token, fresh 300-token prompt, ms", lambda x: x["ttft_fresh_ms"]),
        ("cached 1-token request, ms", lambda x: x["cached_1_token_ms"]),
        (
            "switch cost p50 / p95, ms",
            lambda x: f"{x['switch']['switch_cost_p50_ms']} / {x['switch']['switch_cost_p95_ms']}",
        ),
        ("1 client, tok/s", lambda x: x["clients_1_tps"]),
        ("4 clients, aggregate tok/s", lambda x: x["clients_4_tps"]),
        ("8 clients, aggregate tok/s", lambda x: x["clients_8_tps"]),
        ("8 clients over base + 2 adapters, tok/s", lambda x: x["clients_8_mixed_tps"]),
        ("concurrent greedy answers equal to alone", lambda x: x["concurrent_agreement"]),
        ("RSS MB", lambda x: ", ".join(f"{k}: {v}" for k, v in x["rss_mb"].items())),
    ]

    def cell(server, get):
        try:
            return str(get(r[server]))
        except (KeyError, TypeError):
            return "-"

    lines = [f"threads {r['threads']}, {r['n_ctx_per_request']} tokens of context per request, {r['slots']} slots", ""]
    lines += ["| measure | " + " | ".join(servers) + " |", "| --- |" + " --- |" * len(servers)]
    lines += [f"| {name} | " + " | ".join(cell(s, get) for s in servers) + " |" for name, get in rows]
    if "llama.cpp decode" in r:
        raw = r["llama.cpp decode"]
        lines += [
            "",
            "llama.cpp alone (bench/decode_ceiling.py, raw llama_decode, 300 tokens deep): "
            f"batch 1 / 4 / 8: {raw['batch_1_tps']} / {raw['batch_4_tps']} / {raw['batch_8_tps']} tok/s "
            f"(4 over 1: {raw['batch_4_over_batch_1']}x); 8 over base + 2 adapters: "
            f"{raw['mixed_8_over_3_sets_tps']} tok/s changing sets, {raw['mixed_8_one_set_3_decodes_tps']} in the "
            f"same 3 decodes under one set ({raw['mixed_8_over_batch_4']}x batch 4)",
        ]
    lines += ["", "targets: " + json.dumps(r["targets"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
