"""Benchmark the serving fleet (`scalpel serve --replicas N`, Ray Serve) against one plain `scalpel serve`, in one
run on this machine, and predict on paper what N machines would serve.

Measured with the same concurrent clients for each server (end-of-generation tokens banned, so every answer has
its length): aggregate completion tokens/s on the base, the same over the base and 2 adapters, and 1-token
requests/s (what one request costs besides decoding: the fleet adds the ingress hop through Ray).

    .venv/bin/python bench/fleet.py [--threads 2] [--clients 8] [--model NAME] [--out bench/results]

One replica gets every thread; two replicas get half each, so both use the same cores. Results:
bench/results/fleet.json and fleet.md, with the prediction and its assumptions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving import base_eog_tokens, free_port, make_adapters  # noqa: E402

QUESTION = [{"role": "user", "content": "Explain in detail how a lighthouse works, step by step."}]
START_S = 600  # a fleet starts Ray, then every replica loads the base
STOP_S = 90


class Running:
    """A `scalpel serve` process (plain or fleet) in a session of its own, so stopping it stops Ray too."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "scalpel.cli", "serve", "--port", str(self.port), *args]
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{' '.join(cmd)} exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{' '.join(cmd)} not ready in {START_S} s:\n{log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the fleet takes Ray Serve and its local Ray cluster down
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session this benchmark started, nothing else
                self.proc.wait(30)
        self.log.close()


def ask(url: str, model: str, max_tokens: int, bias: dict) -> int:
    body = {"model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, "logit_bias": bias}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    reply.raise_for_status()
    return reply.json()["usage"]["completion_tokens"]


def aggregate(url: str, models: list[str], clients: int, rounds: int, max_tokens: int, bias: dict) -> float:
    """Completion tokens per second of `clients` concurrent clients, each asking `rounds` times; client i asks
    models[i % len(models)]. A first round warms every slot and every adapter."""

    def one(i: int) -> int:
        return ask(url, models[i % len(models)], max_tokens, bias)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
        started = time.perf_counter()
        tokens = sum(pool.map(one, range(rounds * clients)))
    return round(tokens / (time.perf_counter() - started), 1)


def requests_per_s(url: str, model: str, clients: int, n: int, bias: dict) -> float:
    """1-token requests per second with `clients` concurrent clients: the per-request cost of the path."""
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: ask(url, model, 1, bias), range(clients)))
        started = time.perf_counter()
        list(pool.map(lambda _: ask(url, model, 1, bias), range(n)))
    return round(n / (time.perf_counter() - started), 1)


def measure(url: str, base: str, adapters: list[str], args, bias: dict) -> dict:
    return {
        "base_tps": aggregate(url, [base], args.clients, args.rounds, args.max_tokens, bias),
        "mixed_tps": aggregate(url, [base, *adapters], args.clients, args.rounds, args.max_tokens, bias),
        "one_token_rps": requests_per_s(url, base, args.clients, 8 * args.clients, bias),
    }


def prediction(r: dict) -> dict:
    """What N machines like this one would serve, from the measured numbers, and on which assumptions."""
    one, plain = r["fleet_1"], r["plain"]
    per_machine = one["mixed_tps"]
    tokens_per_request = r["max_tokens"]
    # The ingress forwards every request and every streamed chunk; its ceiling in requests/s is at least what
    # it forwarded here (the replicas were the limit), so the prediction caps N by it.
    ingress_rps = max(one["one_token_rps"], r["fleet_2"]["one_token_rps"])
    machines = [1, 2, 4, 8, 16]
    return {
        "per_machine_tps": per_machine,
        "fleet_overhead": round(1 - one["mixed_tps"] / plain["mixed_tps"], 3) if plain["mixed_tps"] else None,
        "ingress_requests_per_s_at_least": ingress_rps,
        "predicted_tps": {n: round(min(n * per_machine, ingress_rps * tokens_per_request), 1) for n in machines},
        "assumptions": [
            "each machine is like this one and runs one replica on all its cores (`--cpus-per-replica` = cores)",
            "decoding is bound by each machine's own cores and memory bandwidth, so machines add up linearly",
            "enough concurrent clients to fill every replica's slots, spread over base and adapters",
            "each adapter's requests stay on the replicas that hold it (multiplexing), so no replica reloads "
            "adapters in a loop: at most --max-adapters-per-replica hot adapters per replica",
            "one ingress replica forwards every request: the prediction is capped by the request rate it "
            "reached here times the tokens per request (run more ingress replicas beyond that)",
            "the network between machines adds little next to the time a request spends decoding",
            "the shared SCALPEL_HOME is read once per request (a small pointer file): not a bottleneck",
        ],
    }


def table(r: dict) -> str:
    rows = [
        ("aggregate tok/s, base", "base_tps"),
        ("aggregate tok/s, base + 2 adapters", "mixed_tps"),
        ("1-token requests/s", "one_token_rps"),
    ]
    names = {"plain": "plain server", "fleet_1": "fleet, 1 replica", "fleet_2": "fleet, 2 replicas"}
    threads = {"plain": r["threads"], "fleet_1": r["threads"], "fleet_2": max(r["threads"] // 2, 1)}
    lines = [
        f"{r['clients']} concurrent clients, {r['max_tokens']} tokens per answer, model {r['model']}, "
        f"{r['slots']} slots per replica",
        "",
        "| measure | " + " | ".join(f"{names[k]} ({threads[k]} threads each)" for k in names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    lines += [f"| {label} | " + " | ".join(str(r[k][key]) for k in names) + " |" for label, key in rows]
    p = r["prediction"]
    lines += [
        "",
        f"2 replicas / 1 replica on this machine: {r['two_over_one']}x (base + 2 adapters)",
        "",
        "Prediction for N machines like this one (one replica each, all cores):",
        "",
        "| machines | predicted aggregate tok/s |",
        "| --- | --- |",
        *[f"| {n} | {tps} |" for n, tps in p["predicted_tps"].items()],
        "",
        "Assumptions:",
        *[f"- {a}" for a in p["assumptions"]],
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="all the cores the servers use")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, after a warm-up round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--model", help="a registered base (default: the default model)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    half = max(args.threads // 2, 1)
    results: dict = {k: getattr(args, k) for k in ("threads", "clients", "rounds", "max_tokens", "slots")}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "SCALPEL_HOME": str(home)}
        os.environ["SCALPEL_HOME"] = str(home)
        from core import model_store

        default = model_store.ensure_default()
        base = model_store.get(args.model) if args.model else default
        adapters = make_adapters(home, 2) if base.name == default.name else []
        results["model"] = base.name
        bias = {str(t): -100 for t in base_eog_tokens(base)}
        common = ["--model", base.name, "--slots", str(args.slots)]
        configs = {
            "plain": [*common, "--threads", str(args.threads)],
            "fleet_1": [*common, "--replicas", "1", "--cpus-per-replica", str(args.threads)],
            "fleet_2": [*common, "--replicas", "2", "--cpus-per-replica", str(half)],
        }
        for key, flags in configs.items():
            server = Running(flags, env, home / f"{key}.log")
            try:
                results[key] = measure(server.url, base.name, adapters, args, bias)
            finally:
                server.stop()
            print(key, results[key], flush=True)
    results["two_over_one"] = (
        round(results["fleet_2"]["mixed_tps"] / results["fleet_1"]["mixed_tps"], 2)
        if results["fleet_1"]["mixed_tps"]
        else None
    )
    results["prediction"] = prediction(results)
    (out_dir / "fleet.json").write_text(json.dumps(results, indent=2))
    (out_dir / "fleet.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
