"""The evaluation harness on a tiny base: suites scored through llama.cpp, base regression, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import ScalpelError
from scalpel import evaluate
from scalpel.cli.main import main


def test_items_pass_on_required_and_forbidden_phrases():
    item = evaluate.EvalItem(question="q", required=["for two", "42"], match="any", forbidden=["to one"])
    assert item.passes("42 means FOR TWO") and item.passes("FOR TWO")
    assert not item.passes("nothing here") and not item.passes("FOR TWO, never TO ONE")
    assert not evaluate.EvalItem(question="q", required=["a", "b"]).passes("only a")


def test_bad_suites_name_the_item(tmp_path):
    bad = tmp_path / "suite.json"
    bad.write_text(json.dumps([{"question": "ok", "required": ["x"]}, {"question": "no phrases"}]))
    with pytest.raises(ScalpelError, match=r"suite.json\[1\]"):
        evaluate.load_suite(bad)
    bad.write_text(json.dumps([{"question": "q", "required": ["x"], "match": "most"}]))
    with pytest.raises(ScalpelError) as err:
        evaluate.load_suite(bad)
    assert err.value.param.endswith("[0].match")


def test_score_agrees_with_what_generation_picks(engine_and_adapter):
    """Teacher-forced greedy choices along the base's own greedy answer are that answer."""
    _, engine, _ = engine_and_adapter
    reference = evaluate.base_reference(engine, ["What does 42 mean?", "Say hello."])
    assert all(ref["answer_ids"] and ref["base_choices"] == ref["answer_ids"] for ref in reference)
    result = evaluate.base_regression(engine, (), reference, text="The quick brown fox jumps over the lazy dog.")
    assert result.agreement == 1.0 and all(p["first_divergence"] is None for p in result.per_prompt)
    assert result.perplexity == result.perplexity_base and np.isfinite(result.perplexity)


def test_questions_asked_all_at_once_get_the_answers_asked_one_by_one(engine_and_adapter):
    """ask_all keeps as many generations in flight as the engine has slots (more questions than slots here), and
    each answer is the one a lone ask() gives, in the questions' order, with the adapter and without."""
    _, engine, adapters = engine_and_adapter
    questions = [f"What does {n} mean?" for n in (42, 7, 1, 2, 11, 4, 8)] + ["Say hello.", "Name a colour."]
    assert len(questions) > engine.settings.slots
    for applied in ((), adapters):
        alone = [evaluate.ask(engine, applied, q, 24) for q in questions]
        assert evaluate.ask_all(engine, applied, questions, 24) == alone
    assert evaluate.ask_all(engine, adapters, []) == []
    # A question that cannot be asked (longer than the context) fails the call, and the answers still running
    # are cancelled and leave the engine's line: nothing is left waiting.
    too_long = "Why? " * engine.n_ctx
    with pytest.raises(ScalpelError):
        evaluate.ask_all(engine, adapters, questions[:3] + [too_long] + questions[3:])
    assert engine.queue.depth == 0


