"""Replay under a fixed budget, spent where forgetting is likeliest: an update costs the same at 100 concepts as at 10.

Replaying a few examples of every earlier concept grows with every concept learned; at the plan's 100+ concepts
it no longer fits an evening. Here the number of replayed examples is capped, and the cap is spent in order:
1. the concepts at risk: those whose answers the live version's retention check had to generate, or kept by a
   thin margin (scalpel.retention_check), thinnest first, one example per fact each (at most `per_risky`),
   within three quarters of the budget;
2. the rest as one example per concept, from a seeded rotation, so every concept comes round again after
   about (number of concepts / remaining budget) evenings.
Within a concept the examples go fact by fact (`fact_order`): one question for each of its answers before a
second for any, so a concept's few replayed examples cover its facts, and the facts most like the new data first.
On the 100-concept benchmark a fact that was not replayed was the one overwritten: evening 2's new projects
gave their own leads and phases to the earlier projects whose replayed examples had asked about something else.
"""

from __future__ import annotations

import random
import re

from training.dataset import Example

# Words that say nothing of what is asked: left out of the likeness, or every question would be like every other.
FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "by",
        "with",
        "from",
        "and",
        "or",
        "but",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "has",
        "have",
        "had",
        "do",
        "does",
        "did",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "why",
        "how",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "there",
        "their",
        "his",
        "her",
        "he",
        "she",
        "they",
        "you",
        "i",
        "me",
        "my",
        "your",
        "tell",
        "about",
        "can",
        "could",
        "would",
        "please",
    ]
)
# Likeness is compared in steps of this size; within a step the order is the seeded draw's, so a retry or a later
# evening replays other examples of the same facts.
LIKENESS_STEP = 0.1


def _words(example: Example) -> frozenset[str]:
    text = " ".join(m["content"] for m in example.messages).lower()
    return frozenset(w for w in re.findall(r"\w+", text) if w not in FUNCTION_WORDS)


def _answer(example: Example) -> str:
    return next((m["content"] for m in reversed(example.messages) if m["role"] == "assistant"), "")


def fact_order(pool: list[Example], new: list[Example], rng: random.Random) -> list[Example]:
    """A concept's examples, fact by fact: grouped by their answer, the groups most like the new data first (the
    highest word overlap, Jaccard over question and answer, of any of their examples with any new example), then
    one example of each group in turn; ties and the order inside a group are seeded.

    Written here because no library orders replay this way, and the cheap measure is the one that matters: the
    examples asked and answered most like the new ones are where the new ones overwrite the old."""
    seen = [_words(e) for e in new]

    def likeness(example: Example) -> float:
        words = _words(example)
        share = max((len(words & other) / len(words | other) for other in seen), default=0.0) if words else 0.0
        return round(share / LIKENESS_STEP) * LIKENESS_STEP

    groups: dict[str, list[tuple[float, float, Example]]] = {}
    for example in pool:
        groups.setdefault(_answer(example), []).append((likeness(example), rng.random(), example))
    ordered = []
    for members in groups.values():
        members.sort(key=lambda k: (-k[0], k[1]))
        ordered.append((members[0][0], rng.random(), [e for _, _, e in members]))
    ordered.sort(key=lambda g: (-g[0], g[1]))
    out: list[Example] = []
    depth = 0
    while len(out) < len(pool):
        out += [examples[depth] for _, _, examples in ordered if depth < len(examples)]
        depth += 1
    return out


def budget_replay(
    earlier: list[Example],
    budget: int,
    risk: dict[str, float],
    *,
    risk_margin: float,
    per_risky: int,
    rng: random.Random,
    new: list[Example] | None = None,
) -> list[Example]:
    """At most `budget` examples of `earlier`. `risk` maps a concept to its thinnest retention margin (logits);
    a concept below `risk_margin`, or missing from `risk` (never checked), is at risk. Each concept gives its
    examples fact by fact (fact_order), those most like `new` (the update's new examples) first."""
    by_concept: dict[str, list[Example]] = {}
    for example in earlier:
        by_concept.setdefault(example.concept, []).append(example)
    for concept in sorted(by_concept):
        by_concept[concept] = fact_order(by_concept[concept], new or [], rng)
    at_risk = [c for c in sorted(by_concept) if risk.get(c, 0.0) < risk_margin]
    rng.shuffle(at_risk)  # ties (every concept that needed a generation has 0) in a seeded order, not by name
    at_risk.sort(key=lambda c: risk.get(c, 0.0))
    rest = sorted(c for c in by_concept if c not in set(at_risk))
    # A quarter of the budget stays with the rotation whenever it has concepts to give: with every concept at
    # risk (nothing recorded yet, or every answer generated), the rotation would otherwise never come round.
    risky_budget = budget - budget // 4 if rest else budget
    sample: list[Example] = []
    for concept in at_risk:  # one question per fact, at most per_risky (fact_order puts one of each fact first)
        facts = len({_answer(e) for e in by_concept[concept]})
        sample += by_concept[concept][: min(per_risky, facts, risky_budget - len(sample))]
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
