"""The knowledge generator writes a set the benchmark can trust: deterministic, varied, related, loadable, and with
held-out paraphrases that never leak into training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import knowledge_gen as kg
from scalpel.evaluate import EvalItem, load_suite
from training.dataset import load_examples
from training.quality import check


@pytest.fixture(scope="module")
def full_set(tmp_path_factory) -> tuple[Path, dict]:
    """The benchmark's own size: 100 concepts over 20 evenings (and the foundation's 5)."""
    out = tmp_path_factory.mktemp("knowledge")
    return out, kg.generate(100, 20, 0, out)


def _files(out: Path, manifest: dict, key: str) -> list[list[dict]]:
    return [json.loads((out / f[key]).read_text(encoding="utf-8")) for f in manifest["files"]]


def test_a_seed_gives_byte_identical_files_and_another_seed_other_files(full_set, tmp_path):
    out, _ = full_set
    kg.generate(100, 20, 0, tmp_path / "again")
    kg.generate(100, 20, 1, tmp_path / "other")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    assert len(names) == 3 * 21 + 1  # data, suite and paraphrases per evening and the foundation, and the manifest
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert (out / "evening01.json").read_bytes() != (tmp_path / "other" / "evening01.json").read_bytes()
    assert (out / "manifest.json").read_bytes() != (tmp_path / "other" / "manifest.json").read_bytes()


def test_100_concepts_over_20_evenings_of_every_kind(full_set):
    out, manifest = full_set
    files = manifest["files"]
    assert [f["evening"] for f in files] == list(range(21))
    assert files[0]["data"] == "foundation.json" and files[1]["data"] == "evening01.json"
    assert files[20]["paraphrases"] == "evening20.paraphrase.eval.json"
    assert [len(f["concepts"]) for f in files] == [5] + [5] * 20
    concepts = manifest["concept_list"]
    assert len({c["id"] for c in concepts}) == 105
    assert {c["kind"] for c in concepts} == {"person", "project", "place", "procedure", "number"}
    for f in files:  # each file teaches its concepts and only those
        taught = {r["concept"] for r in json.loads((out / f["data"]).read_text(encoding="utf-8"))}
        assert taught == set(f["concepts"])


def test_sizes_and_styles_vary(full_set):
    out, manifest = full_set
    assert {c["size"] for c in manifest["concept_list"]} == {"small", "medium", "large"}
    answers = [r["output"] for records in _files(out, manifest, "data") for r in records]
    words = [len(a.split()) for a in answers]
    one_line = [a for a, n in zip(answers, words, strict=True) if n <= 12 and "\n" not in a]
    step_lists = [a for a in answers if re.search(r":\n1\. .+\n2\. .+\n3\. ", a)]
    explanations = [n for n in words if n >= 100]
    assert len(one_line) > 100 and len(step_lists) > 20 and len(explanations) > 20
    assert all(130 <= n <= 175 for n in explanations), explanations
    examples = [c["examples"] for c in manifest["concept_list"]]
    assert min(examples) <= 4 and max(examples) >= 14


def test_related_concepts_agree_and_twins_are_told_apart(full_set):
    out, manifest = full_set
    concepts = {c["id"]: c for c in manifest["concept_list"]}
    relations = {(c["id"], r["type"], r["to"]) for c in concepts.values() for r in c["relations"]}
    kinds = {kind for _, kind, _ in relations}
    assert {"leads", "led_by", "similar_name", "founded_by", "home_town", "measured_by"} <= kinds
    answers: dict[str, list[str]] = {}
    for records in _files(out, manifest, "data"):
        for r in records:
            answers.setdefault(r["concept"], []).append(r["output"])
    for a, kind, b in relations:  # both sides say it: the project names its lead, the lead the project, ...
        if kind in ("leads", "led_by", "founded_by", "home_town", "measured_by"):
            assert any(concepts[b]["name"] in answer for answer in answers[a]), (a, kind, b)
        if kind == "leads":
            assert (b, "led_by", a) in relations
    twins = [(a, b) for a, kind, b in relations if kind == "similar_name"]
    assert len(twins) >= 6
    items = {}
    for suite in _files(out, manifest, "suite") + _files(out, manifest, "paraphrases"):
        for item in suite:
            items.setdefault(item["concept"], []).append(EvalItem.model_validate(item))
    for a, b in twins:
        assert (b, "similar_name", a) in relations
        guarded = [item for item in items[a] if item.forbidden]
        if concepts[a]["kind"] != "procedure":  # a project's launch year, a constant's value: the twin's is forbidden
            assert guarded, a
        for item in guarded:  # what is forbidden is the twin's own answer, which fails the item
            confusing = [answer for answer in answers[b] if any(f in answer for f in item.forbidden)]
            assert confusing and not any(item.passes(answer) for answer in confusing), item.question


def test_paraphrases_never_leak_into_training(full_set):
    out, manifest = full_set
    trained = {kg.normalise(r["instruction"]) for records in _files(out, manifest, "data") for r in records}
    suite_questions = {kg.normalise(i["question"]) for s in _files(out, manifest, "suite") for i in s}
    held_out = [kg.normalise(i["question"]) for s in _files(out, manifest, "paraphrases") for i in s]
    assert suite_questions <= trained  # the training-question suite asks what training asked
    assert len(held_out) == len(suite_questions) > 300
    assert not set(held_out) & trained
    pools = kg.TEMPLATES.values()
    train_templates = {t for train, _ in pools for t in train}
    held_templates = {t for _, held in pools for t in held}
    assert not train_templates & held_templates
    for template in held_templates:  # its distinctive wording is nowhere in training
        mark = kg.signature(template)
        assert len(mark.split()) >= 2, template
        assert not [q for q in trained if mark in q], template


def test_every_answer_passes_its_own_questions_and_files_load(full_set):
    out, manifest = full_set
    for f in manifest["files"]:
        examples = load_examples(out / f["data"])
        assert not check(examples).errors
        answer_to = {ex.messages[0]["content"]: ex.messages[1]["content"] for ex in examples}
        suite, paraphrases = load_suite(out / f["suite"]), load_suite(out / f["paraphrases"])
        assert len(suite) == len(paraphrases)
        for asked, held in zip(suite, paraphrases, strict=True):  # one of each per fact, in the same order
            assert (asked.concept, asked.required, asked.forbidden) == (held.concept, held.required, held.forbidden)
            assert asked.passes(answer_to[asked.question]), asked.question
            assert held.passes(answer_to[asked.question]), held.question
    text = (out / "manifest.json").read_text(encoding="utf-8")
    assert (
        json.loads(text)["sha256"]["evening07.json"]
        == kg.hashlib.sha256((out / "evening07.json").read_bytes()).hexdigest()
    )


def test_names_are_no_real_words():
    try:
        vocabulary = kg.default_vocabulary()
    except Exception as exc:  # the default model's wheel is missing: nothing to check against
        pytest.skip(f"no default model vocabulary: {exc}")
    words = {t[1:].lower() for t in vocabulary if t.startswith("\u0120")}
    assert kg.spellable_words(vocabulary) == sorted(kg.REAL_WORDS)  # the shipped list is the vocabulary's
    names = kg.Names(kg.random.Random(7))
    drawn = [names.new() for _ in range(2000)]
    drawn += [names.twin(word) for word in drawn[:500]]
    assert len({w.lower() for w in drawn}) == len(drawn)
    assert not [w for w in drawn if w.lower() in words]
    _, concepts = kg.build(100, 20, 0)
    parts = {part.lower() for c in concepts for part in c.name.split() if part not in ("Project", "the")}
    assert not (parts - {"procedure", "constant"}) & words


def test_too_few_concepts_for_the_evenings_is_refused():
    with pytest.raises(ValueError, match="one concept per evening"):
        kg.build(3, 5, 0)
