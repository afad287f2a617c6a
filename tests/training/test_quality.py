"""Dataset QA finds what would quietly spoil a training run, and names the example."""

from __future__ import annotations

import json

import pytest

from scalpel.cli.main import main
from training.dataset import Example
from training.quality import QualityRules, check, mojibake

LOOSE = QualityRules(min_examples=0, min_avg_answer_words=0)


def ex(q: str, a: str, concept: str = "c", where: str | None = None) -> Example:
    return Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}], concept, where or q)


@pytest.mark.parametrize(
    "garbled, meant",
    [("42 = 'FOR TWO' ‚Äî life", "—"), ("dash â€” here", "—"), ("cafÃ©", "é"), ("\uf8ffüéØ goal", "🎯")],
)  # the seed's 🎯
def test_mojibake_is_found_with_what_it_meant(garbled, meant):
    found = mojibake(garbled)
    assert found is not None and found[1] == meant


@pytest.mark.parametrize("clean", ["naïve café", "東京 and Ελληνικά", "emoji 🚀🤝", "plain ascii", "— real dash"])
def test_real_unicode_is_not_mojibake(clean):
    assert mojibake(clean) is None


def codes(report):
    return sorted(f.code for f in report.findings)


def test_duplicates_conflicts_and_near_duplicates():
    report = check(
        [
            ex("What does 42 mean?", "42 = FOR TWO.", where="a[0]"),
            ex("what does 42 mean", "42 = FOR TWO", where="a[1]"),  # same after normalising
            ex("What does 42 mean?!", "Something else.", where="a[2]"),  # conflicting
            ex("What does 42 means?", "42 = FOR TWO.", where="a[3]"),  # near duplicate
            ex("Explain PDCA.", "Plan, Do, Check, Act.", where="a[4]"),
        ],
        LOOSE,
    )
    assert codes(report) == ["conflicting_answers", "duplicate", "near_duplicate"]
    by_code = {f.code: f for f in report.findings}
    assert by_code["duplicate"].where == "a[1]" and "a[0]" in by_code["duplicate"].message
    assert by_code["conflicting_answers"].where == "a[2]"


def test_empty_answer_is_an_error_and_strict_makes_warnings_errors():
    report = check([ex("q1", " \n "), ex("q2", "a ‚Äî b")], LOOSE)
    assert [(f.level, f.code) for f in report.findings] == [("error", "empty_answer"), ("warning", "mojibake")]
    strict = check([ex("q2", "a ‚Äî b")], QualityRules(min_examples=0, min_avg_answer_words=0, strict=True))
    assert [f.level for f in strict.findings] == ["error"]


def test_plan_metrics_balance_and_length():
    examples = [ex(f"question {i}", "short answer", concept="big") for i in range(8)] + [ex("lonely?", "yes", "small")]
    report = check(examples, QualityRules(), token_counts=[10] * 8 + [3000], max_seq_length=2048)
    assert {"few_examples", "short_answers", "concept_imbalance", "too_long"} <= set(codes(report))
    too_long = next(f for f in report.findings if f.code == "too_long")
    assert "3000 tokens" in too_long.message and "952" in too_long.message
    assert report.concepts == {"big": 8, "small": 1}


def test_cli_text_json_and_exit_code(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"instruction": "q", "output": "a ‚Äî b", "concept": "x"}]))
    assert main(["data", "check", str(good), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["warnings"] >= 1 and report["findings"][0]["code"] == "mojibake"
    assert report["findings"][0]["where"] == f"{good}[0]"
    assert main(["data", "check", str(good), "--strict"]) == 2
    assert "mojibake" in capsys.readouterr().out
