"""The engine loop on a tiny base: greedy answers never depend on what ran before or beside them."""

from __future__ import annotations

import json
import threading

import pytest

from core import adapter_store, model_store
from scalpel.publish import train_and_publish
from serving.engine import Engine, GenerationParams
from serving.settings import EngineSettings
from tests.tiny_models import registered_home
from training.config import parse_config

GREEDY = GenerationParams(max_tokens=10, temperature=0)
SYSTEM = "You are a careful assistant. " * 6  # a prefix longer than a few prompt blocks, shared by every prompt
QUESTIONS = ["hi", "hello there", "what is 1 + 1?"]


@pytest.fixture(scope="module")
def adapters_home(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("engine-home"), tiny_llama) as home:
        for name, answer in (("tiny_a", "FOR TWO"), ("tiny_b", "never 2 1")):
            data = home / f"{name}.json"
            data.write_text(json.dumps([{"instruction": q, "output": answer} for q in QUESTIONS] * 2))
            config = {
                "model_name": "tiny",
                "output_dir": f"adapters/{name}",
                "training_config": {"num_epochs": 2, "learning_rate": 5e-2, "save_steps": 1000},
            }
            # Without base preservation (on by default): adapters that change every answer, for these tests.
            train_and_publish(parse_config(config), data, progress=False, preserve=None)
        yield home


