"""The replay budget: bounded whatever the number of concepts, spent first on the concepts at risk."""

from __future__ import annotations

import random

import pytest

from scalpel.replay_budget import budget_replay
from training.dataset import Example


def earlier(concepts: int, per_concept: int = 4) -> list[Example]:
    return [
        Example([{"role": "user", "content": f"q{c}-{i}"}, {"role": "assistant", "content": f"a{i}"}], f"c{c:04d}", "x")
        for c in range(concepts)
        for i in range(per_concept)
    ]


def draw(examples, budget=24, risk=None, seed=0, **kw):
    kw = {"risk_margin": 2.0, "per_risky": 3, **kw}
    return budget_replay(examples, budget, risk if risk is not None else {}, rng=random.Random(seed), **kw)


@pytest.mark.parametrize("concepts", [1, 10, 100, 1000])
def test_the_sample_never_exceeds_the_budget(concepts):
    pool = earlier(concepts)
    safe = {f"c{c:04d}": 9.0 for c in range(concepts)}
    sample = draw(pool, risk=safe)
    assert len(sample) == min(24, len(pool))
    assert len({id(e) for e in sample}) == len(sample)  # no example twice
    everyone_at_risk = draw(pool, risk={})  # never checked: every concept counts as at risk
    assert len(everyone_at_risk) == min(24, len(pool))


def test_concepts_at_risk_come_first_thinnest_first():
    pool = earlier(100)
    risk = {f"c{c:04d}": 9.0 for c in range(100)} | {"c0042": 0.0, "c0007": 1.5, "c0099": 0.5}
    sample = draw(pool, risk=risk)
    assert [e.concept for e in sample[:9]] == ["c0042"] * 3 + ["c0099"] * 3 + ["c0007"] * 3
    rest = [e.concept for e in sample[9:]]
    assert len(rest) == 15 and len(set(rest)) == 15  # then one example each from 15 other concepts
    assert not {"c0042", "c0099", "c0007"} & set(rest)


def test_the_rotation_is_seeded_and_reaches_every_concept():
    pool = earlier(100)
    safe = {f"c{c:04d}": 9.0 for c in range(100)}
    assert [e.messages for e in draw(pool, risk=safe, seed=3)] == [e.messages for e in draw(pool, risk=safe, seed=3)]
    seen: set[str] = set()
    for evening in range(30):
        seen |= {e.concept for e in draw(pool, risk=safe, seed=evening)}
    assert len(seen) == 100  # 24 of 100 per evening, a different draw each evening


def test_a_small_pool_is_replayed_whole():
    pool = earlier(3, per_concept=2)
    assert sorted(
        e.messages[0]["content"] for e in draw(pool, risk={"c0000": 9.0, "c0001": 9.0, "c0002": 9.0})
    ) == sorted(e.messages[0]["content"] for e in pool)


def test_a_quarter_of_the_budget_stays_with_the_rotation():
    pool = earlier(100)
    risk = {f"c{c:04d}": 9.0 for c in range(50)}  # 50 safe, 50 never checked: at risk
    sample = draw(pool, budget=24, risk=risk)
    rotated = {e.concept for e in sample if risk.get(e.concept, 0.0) >= 2.0}
    assert len(sample) == 24 and len(rotated) == 24 // 4, "18 for the concepts at risk, 6 from the rotation"


def test_each_concept_gives_one_question_per_fact_the_facts_most_like_the_new_data_first():
    def example(question, answer):
        return Example([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "alder", "x")

    lead, launch, phases = (
        "Project Alder is led by Ann Vor.",
        "Project Alder was launched in 1999.",
        "Project Alder has three phases: 1. Dig.",
    )
    old_project = [
        example("Who leads Project Alder?", lead),
        example("Who is in charge of Project Alder?", lead),
        example("When was Project Alder launched?", launch),
        example("In which year was Project Alder launched?", launch),
        example("What are the phases of Project Alder?", phases),
        example("List the phases of Project Alder.", phases),
    ]
    new = [example("What are the phases of Project Birch?", "Project Birch has four phases: 1. Sow.")]
    for seed in range(5):  # whatever the seed: the phases first (asked and answered alike), then the other facts
        sample = budget_replay(old_project, 3, {}, risk_margin=2.0, per_risky=3, rng=random.Random(seed), new=new)
        answers = [e.messages[1]["content"] for e in sample]
        assert answers[0] == phases and sorted(answers) == sorted([lead, launch, phases]), "one question per fact"
    without = {
        budget_replay(old_project, 1, {}, risk_margin=2.0, per_risky=1, rng=random.Random(s))[0].messages[1]["content"]
        for s in range(12)
    }
    assert len(without) > 1, "without new data: a seeded draw of the facts, not always the same one"


def test_a_concept_at_risk_gives_one_example_per_fact_never_more_than_it_has_facts():
    two_facts = [
        Example([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"fact {i % 2}"}], "small", "x")
        for i in range(6)
    ]
    safe = earlier(20, per_concept=1)
    risk = {f"c{c:04d}": 9.0 for c in range(20)}  # "small" is missing: never checked, so at risk
    sample = draw(two_facts + safe, budget=12, risk=risk, per_risky=5)
    small = [e.messages[1]["content"] for e in sample if e.concept == "small"]
    assert sorted(small) == ["fact 0", "fact 1"], "both facts once, not five of six examples"
    assert len(sample) == 12 and len({e.concept for e in sample}) == 11, "the rest of the budget to the rotation"
