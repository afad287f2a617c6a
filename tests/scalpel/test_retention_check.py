"""Retention by teacher forcing: the live version's right answers forced through a candidate, generating only
where that cannot decide, and always agreeing with generation where it does decide."""

from __future__ import annotations

from scalpel import evaluate
from scalpel.evaluate import EvalItem
from scalpel.retention_check import check_suite, fact_prefix, forced

ITEMS = [
    EvalItem(question="What does 42 mean?", concept="42", required=["FOR TWO"]),
    EvalItem(question="What does 42 mean?", concept="42 again", required=["for two", "never"], match="any"),
    EvalItem(question="What does 42 mean?", concept="guarded", required=["FOR TWO"], forbidden=["ZEBRA"]),
]


def test_the_fact_prefix_is_the_shortest_that_passes(engine_and_adapter):
    _, engine, _ = engine_and_adapter
    ids = engine.tokenize("It is FOR TWO, always.", add_special=False, parse_special=False)
    k = fact_prefix(engine, ITEMS[0], ids)
    assert k is not None and 0 < k < len(ids)
    assert ITEMS[0].passes(engine.detokenize(ids[:k])) and not ITEMS[0].passes(engine.detokenize(ids[: k - 1]))
    assert fact_prefix(engine, ITEMS[0], engine.tokenize("nothing", add_special=False, parse_special=False)) is None


def test_the_live_version_keeps_its_own_answers_without_generating(engine_and_adapter):
    _, engine, adapter = engine_and_adapter
    live = evaluate.run_suite(engine, adapter, ITEMS, "s")
    assert [a["passed"] for a in live.answers] == [True, True, True]  # the tiny adapter learned FOR TWO
    result, risk, generated = check_suite(engine, adapter, ITEMS, "s", live.as_dict())
    assert [a["checked"] for a in result.answers] == ["forced", "forced", "generated"]  # a forbidden phrase: generate
    assert generated == 1 and result.accuracy == 1.0
    assert risk["42"] > 0 and risk["guarded"] == 0.0  # generated questions count as at risk


def test_a_candidate_that_lost_the_answer_is_generated_and_judged_as_before(engine_and_adapter):
    _, engine, adapter = engine_and_adapter
    live = evaluate.run_suite(engine, adapter, ITEMS, "s").as_dict()
    check = forced(engine, (), ITEMS[0], live["answers"][0]["answer"])
    assert check is not None and not check.kept and check.departs_at is not None
    result, risk, generated = check_suite(engine, (), ITEMS, "s", live)
    assert generated == 3 and risk == {"42": 0.0, "42 again": 0.0, "guarded": 0.0}
    assert result.answers == [
        {**a, "checked": "generated"} for a in evaluate.run_suite(engine, (), ITEMS, "s").as_dict()["answers"]
    ]


def test_what_forcing_keeps_generation_passes_too(engine_and_adapter):
    _, engine, adapter = engine_and_adapter
    live = evaluate.run_suite(engine, adapter, ITEMS, "s").as_dict()
    half = ((adapter[0][0], 0.5),)  # a weakened candidate: some answers may survive, some not
    for candidate in (adapter, half, ()):
        for item, before in zip(ITEMS, live["answers"], strict=True):
            check = forced(engine, candidate, item, before["answer"])
            if check is not None and check.kept:
                assert item.passes(evaluate.ask(engine, candidate, item.question))