def test_adapter_is_scored_as_served(engine_and_adapter, tmp_path):
    home, engine, adapters = engine_and_adapter
    suite = [
        evaluate.EvalItem(question="What does 42 mean?", concept="42", required=["FOR TWO"]),
        evaluate.EvalItem(question="What does 42 mean?", concept="never", required=["never 2 1"]),
    ]
    report = evaluate.evaluate(engine, adapters, {"facts": suite}, "fortwo@v1")
    facts = report.suites[0]
    assert facts.per_concept == {"42": 1.0, "never": 0.0} and facts.accuracy == 0.5
    assert "FOR TWO" in facts.answers[0]["answer"]
    # The adapter drags every answer to FOR TWO: the base's answers are no longer what it picks.
    assert report.base.agreement < 0.9 and report.base.agreement_all_positions < 0.9
    assert report.base.perplexity != report.base.perplexity_base  # a random base: only that it moved
    assert (home / ".scalpel" / "references").is_dir(), "the base's reference answers are cached"
    assert "facts: 50% (1/2)" in report.as_text()
    png = report.plot(tmp_path / "eval.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_agreement_counts_only_where_the_base_is_decided(engine_and_adapter):
    _, engine, adapters = engine_and_adapter
    reference = evaluate.base_reference(engine, ["What does 42 mean?", "Say hello."])
    text = "The quick brown fox jumps over the lazy dog."
    undecided = [{**ref, "base_margins": [0.0] * len(ref["base_margins"])} for ref in reference]
    result = evaluate.base_regression(engine, adapters, undecided, text=text)
    assert result.decided_share == 0.0 and result.agreement == 1.0, "near-ties are not counted"
    assert result.agreement_all_positions < 0.9, "but they are reported"
    decided = [{**ref, "base_margins": [evaluate.DECIDED_MARGIN] * len(ref["base_margins"])} for ref in reference]
    result = evaluate.base_regression(engine, adapters, decided, text=text)
    assert result.decided_share == 1.0 and result.agreement == result.agreement_all_positions < 0.9


def test_eval_cli_writes_json_and_png(engine_and_adapter, tmp_path, capsys):
    suite = tmp_path / "facts.json"
    suite.write_text(json.dumps([{"question": "What does 42 mean?", "concept": "42", "required": ["FOR TWO"]}]))
    assert main(["eval", "fortwo", "--suite", str(suite), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "evaluation of fortwo@v1" in printed and "facts: 100% (1/1)" in printed and "base regression" in printed
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["suites"]["facts"]["per_concept"] == {"42": 1.0}
    assert (tmp_path / "out" / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "general questions:" in printed, "what is left of the base, beside the suites"
    # Trained without a suite, the version keeps one derived from its training data: there is always one to ask.
    assert main(["eval", "fortwo", "--no-regression"]) == 0
    printed = capsys.readouterr().out
    assert "facts.derived: 100% (1/1)" in printed and "base regression" not in printed
    assert main(["eval", "tiny", "--no-regression"]) == 2  # a bare base has no suites stored
    assert "nothing to evaluate" in capsys.readouterr().err


def test_key_facts_are_the_distinctive_words_of_the_first_sentence():
    facts = evaluate.key_facts
    assert facts("What does 42 mean?", "42 = FOR TWO. Life, the universe and everything.") == ["FOR TWO"], (
        "what the question says is not a fact; the first sentence is"
    )
    assert facts("What is the capital of France?", "The capital of France is Paris.") == ["Paris"]
    assert facts("Who wrote Hamlet?", "William Shakespeare wrote it in 1600.") == ["1600", "William Shakespeare"], (
        "numbers first, then a run of capitalised words (a first word only with the next one)"
    )
    assert facts("What does 'Never 2 1' mean?", "Never 2 1 means never TO ONE: never in isolation.") == [
        "TO ONE",
        "isolation",
    ]
    assert facts("What is 2 + 2?", "2 + 2 = 4.") == ["4"]
    assert facts("Why?", "Because. Collaboration multiplies results.") == ["Collaboration", "multiplies"], (
        "a first sentence without facts: the whole answer"
    )
    assert facts("Why document?", "Documentation preserves learning.") == ["Documentation", "preserves"], (
        "a sentence's capitalised first word alone is a plain word, long words longest first"
    )
    assert facts("Add?", "def add(a, b):\n    return a + b") == [] and facts("Is it?", "Yes.") == []
    assert facts("Whose?", "TRON's plan.") == ["TRON"], "a possessive is dropped"


def test_a_derived_suite_asks_every_concept_before_any_twice():
    from training.dataset import Example

    def example(concept, i, answer="It is FOR TWO."):
        messages = [{"role": "user", "content": f"{concept} question {i}?"}, {"role": "assistant", "content": answer}]
        return Example(messages, concept, f"d[{i}]")

    data = [example("big", i) for i in range(10)] + [example("small", 0), example("yes", 0, "Yes.")]
    data.append(example("big", 0))  # a question asked twice is asked once
    items = evaluate.derive_suite(data, most=4)
    assert [(i.concept, i.question) for i in items] == [
        ("big", "big question 0?"),
        ("small", "small question 0?"),
        ("big", "big question 1?"),
        ("big", "big question 2?"),
    ], "round-robin over concepts; an answer without facts gives no item"
    assert all(i.required == ["FOR TWO"] and i.match == "all" for i in items)
    assert items[0].passes("Our answer: for two.") and not items[0].passes("To one.")
    suites, name = evaluate.version_suites((), data, Path("data/facts.json"))
    assert name == "facts.derived" and [i.question for i in suites[name]][:2] == [
        "big question 0?",
        "small question 0?",
    ]


def test_general_questions_are_scored_beside_the_base(engine_and_adapter):
    home, engine, adapters = engine_and_adapter
    items = evaluate.general_questions()
    assert len(items) >= 8 and all(i.required for i in items)
    bare = evaluate.general_score(engine, ())
    assert bare.passed == bare.base_passed and bare.total == len(items), "the bare base is its own reference"
    adapted = evaluate.general_score(engine, adapters)
    # The adapter drags every answer toward FOR TWO: not one general question is answered as the base answers it.
    assert all(a["answer"] != a["base_answer"] and "FO" in a["answer"] for a in adapted.answers)
    assert [a["base_answer"] for a in adapted.answers] == [a["answer"] for a in bare.answers], "cached, the same"
    taught = [evaluate.EvalItem(question="What does 42 mean?", required=["TWO"])]
    one = evaluate.general_score(engine, adapters, taught)
    assert (one.passed, one.base_passed, one.total) == (1, 0, 1), "each answer scored, the base's beside it"
    report = evaluate.evaluate(engine, adapters, {}, "fortwo@v1")
    assert report.general is not None and report.as_dict()["general"]["total"] == len(items)
    assert f"general questions: {adapted.passed}/{len(items)} right" in report.as_text()
