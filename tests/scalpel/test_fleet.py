"""`scalpel serve --replicas 2` on a local Ray cluster: the openai client gets the single server's answers and
errors, a promote or a rollback reaches both replicas at once, and a killed replica loses no queued request."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from core import model_store
from core.errors import ScalpelError
from scalpel.cli.main import build_parser, main
from scalpel.demo import BackgroundServer
from scalpel.fleet import FleetSettings, check, start, stop
from scalpel.serve import ServeSettings
from serving.app import create_app
from serving.engine import Engine
from serving.settings import EngineSettings
from tests.tiny_models import registered_home

# Looked up, not imported: the fleet sets Ray's loopback mode before Ray is first imported.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="the fleet needs the `fleet` extra: pip install -e '.[fleet]'"
)
ROOT = Path(__file__).resolve().parents[2]
HI = [{"role": "user", "content": "hi"}]
NO_END = {"0": -100, "1": -100, "2": -100}  # the tiny tokenizer's special tokens: an answer runs to max_tokens
ENGINE = {"slots": 1, "threads": 1}  # one request decoded at a time: the others wait in line
T = TypeVar("T")
MAX_ADAPTERS = 2  # per replica; the store holds four versions


def lora(model_dir: Path, out: Path, seed: int) -> Path:
    """A random PEFT LoRA (non-zero A and B), so each one changes the tiny model's answers."""
    torch.manual_seed(seed)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    """The tiny base with alpha (v1 live, v2 stored), beta and gamma (v1), in a home every replica reads.
    Only the kill test asks for gamma, so one replica alone holds it."""
    with registered_home(tmp_path_factory.mktemp("fleet-home"), tiny_llama) as home:
        for name, seed, promote in (("alpha", 0, True), ("beta", 1, True), ("alpha", 2, False), ("gamma", 3, True)):
            folder = lora(tiny_llama, home / f"lora-{name}-{seed}", seed)
            flags = [] if promote else ["--no-promote"]
            assert main(["adapters", "import", name, str(folder), "--base", "tiny", *flags]) == 0
        yield home


@pytest.fixture(scope="module")
def single(store):
    """The single server on the same settings: what every fleet answer must equal."""
    engine = Engine(model_store.get("tiny"), EngineSettings(**ENGINE))
    with BackgroundServer(create_app(engine)) as server:
        yield openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    engine.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet(store):
    settings = ServeSettings(model="tiny", port=_free_port(), **ENGINE)
    running = start(settings, FleetSettings(replicas=2, cpus_per_replica=1, max_adapters_per_replica=MAX_ADAPTERS))
    try:
        yield running
    finally:
        stop(local=running.local)


@pytest.fixture()
def client(fleet):
    return openai.OpenAI(base_url=fleet.base_url, api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, model: str, max_tokens: int = 12, **extra) -> str:
    reply = client.chat.completions.create(
        model=model, messages=HI, temperature=0, max_tokens=max_tokens, extra_body=extra or None
    )
    return reply.choices[0].message.content or ""


def until_both(ask: Callable[[], tuple[str, T]], tries: int = 60) -> dict[str, T]:
    """Ask until both replicas have answered (Ray spreads idle traffic at random); replica id -> an answer."""
    answers: dict[str, T] = {}
    for _ in range(tries):
        replica, answer = ask()
        answers.setdefault(replica, answer)
        if len(answers) == 2:
            return answers
    raise AssertionError(f"only replicas {sorted(answers)} answered in {tries} requests")


