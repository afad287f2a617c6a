"""Benchmark serving against llama-cpp-python's own server (python -m llama_cpp.server), same GGUF, same adapter,
same machine, same run: decode speed, time to first token, adapter switching, adapter overhead, 4 concurrent
clients, and server memory with 1 and 10 adapters loaded.

    .venv/bin/pip install "llama-cpp-python[server]==0.3.36" psutil   # the baseline's own extras
    .venv/bin/python bench/serving.py [--out bench/results] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
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

PROMPT = [{"role": "user", "content": "Explain in detail how a lighthouse works, step by step."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
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


def stream_once(base_url: str, model: str, max_tokens: int) -> dict:
    """One streamed chat request: time to first token, decode rate between first and last token."""
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first = last = None
    pieces = 0
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=300) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                pieces += 1
    return {
        "ttft": first - started,
        "decode_tps": (pieces - 1) / (last - first) if pieces > 1 else 0.0,
        "pieces": pieces,
    }


def median_run(base_url: str, model: str, max_tokens: int, repeats: int = 7) -> dict:
    stream_once(base_url, model, 8)  # warm
    runs = [stream_once(base_url, model, max_tokens) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in ("ttft", "decode_tps", "pieces")}


def concurrent_throughput(base_url: str, model: str, max_tokens: int, clients: int = 4, each: int = 2) -> float:
    def one(_):
        reply = httpx.post(
            f"{base_url}/chat/completions",
            timeout=600,
            json={"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0},
        )
        return reply.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, range(clients * each)))
    return tokens / (time.perf_counter() - started)


def histogram_buckets(text: str, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) pairs of a Prometheus histogram."""
    out = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="')[1].split('"')[0]
            out.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    return out


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    total = buckets[-1][1]
    return next(bound for bound, count in buckets if count >= q * total)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    results: dict = {"max_tokens": args.max_tokens, "device": "CPU, 2 cores"}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        env["SCALPEL_HOME"] = str(home)
        os.environ["SCALPEL_HOME"] = str(home)
        names = make_adapters(home, 10)
        from core import model_store

        base = model_store.ensure_default()
        adapter_gguf = home / "adapters" / names[0] / "v1" / "adapter.gguf"

        # --- ours -------------------------------------------------------------------------------
        port = free_port()
        ours = subprocess.Popen(
            [sys.executable, "-m", "scalpel.cli", "serve", "--port", str(port), "--n-ctx", "2048"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        url = f"http://127.0.0.1:{port}/v1"
        try:
            wait_ready(f"http://127.0.0.1:{port}/health", ours)
            proc = psutil.Process(ours.pid)
            rss = {"base": proc.memory_info().rss / 1e6}
            results["ours_adapter"] = median_run(url, names[0], args.max_tokens)
            results["ours_base"] = median_run(url, base.name, args.max_tokens)
            rss["base + 1 adapter"] = proc.memory_info().rss / 1e6
            for name in names[1:]:
                httpx.post(f"http://127.0.0.1:{port}/api/adapters/{name}/load", timeout=60)
            rss["base + 10 adapters"] = proc.memory_info().rss / 1e6
            results["ours_rss_mb"] = {k: round(v) for k, v in rss.items()}

            def short(model):
                t = time.perf_counter()
                httpx.post(
                    f"{url}/chat/completions",
                    timeout=60,
                    json={"model": model, "messages": PROMPT, "max_tokens": 1, "temperature": 0},
                )
                return (time.perf_counter() - t) * 1000

            same = [short(names[0]) for _ in range(12)]
            switching = [short(names[i % 2]) for i in range(24)]
            switch_buckets = histogram_buckets(
                httpx.get(f"http://127.0.0.1:{port}/metrics").text, "scalpel_adapter_switch_seconds"
            )
            results["ours_switch_ms"] = {
                "set_adapters_p50_at_most": round(bucket_quantile(switch_buckets, 0.5) * 1000, 3),
                "set_adapters_p95_at_most": round(bucket_quantile(switch_buckets, 0.95) * 1000, 3),
                "switching_request_p50": round(percentile(switching, 0.5), 1),
                "switching_request_p95": round(percentile(switching, 0.95), 1),
                "same_adapter_request_p50": round(percentile(same, 0.5), 1),
                "switch_cost_p50": round(percentile(switching, 0.5) - percentile(same, 0.5), 1),
            }
            results["ours_4_clients_tps"] = round(concurrent_throughput(url, names[0], args.max_tokens), 1)
        finally:
            ours.terminate()
            ours.wait(30)

        # --- llama-cpp-python's server, same GGUF and adapter ----------------------------------------
        def start_theirs(lora: Path | None):
            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                base.gguf,
                "--port",
                str(port),
                "--n_ctx",
                "2048",
                "--model_alias",
                "theirs",
            ]
            if lora:
                cmd += ["--lora_path", str(lora)]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ready = wait_ready(f"http://127.0.0.1:{port}/v1/models", proc)
            return proc, f"http://127.0.0.1:{port}/v1", ready

        theirs, turl, _ = start_theirs(adapter_gguf)
        try:
            results["theirs_adapter"] = median_run(turl, "theirs", args.max_tokens)
            results["theirs_4_clients_tps"] = round(concurrent_throughput(turl, "theirs", args.max_tokens), 1)
        finally:
            theirs.terminate()
            theirs.wait(30)
        reloads = []
        for name in names[1:4]:  # their only way to change adapter: start again with another --lora_path
            proc, _, seconds = start_theirs(home / "adapters" / name / "v1" / "adapter.gguf")
            reloads.append(seconds * 1000)
            proc.terminate()
            proc.wait(30)
        results["theirs_adapter_change_ms_p50"] = round(statistics.median(reloads), 1)

    ours_a, theirs_a = results["ours_adapter"], results["theirs_adapter"]
    results["ratios"] = {
        "decode_tps_ours_over_theirs": round(ours_a["decode_tps"] / theirs_a["decode_tps"], 3),
        "ttft_theirs_over_ours": round(theirs_a["ttft"] / ours_a["ttft"], 3),
        "adapter_decode_overhead": round(1 - ours_a["decode_tps"] / results["ours_base"]["decode_tps"], 3),
        "throughput_4_clients_ours_over_theirs": round(
            results["ours_4_clients_tps"] / results["theirs_4_clients_tps"], 3
        ),
    }
    (out_dir / "serving.json").write_text(json.dumps(results, indent=2))
    switch = results["ours_switch_ms"]
    rows = [
        ("decode tok/s, adapter applied", f"{ours_a['decode_tps']:.1f}", f"{theirs_a['decode_tps']:.1f}"),
        ("time to first token, ms", f"{ours_a['ttft'] * 1000:.0f}", f"{theirs_a['ttft'] * 1000:.0f}"),
        ("decode tok/s, bare base", f"{results['ours_base']['decode_tps']:.1f}", "-"),
        (
            "adapter switch, request p50 / p95 ms",
            f"{switch['switching_request_p50']} / {switch['switching_request_p95']}",
            f"{results['theirs_adapter_change_ms_p50']} (restart)",
        ),
        (
            "llama_set_adapters_lora + cache reset p50 / p95, ms (at most)",
            f"{switch['set_adapters_p50_at_most']} / {switch['set_adapters_p95_at_most']}",
            "-",
        ),
        (
            "switch cost over a cached same-adapter request (prompt re-evaluated), ms",
            f"{results['ours_switch_ms']['switch_cost_p50']}",
            "-",
        ),
        ("4 concurrent clients, tok/s", f"{results['ours_4_clients_tps']}", f"{results['theirs_4_clients_tps']}"),
        ("RSS MB: base / +1 adapter / +10 adapters", " / ".join(str(v) for v in results["ours_rss_mb"].values()), "-"),
    ]
    table = "| measure | scalpel | llama_cpp.server |\n| --- | --- | --- |\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows
    )
    (out_dir / "serving.md").write_text(table + "\n\nratios: " + json.dumps(results["ratios"]) + "\n")
    print(table)
    print("ratios:", json.dumps(results["ratios"]))


if __name__ == "__main__":
    main()
