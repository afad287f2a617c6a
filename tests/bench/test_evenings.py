"""The evenings benchmark's bookkeeping: the targets it checks, and what a resumed run accepts."""

from __future__ import annotations

import pytest

from bench import evenings


def _row(evening: int, seconds: float, concepts: dict, promoted: bool = True, agreement: float = 0.96) -> dict:
    return {
        "arm": "scalpel",
        "evening": evening,
        "data": f"evening{evening:02d}",
        "data_evening": evening,
        "version": f"v{evening + 1}",
        "promoted": promoted,
        "reasons": [],
        "seconds": seconds,
        "concepts": concepts,
        "base_agreement": agreement,
        "base_agreement_all_positions": agreement - 0.1,
        "perplexity_change": 0.01,
    }


def _night(evening: int, version: str, right: int, items: int) -> dict:
    suite = {"accuracy": right / items, "items": items, "per_concept": {"a": right / items}}
    return {
        "evening": evening,
        "live": version,
        "versions": evening + 1,
        "paraphrases": {"version": version, "suites": {"s": suite}},
    }


def test_the_summary_marks_each_target_met_or_unmet():
    concepts = [f"c{i}" for i in range(20)]
    knows_all = dict.fromkeys(concepts, 1.0)
    rows = [_row(0, 50, {"c0": 1.0})] + [_row(e, 100 + 10 * e, knows_all) for e in range(1, 11)]
    summary = evenings.summarise(rows, [_night(10, "v11", 9, 10)], concepts, 10)
    targets = summary["targets"]
    assert targets["median_update_seconds"] == {"value": 155.0, "target": "<= 300", "met": True}
    assert targets["max_update_seconds"]["value"] == 200 and targets["max_update_seconds"]["met"]
    # the last five updates (160 to 200 s, mean 180) against the first five (110 to 150 s, mean 130): 1.38x
    assert targets["last_five_over_first_five"]["value"] == pytest.approx(180 / 130)
    assert not targets["last_five_over_first_five"]["met"]
    assert targets["share_of_concepts_at_95"] == {"value": 1.0, "target": ">= 0.95", "met": True}
    assert targets["paraphrase_accuracy"]["value"] == pytest.approx(0.9) and targets["paraphrase_accuracy"]["met"]
    assert targets["final_base_agreement"]["met"]

    # One concept forgotten by the live version, a slow update, a rejected last update that drifted the base.
    forgot = {**knows_all, "c3": 0.5}
    rows = rows[:-2] + [_row(9, 500, forgot), _row(10, 120, knows_all, promoted=False, agreement=0.5)]
    targets = evenings.summarise(rows, [_night(10, "v10", 7, 10)], concepts, 10)["targets"]
    assert targets["share_of_concepts_at_95"]["value"] == pytest.approx(0.95)  # the rejected update is not live
    assert targets["max_update_seconds"] == {"value": 500, "target": "<= 450", "met": False}
    assert not targets["paraphrase_accuracy"]["met"]
    assert targets["final_base_agreement"]["value"] == 0.96  # the live version's, not the rejected one's


def test_a_summary_without_paraphrases_leaves_that_target_unmet():
    rows = [_row(0, 50, {"a": 1.0}), _row(1, 60, {"a": 1.0})]
    figures = evenings.summarise(rows, [{"evening": 1, "live": "v2", "versions": 2, "paraphrases": {}}], ["a"], 1)
    assert figures["targets"]["paraphrase_accuracy"] == {"value": None, "target": ">= 0.8", "met": False}
    assert figures["update_window"] == 0 and figures["last_five_over_first_five"] is None


def test_a_run_resumes_only_with_its_own_settings(tmp_path):
    run = {"knowledge": "/k", "files_sha256": {"evening01.json": "aa"}, "epochs": 8.0}
    progress = evenings.Progress.open(tmp_path, run, fresh=False)
    progress.record("scalpel", [_row(0, 50, {"a": 1.0})], {"evening": 0, "live": "v1", "versions": 1})
    progress.record("scalpel", [_row(1, 60, {"a": 1.0})], {"evening": 1, "live": "v2", "versions": 2})
    again = evenings.Progress.open(tmp_path, run, fresh=False)
    assert again.done("scalpel", 1) and not again.done("scalpel", 2) and not again.done("naive", 0)
    assert [r["evening"] for r in again.rows("scalpel")] == [0, 1]
    # Evening 1 again (as after an interruption): its rows replace the old ones, later nights are gone.
    again.record("scalpel", [_row(1, 70, {"a": 1.0})], {"evening": 1, "live": "v2", "versions": 2})
    assert [r["seconds"] for r in again.rows("scalpel")] == [50, 70]
    # More evenings than before: accepted, the new file's hash added.
    longer = {**run, "files_sha256": {"evening01.json": "aa", "evening02.json": "bb"}}
    assert evenings.Progress.open(tmp_path, longer, fresh=False).run["files_sha256"]["evening02.json"] == "bb"
    with pytest.raises(SystemExit, match="epochs"):
        evenings.Progress.open(tmp_path, {**run, "epochs": 4.0}, fresh=False)
    with pytest.raises(SystemExit, match="changed: evening01.json"):
        evenings.Progress.open(tmp_path, {**run, "files_sha256": {"evening01.json": "cc"}}, fresh=False)
    assert evenings.Progress.open(tmp_path, {**run, "epochs": 4.0}, fresh=True).arms == {}