def test_the_openai_client_gets_the_single_servers_answers(client, single):
    answers = {}
    for model in ("tiny", "alpha", "beta"):
        expected = answers[model] = chat(single, model)
        assert chat(client, model) == expected, model
        stream = client.chat.completions.create(model=model, messages=HI, temperature=0, max_tokens=12, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected, model
    assert len(set(answers.values())) == 3, "the adapters must change the answer for this test to mean anything"
    done = client.completions.create(model="alpha", prompt="FOR TWO", temperature=0, max_tokens=8)
    assert (
        done.choices[0].text
        == single.completions.create(model="alpha", prompt="FOR TWO", temperature=0, max_tokens=8).choices[0].text
    )
    assert {"tiny", "alpha", "beta", "alpha@v2"} <= {m.id for m in client.models.list()}


def test_errors_are_the_single_servers(fleet, single):
    here, there = fleet.base_url, str(single.base_url).rstrip("/")
    cases = [
        ("POST", "/chat/completions", {"json": {"model": "nothing", "messages": HI}}),
        ("POST", "/chat/completions", {"json": {"model": "nothing", "messages": HI, "stream": True}}),
        ("POST", "/chat/completions", {"json": {"model": "alpha@v9", "messages": HI}}),
        ("POST", "/chat/completions", {"json": {"model": "alpha", "n": 0, "messages": HI}}),
        ("POST", "/chat/completions", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("GET", "/models/nothing", {}),
        ("POST", "/completions", {"json": {"model": "tiny", "prompt": "FOR TWO " * 3000}}),
    ]
    for method, path, kwargs in cases:
        got, expected = httpx.request(method, here + path, **kwargs), httpx.request(method, there + path, **kwargs)
        assert got.status_code == expected.status_code and got.status_code >= 400, path
        assert got.json() == expected.json() and set(got.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=here, api_key="unused", max_retries=0).chat.completions.create(
            model="nothing", messages=HI
        )


def test_a_promote_and_a_rollback_reach_both_replicas_at_once(fleet, client, single):
    """The bound is zero: each replica reads the live pointer for every request, so the first requests after
    the switch, on either replica, get the new version (no waiting anywhere in this test)."""
    root = fleet.base_url.removesuffix("/v1")
    expected = {ref: chat(single, ref) for ref in ("alpha@v1", "alpha@v2")}
    assert expected["alpha@v1"] != expected["alpha@v2"]

    def listed():
        r = httpx.get(f"{fleet.base_url}/models")
        return r.headers["x-scalpel-replica"], {m["id"]: m["adapter"] for m in r.json()["data"]}["alpha"]

    def stacked():  # routed to any replica (no model to route by), where it resolves alpha itself
        r = client.chat.completions.with_raw_response.create(
            model="tiny@base", messages=HI, temperature=0, max_tokens=12, extra_body={"adapters": [{"name": "alpha"}]}
        )
        return r.headers["x-scalpel-replica"], r.parse().choices[0].message.content

    def live_everywhere(ref: str) -> None:
        assert set(until_both(listed).values()) == {ref}
        assert set(until_both(stacked).values()) == {expected[ref]}
        assert chat(client, "alpha") == expected[ref]

    live_everywhere("alpha@v1")
    promoted = httpx.post(f"{root}/api/adapters/alpha/promote", json={"version": "v2"})
    assert promoted.status_code == 200 and promoted.json()["active_version"] == "v2"
    live_everywhere("alpha@v2")
    assert main(["adapters", "rollback", "alpha"]) == 0  # the CLI, outside the fleet, as an evening update does
    live_everywhere("alpha@v1")


def health_of(fleet, model: str) -> tuple[int, dict]:
    """/health of a replica that holds `model` (the fleet routes a GET by its `model` parameter), and its pid."""
    r = httpx.get(fleet.base_url.removesuffix("/v1") + "/health", params={"model": model})
    return int(r.headers["x-scalpel-pid"]), r.json()


def test_a_killed_replica_loses_no_request_that_had_not_started(fleet, client, single):
    expected = chat(single, "gamma", max_tokens=200, logit_bias=NO_END)
    warm = client.chat.completions.with_raw_response.create(model="gamma", messages=HI, max_tokens=1)
    victim = int(warm.headers["x-scalpel-pid"])  # it loaded gamma; Ray's routers learn it within a moment
    for _ in range(200):
        if health_of(fleet, "gamma")[0] == victim:
            break
        time.sleep(0.05)

    # A long stream runs on the replica that holds gamma; four more requests for gamma wait behind it there.
    running = client.chat.completions.with_raw_response.create(
        model="gamma", messages=HI, temperature=0, max_tokens=4000, stream=True, extra_body={"logit_bias": NO_END}
    )
    assert int(running.headers["x-scalpel-pid"]) == victim
    stream = iter(running.parse())
    assert next(stream).choices
    answers: dict[int, tuple[int, str]] = {}

    def queued(i: int) -> None:  # two whole, two streamed: none has sent a byte when the replica dies
        r = client.chat.completions.with_raw_response.create(
            model="gamma",
            messages=HI,
            temperature=0,
            max_tokens=200,
            stream=i % 2 == 1,
            extra_body={"logit_bias": NO_END},
        )
        if i % 2:
            text = "".join(c.choices[0].delta.content or "" for c in r.parse() if c.choices)  # type: ignore[union-attr]
        else:
            text = r.parse().choices[0].message.content or ""  # type: ignore[union-attr]
        answers[i] = int(r.headers["x-scalpel-pid"]), text

    waiting = [threading.Thread(target=queued, args=(i,)) for i in range(4)]
    for t in waiting:
        t.start()
    for _ in range(200):
        pid, health = health_of(fleet, "gamma")
        if pid == victim and health["queue_depth"] >= 5:
            break
        time.sleep(0.05)
    assert (pid, health["queue_depth"]) == (victim, 5), "the four requests must be in the victim's line"

    os.kill(victim, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="engine stopped"):  # it had started: it ends as an engine death does
        for _ in stream:
            pass
    for t in waiting:
        t.join(timeout=120)
    assert len(answers) == 4
    for pid, text in answers.values():
        assert pid != victim and text == expected  # answered in full by the other replica

    assert chat(client, "beta") == chat(single, "beta")  # the fleet keeps answering
    for _ in range(240):  # Ray starts a replica in the dead one's place
        pids = {
            int(httpx.get(fleet.base_url.removesuffix("/v1") + "/health").headers["x-scalpel-pid"]) for _ in range(8)
        }
        if len(pids) == 2:
            break
        time.sleep(0.5)
    assert len(pids) == 2 and victim not in pids


def test_a_client_that_leaves_stops_its_generation(fleet, client):
    reply = client.chat.completions.with_raw_response.create(
        model="beta", messages=HI, temperature=0, max_tokens=4000, stream=True, extra_body={"logit_bias": NO_END}
    )
    pid, stream = int(reply.headers["x-scalpel-pid"]), reply.parse()
    assert next(iter(stream)).choices
    stream.close()
    for _ in range(200):  # the replica's app sees the client leave and cancels the generation
        there, health = health_of(fleet, "beta")  # from a replica that holds beta, the idler first
        if there == pid and health["queue_depth"] == 0:
            break
        time.sleep(0.05)
    assert there == pid and health["queue_depth"] == 0


def test_each_replica_keeps_at_most_its_bound_of_adapters(fleet, client):
    for _ in range(2):
        for model in ("alpha@v1", "alpha@v2", "beta"):
            chat(client, model, max_tokens=1)
    root = fleet.base_url.removesuffix("/v1")

    def loaded():
        r = httpx.get(f"{root}/health")
        return r.headers["x-scalpel-replica"], len(r.json()["loaded_adapters"])

    for _ in range(100):  # what a request loaded beside the multiplexed versions is unloaded right after it
        counts = until_both(loaded)
        if max(counts.values()) <= MAX_ADAPTERS:
            break
        time.sleep(0.05)
    assert max(counts.values()) <= MAX_ADAPTERS


def test_ray_stays_on_loopback(fleet):
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]} == {"127.0.0.1"}
    assert fleet.base_url.startswith("http://127.0.0.1:")


def test_the_fleet_refuses_per_server_state():
    with pytest.raises(ScalpelError) as refused:
        check(ServeSettings(attach_on_load=True))
    assert refused.value.param == "attach_on_load"
    with pytest.raises(ScalpelError) as refused:
        check(ServeSettings(preload=["alpha"]))
    assert refused.value.param == "preload"
    with pytest.raises(ValueError):
        FleetSettings(replicas=0)
    assert main(["serve", "--replicas", "0"]) == 2  # a clear error, before anything starts
    args = build_parser().parse_args(
        ["serve", "--replicas", "3", "--ray-address", "auto", "--max-adapters-per-replica", "2"]
    )
    assert (args.replicas, args.ray_address, args.max_adapters_per_replica) == (3, "auto", 2)


def test_a_plain_server_never_imports_ray():
    code = (
        "import sys; import scalpel.cli.main, scalpel.cli.serve, scalpel.serve, scalpel.fleet, serving.fleet_routing; "
        "sys.exit('ray' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0
