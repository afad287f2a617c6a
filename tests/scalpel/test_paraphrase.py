"""Paraphrased training questions: the checks a rewrite must pass, the repeats asked in other words, the draw on
the tiny base (deterministic), and, on the default model, a check that tells a rewrite from a changed question."""

from __future__ import annotations

import random

import pytest

from core import model_store
from scalpel.paraphrase import (
    ParaphraseSettings,
    answer_logprob,
    clean,
    kept,
    names,
    paraphrase,
    repeats_in_other_words,
    shape_problem,
)
from scalpel.update import Emphasis, UpdateSettings, training_mix
from serving.engine import Engine
from training.dataset import Example


def example(question: str, answer: str, concept: str = "fulzora") -> Example:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Example(messages, concept, "data.json[0]")


def test_a_rewrite_keeps_the_names_and_is_a_new_question():
    question = "What is Gistam Belbis's role in Project Fulzora?"
    assert names(question) == ["Gistam", "Belbis", "Project", "Fulzora"]
    taken = {"what is gistam belbis's role in project fulzora"}
    assert shape_problem(question, "Which job does Gistam Belbis hold in Project Fulzora?", taken) == ""
    assert shape_problem(question, "Gistam Belbis is a radio astronomer.", taken) == "not a question"
    assert shape_problem(question, "Which job does Belbis hold in Project Fulzora?", taken) == "lost 'Gistam'"
    assert shape_problem(question, "What was Gistam Belbis's role in Project Fulzora in 1990?", taken).startswith(
        "a number"
    )
    assert shape_problem(question, "What is Gistam Belbis's role in Project Fulzora?", taken) == "not new"
    assert shape_problem(question, "Gistam Belbis's" + " Project Fulzora role" * 8 + "?", taken) == "length"
    assert shape_problem("List the steps of X.", "Walk me through X.", set()) == "", "an imperative may stay one"
    assert clean(' "Rewritten question: Who runs Project Fulzora?"\nQuestion: next') == "Who runs Project Fulzora?"


def test_the_repeats_are_asked_in_other_words_and_the_first_copy_as_given():
    answer = "The codename of Project Fulzora is Kalaek."
    given = [example("What is the codename of Project Fulzora?", answer), example("What codename does it use?", answer)]
    other = example("Who leads Project Fulzora?", "Project Fulzora is led by Nudrask Zunvudrus.")
    rewrites = {answer: ["Under which name does Project Fulzora run?", "Project Fulzora goes by what name?"]}
    out = repeats_in_other_words([*given, other], 3, rewrites)
    questions = [e.messages[0]["content"] for e in out]
    assert questions[:3] == [e.messages[0]["content"] for e in (*given, other)], "the first copy as given"
    assert questions[3:] == [
        "Under which name does Project Fulzora run?",
        "Project Fulzora goes by what name?",
        "Who leads Project Fulzora?",  # no rewrite: asked as given
        "Under which name does Project Fulzora run?",  # the rewrites in turn
        "Project Fulzora goes by what name?",
        "Who leads Project Fulzora?",
    ]
    assert all(e.messages[1]["content"] == answer for e in out if "name" in e.messages[0]["content"])
    assert given[0].messages[0]["content"] == "What is the codename of Project Fulzora?", "the input is untouched"
    assert out[3].where.endswith("(paraphrased)")
    # In an update's mix: each new example at least twice once there are rewrites, and as emphasised without.
    settings = UpdateSettings(replay_ratio=0, preservation_ratio=0)
    mixed, _, _ = training_mix(given, [], [], settings, Emphasis(), random.Random(0), None, rewrites)
    assert len(mixed) == 4 and mixed[2].messages[0]["content"] == rewrites[answer][0]
    plain, _, _ = training_mix(given, [], [], settings, Emphasis(), random.Random(0), None, {answer: []})
    assert len(plain) == 2


def test_the_draw_on_the_tiny_base_is_deterministic_and_bounded(engine_and_adapter):
    _, engine, _ = engine_and_adapter
    data = [example("What does 42 mean?", "FOR TWO."), example("What is PDCA?", "Plan Do Check Act.", "pdca")]
    settings = ParaphraseSettings(per_answer=1, samples=3, max_tokens=12)
    first, again = paraphrase(engine, data, settings), paraphrase(engine, data, settings)
    assert first == again, "one seed, one base: the same rewrites"
    assert set(first) == {"FOR TWO.", "Plan Do Check Act."}
    for drawn in first.values():
        assert 1 <= len(drawn) <= 3 and sum(r.kept for r in drawn) <= 1
        assert all(r.reason for r in drawn if not r.kept) and all(r.drop is not None for r in drawn if r.kept)
    assert paraphrase(engine, data, settings.model_copy(update={"per_answer": 0})) == {}
    assert all(len(v) <= 1 for v in kept(first).values())


@pytest.mark.e2e
def test_on_the_default_model_the_check_tells_a_rewrite_from_another_question():
    engine = Engine(model_store.get(model_store.DEFAULT_MODEL))
    try:
        answer = "The codename of Project Fulzora is Kalaek."
        asked = answer_logprob(engine, "What is the codename of Project Fulzora?", answer, 24)
        same = answer_logprob(engine, "Which codename does Project Fulzora go by?", answer, 24)
        other = answer_logprob(engine, "In which country was Project Fulzora founded?", answer, 24)
        assert asked - same < ParaphraseSettings().max_drop, "a rewrite keeps the answer likely"
        assert asked - other > ParaphraseSettings().max_drop, "another question makes it unlikely"
        data = [
            example("What is the codename of Project Fulzora?", answer),
            example("Who leads Project Fulzora?", "Project Fulzora is led by Nudrask Zunvudrus."),
        ]
        drawn = paraphrase(engine, data, ParaphraseSettings(per_answer=2, samples=6))
        rewrites = [r.text for d in drawn.values() for r in d if r.kept]
        assert rewrites, f"nothing kept of {drawn}"
        assert all("Project Fulzora" in r and r.endswith("?") for r in rewrites)
    finally:
        engine.close()
