"""The replay budget: bounded whatever the number of concepts, spent first on the concepts at risk."""

from __future__ import annotations

import random

import pytest

from scalpel.replay_budget import budget_replay
from training.dataset import Example


def earlier(concepts: int, per_concept: int = 4) -> list[Example]:
    return [
        Example([{"role": "user", "content": f"q{c}-{i}"}, {"role": "assistant", "content": "a"}], f"c{c:04d}", "x")
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
