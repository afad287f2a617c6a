"""Retention checks that do not generate: teacher-force the live version's own right answers through a candidate.

Generating every earlier suite's answers is what made updates slow down as knowledge grew: each answer is up to
96 one-token decodes. But a candidate that, fed the live version's answer, picks every token of it up to the
point where the answer carries its facts (greedy, teacher-forced) generates that same prefix, so it passes
the question too. That is one forward pass per question instead of 96. Only questions where the candidate
departs before the facts, and those the live version got wrong, are generated, and scored as before.

The smallest margin (top-1 minus top-2 logit) along the fact tokens says how close a kept answer came to
flipping: the replay budget (scalpel.replay_budget) spends its examples on the concepts with the thinnest.

One caveat, measured in scalpel.evaluate: llama.cpp's batched and one-token kernels round differently, so at
near-ties a teacher-forced pick can differ from the generated one. A departure caused by that is only a
generation more; it never passes an answer that generation would fail, except through rounding at a near-tie.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scalpel import evaluate
from scalpel.evaluate import AnyEngine, EvalItem, SuiteResult
from serving.engine import AdapterSet


@dataclass
class Forced:
    """One question teacher-forced along a reference answer."""

    kept: bool  # the candidate picks every token of the answer through its facts
    fact_tokens: int  # how many answer tokens it takes to carry the facts
    margin: float  # the smallest margin along those tokens (inf when the facts need no tokens)
    departs_at: int | None  # the first answer token the candidate would not pick, if any before the facts


def fact_prefix(engine: AnyEngine, item: EvalItem, answer_ids: list[int]) -> int | None:
    """The fewest answer tokens whose text already passes the item (its required phrases are all, or any, in
    it), or None when even the whole answer does not."""
    for k in range(len(answer_ids) + 1):
        if item.required and item.passes(engine.detokenize(answer_ids[:k])):
            return k
    return None


def forced(engine: AnyEngine, adapters: AdapterSet, item: EvalItem, answer: str) -> Forced | None:
    """Teacher-force `answer` to `item.question` under `adapters`; None when the answer carries no facts to
    check this way (it fails the item, or the item only forbids phrases, which a prefix cannot settle)."""
    if item.forbidden or not item.required:
        return None
    ids = engine.tokenize(answer, add_special=False, parse_special=False)
    need = fact_prefix(engine, item, ids)
    if need is None:
        return None
    if need == 0:
        return Forced(True, 0, float("inf"), None)
    prompt = engine.chat_tokens([{"role": "user", "content": item.question}])
    scores = engine.score(prompt + ids[:need], adapters)
    start = len(prompt) - 1  # the position that predicts the answer's first token
    choices, margins = scores.choices[start : start + need], scores.margins[start : start + need]
    departs = next((i for i, (c, t) in enumerate(zip(choices, ids[:need], strict=True)) if int(c) != t), None)
    return Forced(departs is None, need, float(margins.min()), departs)


def check_suite(
    engine: AnyEngine, adapters: AdapterSet, items: list[EvalItem], name: str, live: dict | None
) -> tuple[SuiteResult, dict[str, float], int]:
    """A suite's result as run_suite would give it, generating only where teacher forcing cannot decide.

    `live` is the live version's result for this suite (SuiteResult.as_dict), whose passing answers are
    forced through the candidate. Also returns each concept's thinnest margin (0 for a concept that needed
    a generation or lost an answer: at risk) and how many questions were generated.
    """
    known = {a["question"]: a["answer"] for a in (live or {}).get("answers", []) if a["passed"]}
    risk: dict[str, float] = {}
    kept: dict[int, str] = {}  # item index -> the live version's answer, which the candidate would give too
    for i, item in enumerate(items):
        check = forced(engine, adapters, item, known[item.question]) if item.question in known else None
        if check is not None and check.kept:
            kept[i] = known[item.question]
            risk[item.concept] = min(risk.get(item.concept, float("inf")), check.margin)
        else:
            risk[item.concept] = 0.0
    rest = [i for i in range(len(items)) if i not in kept]  # generated, all at once
    said = dict(zip(rest, evaluate.ask_all(engine, adapters, [items[i].question for i in rest]), strict=True))
    answers = []
    for i, item in enumerate(items):
        answer = kept.get(i, said.get(i, ""))
        answers.append(
            {
                "question": item.question,
                "concept": item.concept,
                "answer": answer,
                "passed": True if i in kept else item.passes(answer),
                "checked": "forced" if i in kept else "generated",
            }
        )
    return SuiteResult(name, answers), risk, len(rest)


@dataclass
class SuiteChecker:
    """One candidate's suite runner (evaluate.evaluate's `runner`): an earlier suite that the live version was
    scored on goes through check_suite, any other (the new knowledge's) through run_suite. It keeps every
    concept's risk (0 for a concept whose answers were generated) and how many questions each way took."""

    live_suites: dict  # the live version's results, by suite name (SuiteResult.as_dict)
    generate: frozenset[str] = frozenset()  # suites always generated in full (the new knowledge's)
    progress: bool = False
    risk: dict[str, float] = field(default_factory=dict)
    forced: int = 0
    generated: int = 0

    def __call__(self, engine: AnyEngine, adapters: AdapterSet, items: list[EvalItem], name: str) -> SuiteResult:
        """The suite's result, as run_suite gives it (with each answer's "checked" where forcing was tried)."""
        live = self.live_suites.get(name)
        if live is None or name in self.generate:
            result = evaluate.run_suite(engine, adapters, items, name, progress=self.progress)
            self.generated += len(items)
            for item in items:
                self.risk[item.concept] = 0.0
            return result
        result, risk, generated = check_suite(engine, adapters, items, name, live)
        self.generated += generated
        self.forced += len(items) - generated
        for concept, margin in risk.items():
            self.risk[concept] = min(self.risk.get(concept, float("inf")), margin)
        return result

    def record(self) -> dict:
        """The manifest's record of the check: each concept's thinnest margin (None: its facts need no token to
        be forced), and the questions forced and generated."""
        return {
            "risk": {c: None if m == float("inf") else round(m, 3) for c, m in sorted(self.risk.items())},
            "retention_checks": {"forced": self.forced, "generated": self.generated},
        }
