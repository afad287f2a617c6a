"""Replay under a fixed budget, spent where forgetting is likeliest: an update costs the same at 100 concepts as at 10.

Replaying a few examples of every earlier concept grows with every concept learned; at the plan's 100+ concepts
it no longer fits an evening. Here the number of replayed examples is capped, and the cap is spent in order:
1. the concepts at risk: those whose answers the live version's retention check had to generate, or kept by a
   thin margin (scalpel.retention_check), thinnest first, `per_risky` examples each, within three quarters of
   the budget;
2. the rest as one example per concept, from a seeded rotation, so every concept comes round again after
   about (number of concepts / remaining budget) evenings.
"""

from __future__ import annotations

import random

from training.dataset import Example


def budget_replay(
    earlier: list[Example],
    budget: int,
    risk: dict[str, float],
    *,
    risk_margin: float,
    per_risky: int,
    rng: random.Random,
) -> list[Example]:
    """At most `budget` examples of `earlier`. `risk` maps a concept to its thinnest retention margin (logits);
    a concept below `risk_margin`, or missing from `risk` (never checked), is at risk."""
    by_concept: dict[str, list[Example]] = {}
    for example in earlier:
        by_concept.setdefault(example.concept, []).append(example)
    for pool in by_concept.values():
        rng.shuffle(pool)
    at_risk = [c for c in sorted(by_concept) if risk.get(c, 0.0) < risk_margin]
    rng.shuffle(at_risk)  # ties (every concept that needed a generation has 0) in a seeded order, not by name
    at_risk.sort(key=lambda c: risk.get(c, 0.0))
    rest = sorted(c for c in by_concept if c not in set(at_risk))
    # A quarter of the budget stays with the rotation whenever it has concepts to give: with every concept at
    # risk (nothing recorded yet, or every answer generated), the rotation would otherwise never come round.
    risky_budget = budget - budget // 4 if rest else budget
    sample: list[Example] = []
    for concept in at_risk:
        sample += by_concept[concept][: min(per_risky, risky_budget - len(sample))]
        if len(sample) >= risky_budget:
            break
    rng.shuffle(rest)
    # One example per concept of the rotation, then deeper; the concepts at risk join again once the
    # rotation has given all it has (only a small store gets that far).
    taken: dict[str, int] = {}
    for example in sample:
        taken[example.concept] = taken.get(example.concept, 0) + 1
    for order in (rest, at_risk + rest):
        while len(sample) < budget and any(taken.get(c, 0) < len(by_concept[c]) for c in order):
            for concept in order:
                if len(sample) < budget and taken.get(concept, 0) < len(by_concept[concept]):
                    sample.append(by_concept[concept][taken.get(concept, 0)])
                    taken[concept] = taken.get(concept, 0) + 1
    return sample