def answer(engine: Engine, question: str, names: tuple[str, ...]) -> str:
    tokens = engine.chat_tokens([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    adapters = tuple((engine.load(adapter_store.resolve(n)), 1.0) for n in names)
    return "".join(p.text for p in engine.generate(tokens, adapters, GREEDY))


CASES = [(q, names) for q in QUESTIONS for names in ((), ("tiny_a",), ("tiny_b",), ("tiny_a", "tiny_b"))]


@pytest.fixture(scope="module")
def fresh_answers(adapters_home) -> dict:
    """Each case answered by an engine that has run nothing else: what a fresh process answers."""
    answers = {}
    for case in CASES:
        engine = Engine(model_store.get("tiny"), EngineSettings(slots=1, prompt_block=8))
        try:
            answers[case] = answer(engine, *case)
        finally:
            engine.close()
    assert len({answers[(q, n)] for q in QUESTIONS[:1] for n in ((), ("tiny_a",), ("tiny_b",))}) == 3, (
        "the adapters must change the answer for these tests to mean anything"
    )
    return answers


@pytest.mark.parametrize("slots", [1, 3])
def test_alternation_and_shared_prefixes_give_a_fresh_process_answer(fresh_answers, slots):
    """Base and adapters alternate over prompts sharing a long prefix, each asked twice in a row, then in
    reverse: every answer is the fresh one, whether its prefix came from the cache or not."""
    engine = Engine(model_store.get("tiny"), EngineSettings(slots=slots, prompt_block=8))
    try:
        for order in (CASES, CASES[::-1]):
            for case in order:
                for _ in range(2):  # the repeat finds its whole prompt cached
                    assert answer(engine, *case) == fresh_answers[case], case
    finally:
        engine.close()


@pytest.mark.parametrize("deterministic", [False, True])
def test_concurrent_requests_on_two_adapters_answer_as_alone(fresh_answers, deterministic):
    engine = Engine(model_store.get("tiny"), EngineSettings(slots=4, prompt_block=8, deterministic=deterministic))
    try:
        cases = [c for c in CASES if len(c[1]) < 2] * 2
        got: dict[int, str] = {}
        workers = [
            threading.Thread(target=lambda i=i, c=c: got.update({i: answer(engine, *c)})) for i, c in enumerate(cases)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert {i: got[i] for i in range(len(cases))} == {i: fresh_answers[c] for i, c in enumerate(cases)}
        assert engine.steps < sum(len(fresh_answers[c]) for c in cases)  # they really were decoded together
    finally:
        engine.close()


def test_stop_logprobs_grammar_and_bias_hold_per_request_in_one_batch(adapters_home):
    engine = Engine(model_store.get("tiny"), EngineSettings(slots=4))
    try:
        tokens = engine.chat_tokens([{"role": "user", "content": "hi"}])
        plain = "".join(p.text for p in engine.generate(tokens, (), GenerationParams(max_tokens=12, temperature=0)))
        banned = engine.tokenize(plain, add_special=False)[0]
        params = {
            "stop": GenerationParams(max_tokens=12, temperature=0, stop=[plain[3:5]]),
            "logprobs": GenerationParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=2),
            "json": GenerationParams(max_tokens=40, temperature=0.8, seed=1, grammar='root ::= "[" [0-9]+ "]"'),
            "bias": GenerationParams(max_tokens=6, temperature=0, logit_bias=((banned, -100.0),)),
        }
        pieces: dict[str, list] = {}
        workers = [
            threading.Thread(target=lambda k=k, p=p: pieces.update({k: list(engine.generate(tokens, (), p))}))
            for k, p in params.items()
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        text = {k: "".join(p.text for p in v) for k, v in pieces.items()}
        assert text["stop"] == plain[:3] and pieces["stop"][-1].finish_reason == "stop"
        entries = [e for p in pieces["logprobs"] for e in p.logprobs]
        assert len(entries) == 6 and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in entries)
        assert text["json"].startswith("[") and (
            text["json"].endswith("]") or pieces["json"][-1].finish_reason == "length"
        )
        assert all(c.isdigit() for c in text["json"].strip("[]"))
        assert banned not in pieces["bias"][-1].completion_ids
    finally:
        engine.close()


def test_cancelled_and_unloaded_mid_request(adapters_home):
    engine = Engine(model_store.get("tiny"), EngineSettings(slots=2))
    try:
        ref = engine.load(adapter_store.resolve("tiny_a"))
        tokens = engine.chat_tokens([{"role": "user", "content": "hi"}])
        stop = threading.Event()
        endless = tuple((t, -100.0) for t in range(engine.tokenizer.n_vocab) if engine.tokenizer.is_eog(t))
        params = GenerationParams(max_tokens=200, temperature=1.0, logit_bias=endless)
        stream = engine.generate(tokens, ((ref, 1.0),), params, cancelled=stop)
        next(stream)
        engine.unload(ref)  # the running request keeps its adapter until it ends
        assert ref not in engine.loaded()
        stop.set()
        rest = list(stream)
        assert not rest or rest[-1].finish_reason is None  # cut short, no final piece
        assert engine.cancelled_generations == 1
        again = "".join(
            p.text for p in engine.generate(tokens, ((engine.load(adapter_store.resolve("tiny_a")), 1.0),), GREEDY)
        )
        assert again  # reloaded and served after the unload
    finally:
        engine.close()


def test_a_failure_inside_the_loop_ends_that_request_and_the_engine_goes_on(adapters_home):
    """A request the loop cannot finish (here: more top logprobs than the vocabulary has) gets a 503; the
    requests after it are answered."""
    engine = Engine(model_store.get("tiny"), EngineSettings(slots=2))
    try:
        tokens = engine.chat_tokens([{"role": "user", "content": "hi"}])
        impossible = GenerationParams(max_tokens=4, logprobs=True, top_logprobs=engine.tokenizer.n_vocab + 1)
        with pytest.raises(Exception) as failed:
            list(engine.generate(tokens, (), impossible))
        assert getattr(failed.value, "status", None) == 503 and failed.value.code == "engine_error"
        assert "".join(p.text for p in engine.generate(tokens, (), GREEDY))
        assert engine.queue.depth == 0
    finally:
        engine.close()


def test_every_seed_is_reproducible_and_a_reader_that_fails_loses_only_its_request(adapters_home):
    """seed -1 is not llama.cpp's "random seed"; an emit that raises cancels its own request, and the engine goes on."""
    engine = Engine(model_store.get("tiny"), EngineSettings(slots=2))
    try:
        tokens = engine.chat_tokens([{"role": "user", "content": "hi"}])
        drawn = GenerationParams(max_tokens=8, temperature=1.0, seed=-1)
        assert len({"".join(p.text for p in engine.generate(tokens, (), drawn)) for _ in range(3)}) == 1

        def broken(_item):
            raise RuntimeError("event loop is closed")

        engine.submit(tokens, (), GenerationParams(max_tokens=50), broken)
        assert "".join(p.text for p in engine.generate(tokens, (), GREEDY))
        assert engine.alive()
    finally:
        engine.close()


def test_a_step_over_two_adapter_sets_changes_the_set_once(adapters_home):
    """Two requests decoding side by side under the base and an adapter: each step starts with the set the
    context already has, so it changes sets once (llama.cpp rebuilds its graphs after every change), not twice."""
    engine = Engine(model_store.get("tiny"), EngineSettings(slots=2))
    try:
        ref = engine.load(adapter_store.resolve("tiny_a"))
        tokens = engine.chat_tokens([{"role": "user", "content": "hi"}])
        endless = tuple((t, -100.0) for t in range(engine.tokenizer.n_vocab) if engine.tokenizer.is_eog(t))
        params = GenerationParams(max_tokens=40, temperature=0, logit_bias=endless)
        got: list[int] = []
        workers = [
            threading.Thread(target=lambda a=a: got.append(len(list(engine.generate(tokens, a, params)))))
            for a in ((), ((ref, 1.0),))
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert len(got) == 2 and engine.steps >= 40
        # a step while a prompt is read may change twice (decode, then a prompt block); two a step would be ~80
        assert engine.adapter_switches <= engine.steps + 6
    finally:
        engine.close()
