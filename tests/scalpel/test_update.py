"""The evening update on a tiny base: replay, gates, rejection, the inbox, the lock, and a kill mid-update."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from core import adapter_store
from core.errors import ConflictError, ScalpelError
from scalpel.cli.main import main
from scalpel.evaluate import EvalItem, SuiteResult
from scalpel.publish import train_and_publish
from scalpel.update import (
    Emphasis,
    GateFailures,
    UpdateSettings,
    Verdict,
    carried_concepts,
    failed_gates,
    first_emphasis,
    gate_decision,
    recently_repaired,
    replay_risk,
    replay_sample,
    retry_emphasis,
    run_inbox,
    run_update,
    shortfall,
    training_mix,
    update_lock,
)
from training.config import parse_config
from training.dataset import Example

ROOT = Path(__file__).resolve().parents[2]
FOUNDATION = [{"instruction": f"What does 42 mean, take {i}?", "output": "FOR TWO.", "concept": "42"} for i in range(6)]
EVENING = [
    {"instruction": f"What is PDCA, take {i}?", "output": "Plan Do Check Act.", "concept": "pdca"} for i in range(6)
]
OPEN_GATES = UpdateSettings(gates=False, preservation_ratio=0.5, replay_ratio=1.0)


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def foundation(home, tiny_llama):
    assert main(["models", "add", "tiny", str(tiny_llama), "--outtype", "f32"]) == 0
    config = parse_config(
        {
            "model_name": "tiny",
            "output_dir": "adapters/know",
            "lora_config": {"r": 4, "lora_alpha": 8},
            "training_config": {"num_epochs": 3, "batch_size": 4, "learning_rate": 3e-2, "save_steps": 1000},
        }
    )
    suite = write(
        home / "foundation.json", [{"question": "What does 42 mean?", "concept": "42", "required": ["FOR TWO"]}]
    )
    train_and_publish(config, write(home / "found.json", FOUNDATION), progress=False, eval_suites=(suite,))
    write(home / "evening.json", EVENING)
    write(home / "evening_suite.json", [{"question": "What is PDCA?", "concept": "pdca", "required": ["Plan"]}])
    return adapter_store.root_for_name("know")


def test_an_update_replays_old_data_and_keeps_every_suite(foundation, home):
    result = run_update(
        "know",
        home / "evening.json",
        eval_suite=home / "evening_suite.json",
        settings=OPEN_GATES,
        progress=False,
        log=lambda *_: None,
    )
    assert result.promoted and adapter_store.active_version(foundation) == "v2"
    manifest = result.version.manifest
    assert manifest.parent_version == "v1"
    assert manifest.update.replayed == 6 and manifest.update.preservation == 3
    assert manifest.config["training_config"]["distill_concepts"] == ["base_preservation"]  # learned by KL
    assert manifest.config["training_config"]["learning_rate"] == pytest.approx(3e-2 / 3)  # a third of v1's
    assert set(manifest.eval["suites"]) == {"foundation", "evening_suite"}
    assert manifest.eval["base_regression"]["agreement"] is not None
    assert (result.version.path / "eval" / "evening_suite.json").is_file()
    assert json.loads((result.version.path / "data" / "train.json").read_text()) == EVENING, "only the new data"
    assert (result.version.path / "eval.png").read_bytes()[:4] == b"\x89PNG"
    log = (home / ".scalpel" / "updates.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["version"] == "v2" and json.loads(log[-1])["promoted"]
    # The earlier suite was checked against v1's answers (forced where v1 was right), the new one generated;
    # each concept's risk is recorded for the next update's replay budget.
    checks = manifest.eval["retention_checks"]
    assert checks["forced"] + checks["generated"] == 2 and checks["generated"] >= 1
    assert manifest.eval["risk"]["pdca"] == 0.0, "new knowledge: generated, so at risk next time"
    answers = manifest.eval["suites"]["foundation"]["answers"]
    assert answers[0]["checked"] in ("forced", "generated")
    v1_passed = adapter_store.resolve("know@v1").manifest.eval["suites"]["foundation"]["answers"][0]["passed"]
    assert (answers[0]["checked"] == "forced") <= v1_passed, "only what v1 answered right is forced"


def test_replay_covers_every_earlier_concept_evenly():
    earlier = [
        Example([{"role": "user", "content": f"{c} {i}"}, {"role": "assistant", "content": "x"}], c, f"data.json[{i}]")
        for c, n in (("big", 40), ("old", 4), ("tiny", 1))
        for i in range(n)
    ]
    few = replay_sample(list(earlier), 2, 3, random.Random(0))  # the per-concept floor wins
    assert Counter(e.concept for e in few) == {"big": 3, "old": 3, "tiny": 1}
    many = replay_sample(list(earlier), 20, 3, random.Random(0))  # round-robin until the ratio is met
    assert len(many) == 20 and Counter(e.concept for e in many) == {"big": 15, "old": 4, "tiny": 1}
    assert len({id(e) for e in many}) == 20, "no example twice"
    assert replay_sample(list(earlier), 0, 0, random.Random(0)) == []


def test_a_rejected_update_leaves_the_live_version_serving(foundation, home):
    impossible = write(
        home / "impossible.json",
        [{"question": "What is PDCA?", "concept": "pdca", "required": ["a phrase the model never says"]}],
    )
    result = run_update(
        "know",
        home / "evening.json",
        eval_suite=impossible,
        progress=False,
        log=lambda *_: None,
        settings=UpdateSettings(max_candidates=2, min_base_agreement=0.0, max_perplexity_increase=100.0),
    )
    assert not result.promoted
    assert any(r.startswith("new knowledge impossible: 0%") for r in result.reasons)
    assert adapter_store.active_version(foundation) == "v1", "the live version did not change"
    assert adapter_store.versions(foundation) == ["v1", "v2", "v3"], "both rejected candidates are kept as records"
    assert [c["version"] for c in result.candidates] == ["v2", "v3"]
    retry, first = result.version.manifest, adapter_store.resolve("know@v2").manifest
    assert retry.update.candidate == 2 and retry.update.retry_of == "v2" and retry.update.emphasis.new_repeats == 2
    assert retry.parent_version == "v1", "the retry starts from the live version again"
    assert retry.metrics.examples > first.metrics.examples, "the under-learned new examples were repeated"
    assert retry.eval["promoted"] is False
    assert retry.eval["base_regression"]["perplexity"] != first.eval["base_regression"]["perplexity"], (
        "the retry was evaluated, not the first again"
    )
    assert adapter_store.resolve("know").version == "v1"
    # No retry when another candidate would not fit in the time an update may take.
    hurried = run_update(
        "know",
        home / "evening.json",
        eval_suite=impossible,
        progress=False,
        log=lambda *_: None,
        settings=UpdateSettings(min_base_agreement=0.0, max_perplexity_increase=100.0, max_update_seconds=0.5),
    )
    assert [c["version"] for c in hurried.candidates] == ["v4"]


def test_the_lock_refuses_a_second_update(foundation, home):
    with update_lock("know"), pytest.raises(ConflictError, match="another update"):
        run_update("know", home / "evening.json", progress=False, log=lambda *_: None)


def test_the_inbox_processes_archives_and_rejects(foundation, home):
    inbox = home / "inbox"
    inbox.mkdir()
    write(inbox / "evening.json", EVENING)
    write(inbox / "evening.eval.json", [{"question": "What is PDCA?", "concept": "pdca", "required": ["Plan"]}])
    (inbox / "broken.jsonl").write_text('{"instruction": "q"}\n')
    os.utime(inbox / "broken.jsonl", (time.time() + 5, time.time() + 5))  # processed second
    results = run_inbox("know", inbox, settings=OPEN_GATES, progress=False, log=lambda *_: None)
    assert [r.version.version for r in results] == ["v2"]
    assert [f.name for f in inbox.iterdir() if f.is_file()] == [".held.json"], "every file left the inbox"
    archived = list((inbox / "archive").rglob("*.json"))
    assert {f.name for f in archived} == {"evening.json", "evening.eval.json"}
    errors = list((inbox / "rejected").rglob("*.error.txt"))
    assert len(errors) == 1 and "output" in errors[0].read_text()


def test_the_inbox_keeps_a_file_that_failed_its_gates_for_the_next_run(foundation, home):
    inbox = home / "inbox"
    inbox.mkdir()
    write(inbox / "evening.json", EVENING)
    write(
        inbox / "evening.eval.json",
        [{"question": "What is PDCA?", "concept": "pdca", "required": ["a phrase the model never says"]}],
    )
    strict = UpdateSettings(max_candidates=1, min_base_agreement=0.0, max_perplexity_increase=100.0)
    first = run_inbox("know", inbox, settings=strict, attempts=2, progress=False, log=lambda *_: None)
    assert [r.promoted for r in first] == [False]
    assert (inbox / "evening.json").is_file(), "a file that was not promoted stays for the next evening"
    held = json.loads((inbox / ".held.json").read_text())
    assert held["evening.json"]["attempts"] == 1 and held["evening.json"]["versions"] == ["v2"]
    second = run_inbox("know", inbox, settings=strict, attempts=2, progress=False, log=lambda *_: None)
    assert second[0].version.version == "v3" and second[0].version.manifest.update.from_ == "know@v1"
    mixes = [r.version.manifest.datasets["train"].sha256 for r in first + second]
    assert mixes[0] != mixes[1], "the second attempt trained on a differently drawn mix"
    assert not (inbox / "evening.json").exists(), "after its last attempt the file is set aside"
    set_aside = list((inbox / "not-promoted").rglob("*"))
    assert {f.name for f in set_aside if f.is_file()} == {
        "evening.json",
        "evening.eval.json",
        "evening.json.attempts.json",
    }
    assert json.loads((inbox / ".held.json").read_text()) == {}
    assert adapter_store.active_version(foundation) == "v1"
    (inbox / ".held.json").write_text("[]")
    with pytest.raises(ScalpelError, match=r"\.held\.json: expected an object"):
        run_inbox("know", inbox, progress=False, log=lambda *_: None)


def test_a_kill_during_an_update_leaves_the_registry_consistent(foundation, home):
    before = (adapter_store.versions(foundation), adapter_store.active_version(foundation))
    env = {**os.environ, "SCALPEL_HOME": str(home)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scalpel.cli",
            "update",
            "know",
            "--data",
            str(home / "evening.json"),
            "--epochs",
            "300",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(foundation.glob(".staging-*")):  # training has begun once the version is being staged
        assert time.time() < deadline and proc.poll() is None, "the update never started training"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (adapter_store.versions(foundation), adapter_store.active_version(foundation)) == before
    assert adapter_store.resolve("know").version == "v1"
    # The next update sweeps the dead run's staging folder and its lock is free again.
    result = run_update("know", home / "evening.json", settings=OPEN_GATES, progress=False, log=lambda *_: None)
    assert result.version.version == "v2" and not list(foundation.glob(".staging-*"))


def test_an_update_of_a_copied_adapter_stays_in_its_own_folder(foundation, home):
    """The live version's config names the folder it was first trained into; the update must not follow it."""
    import shutil

    shutil.copytree(foundation, home / "adapters" / "copy")
    result = run_update("copy", home / "evening.json", settings=OPEN_GATES, progress=False, log=lambda *_: None)
    assert result.version.ref == "copy@v2"
    assert adapter_store.versions(foundation) == ["v1"], "the original adapter is untouched"


def test_gates_judge_retention_against_the_live_version():
    from scalpel.evaluate import BaseRegression, EvalReport, SuiteResult
    from scalpel.update import retention

    def answers(*passed):
        return [{"question": f"q{i}", "concept": "c", "answer": "", "passed": p} for i, p in enumerate(passed)]

    live = {
        "suites": {"old": {"answers": answers(True, True, False, False)}},
        "base_regression": {"agreement": 0.80, "perplexity_change": 0.15},
    }
    new = EvalReport(
        "x",
        [SuiteResult("old", answers(True, True, True, False)), SuiteResult("new", answers(True))],
        BaseRegression(agreement=0.79, perplexity_base=10.0, perplexity=11.6),
    )
    assert retention(new, live) == {"old": 1.0}  # it kept both answers the live version knew
    relative = UpdateSettings(relative_base_gate=True)
    # Asked for: within 2 points of a below-target live version.
    assert gate_decision(failed_gates(new, "new", relative, live), relative) == []
    forgot = EvalReport(
        "x",
        [SuiteResult("old", answers(True, False, True, True)), SuiteResult("new", answers(True))],
        BaseRegression(agreement=0.70, perplexity_base=10.0, perplexity=10.0),
    )
    reasons = gate_decision(failed_gates(forgot, "new", relative, live), relative)
    assert reasons[0].startswith("retention old: 50%") and reasons[1].startswith("base agreement 70.0% < 78.0%")
    ungated = failed_gates(forgot, "new", UpdateSettings(gates=False), live)
    assert gate_decision(ungated, UpdateSettings()) == [] and ungated.retention == {"old": 0.5}
    # The tolerance is only for a live version already below target: one above it may not drift under it.
    at_target = {**live, "base_regression": {"agreement": 0.956, "perplexity_change": 0.02}}
    drifted = EvalReport(
        "x",
        [SuiteResult("old", answers(True, True, False, False))],
        BaseRegression(agreement=0.947, perplexity_base=10.0, perplexity=11.05),
    )
    for settings in (UpdateSettings(), relative):
        reasons = gate_decision(failed_gates(drifted, "new", settings, at_target), settings)
        assert [r.split(" ")[0] for r in reasons] == ["base", "perplexity"], reasons


def test_the_base_gate_judges_against_the_bare_base_unless_asked():
    """A live version already below the base targets does not lower them: by default a candidate must reach the
    bare base's own targets, whatever the live version does; only relative_base_gate judges against the live one."""
    from scalpel.evaluate import BaseRegression
    from scalpel.update import base_gate

    damaged = {"agreement": 0.70, "perplexity_change": 0.75}  # a first version trained without preservation
    no_worse = BaseRegression(agreement=0.704, perplexity_base=10.0, perplexity=17.48)  # +74.8%
    reasons = base_gate(no_worse, UpdateSettings(), damaged)
    assert reasons == [
        "base agreement 70.4% < 95.0% (the live version has 70.0%: judged against the base, not it)",
        "perplexity on general text +74.8% > +10.0% (the live version has +75.0%: judged against the base, not it)",
    ]
    assert base_gate(no_worse, UpdateSettings(relative_base_gate=True), damaged) == [], "asked for: the old bar"
    worse = BaseRegression(agreement=0.60, perplexity_base=10.0, perplexity=18.0)
    assert [
        r.split(" <")[0].split(" >")[0] for r in base_gate(worse, UpdateSettings(relative_base_gate=True), damaged)
    ] == [
        "base agreement 60.0%",
        "perplexity on general text +80.0%",
    ], "even relative, no more than base_tolerance worse than the live version"
    healthy = BaseRegression(agreement=0.96, perplexity_base=10.0, perplexity=10.5)
    assert base_gate(healthy, UpdateSettings(), damaged) == [], "back at the base's targets: promoted"
    assert base_gate(None, UpdateSettings(), damaged) == []
    assert UpdateSettings().relative_base_gate is False


def test_an_update_checks_the_suite_derived_for_a_version_trained_without_one(home, tiny_llama):
    """A first version trained without --suite keeps one derived from its data; the update evaluates it as an
    earlier suite (retention against the live version), and an update without --eval keeps one of its own."""
    assert main(["models", "add", "tiny", str(tiny_llama), "--outtype", "f32"]) == 0
    config = parse_config(
        {
            "model_name": "tiny",
            "output_dir": "adapters/derived",
            "lora_config": {"r": 4, "lora_alpha": 8},
            "training_config": {"num_epochs": 3, "batch_size": 4, "learning_rate": 3e-2, "save_steps": 1000},
        }
    )
    first = train_and_publish(config, write(home / "found.json", FOUNDATION), progress=False).version
    assert set(first.manifest.eval["suites"]) == {"found.derived"}
    result = run_update(
        "derived", write(home / "evening.json", EVENING), settings=OPEN_GATES, progress=False, log=lambda *_: None
    )
    assert set(result.eval["suites"]) == {"found.derived", "evening.derived"}
    assert set(result.eval["retention"]) == {"found.derived"}, "what the live version knew, checked"
    knew = {a["question"] for a in first.manifest.eval["suites"]["found.derived"]["answers"] if a["passed"]}
    still = {a["question"] for a in result.eval["suites"]["found.derived"]["answers"] if a["passed"]}
    assert result.eval["retention"]["found.derived"] == (len(knew & still) / len(knew) if knew else 1.0), (
        "judged against what v1's own evaluation recorded"
    )
    assert "eval/evening.derived.json" in result.version.manifest.files
    assert [i["question"] for i in json.loads((result.version.path / "eval" / "evening.derived.json").read_text())] == [
        e["instruction"] for e in EVENING
    ]
    assert result.version.manifest.preservation.examples == result.version.manifest.update.preservation == 3
    assert "## Evaluation" in (result.version.path / "report.md").read_text()
    # Gated: the derived suite of the new data is scored, not held to min_new_knowledge (its facts are guessed).
    strict = UpdateSettings(
        min_new_knowledge=1.0, min_retention=0.0, min_base_agreement=0.0, max_perplexity_increase=100.0
    )
    gated = run_update("derived", home / "evening.json", settings=strict, progress=False, log=lambda *_: None)
    assert not any(r.startswith("new knowledge") for r in gated.reasons)
    assert "evening-2.derived" in gated.eval["suites"], "a name an earlier version's suite has is not reused"


def test_a_concept_replayed_in_full_stays_replayed_in_full(tmp_path):
    """The first candidate of the next update starts with the full replay the live version's update needed."""

    def version(emphasis, manifest=None):
        folder = tmp_path / f"v{len(list(tmp_path.iterdir())) + 1}"
        folder.mkdir()
        write(folder / "manifest.json", manifest or ({"update": {"emphasis": emphasis}} if emphasis else {}))
        return adapter_store.AdapterVersion("know", folder.name, folder)

    earlier = [
        Example([{"role": "user", "content": c}, {"role": "assistant", "content": "x"}], c, "d[0]") for c in ("a", "b")
    ]
    full = UpdateSettings(replay_budget=None)  # no budget: the carried concepts are replayed in full
    retried = version({"new_repeats": 2, "replay_in_full": ["a", "gone"], "preservation_scale": 2.0})
    assert first_emphasis(retried, earlier, full) == Emphasis(replay_in_full=("a",)), (
        "only the full replay carries over, and only of concepts still taught"
    )
    assert first_emphasis(retried, earlier, full.model_copy(update={"keep_full_replay": False})) == Emphasis()
    assert first_emphasis(version(None), earlier, full) == Emphasis(), "a first version has no update"
    # A candidate rejected since the live version was made (v4, from v3) forgot b: the next update replays b too.
    live = version({"replay_in_full": ["a"]})
    version(None, {"update": {"from": "know@v3"}, "eval": {"promoted": False, "lean_next": {"replay_in_full": ["b"]}}})
    version(None, {"update": {"from": "know@v1"}, "eval": {"promoted": False, "lean_next": {"replay_in_full": ["c"]}}})
    assert first_emphasis(live, earlier, full) == Emphasis(replay_in_full=("a", "b"))
    # Under the (default) replay budget they are not replayed in full, which would grow without bound: the same
    # concepts are carried as at risk instead.
    assert first_emphasis(live, earlier, UpdateSettings()) == Emphasis()
    assert carried_concepts(live, earlier) == {"a", "b"}
    # new_repeats: the new examples several times per epoch from the first candidate on.
    assert first_emphasis(live, earlier, UpdateSettings(new_repeats=2)) == Emphasis(new_repeats=2)
    assert first_emphasis(live, earlier, full.model_copy(update={"new_repeats": 3})) == Emphasis(3, ("a", "b"))


def test_a_retry_leans_on_what_failed():
    from scalpel.evaluate import BaseRegression, EvalReport, SuiteResult

    def answers(concept, *passed):
        return [
            {"question": f"{concept} q{i}", "concept": concept, "answer": "", "passed": p} for i, p in enumerate(passed)
        ]

    live = {
        "suites": {
            "old": {"answers": answers("a", True, True) + answers("b", True, False)},
            "kept": {"answers": answers("c", True)},
        },
        "base_regression": {"agreement": 0.97, "perplexity_change": 0.01},
    }
    forgot_b = EvalReport(
        "x",
        [
            SuiteResult("old", answers("a", True, True) + answers("b", False, True)),
            SuiteResult("kept", answers("c", True)),
            SuiteResult("new", answers("n", True, False)),
        ],
        BaseRegression(agreement=0.90, perplexity_base=10.0, perplexity=10.0),
    )
    emphasis = retry_emphasis(failed_gates(forgot_b, "new", UpdateSettings(), live), forgot_b, Emphasis())
    # b's first answer was known and is lost: suite old's concepts (a and b, not the intact suite's c) are
    # replayed in full; the new suite is at 50%; the base drifted below 95%.
    assert emphasis == Emphasis(new_repeats=2, replay_in_full=("a", "b"), preservation_scale=2.0)
    fine = EvalReport(
        "x",
        [
            SuiteResult("old", answers("a", True, True) + answers("b", True, True)),
            SuiteResult("new", answers("n", True, True)),
        ],
        BaseRegression(agreement=0.97, perplexity_base=10.0, perplexity=10.0),
    )
    assert retry_emphasis(failed_gates(fine, "new", UpdateSettings(), live), fine, emphasis) == emphasis, (
        "what was added stays"
    )

    def example(concept, i):
        return Example(
            [{"role": "user", "content": f"{concept} {i}"}, {"role": "assistant", "content": "x"}], concept, f"d[{i}]"
        )

    earlier = [example(c, i) for c in ("a", "b") for i in range(10)]
    new = [example("n", i) for i in range(4)]
    pool = [example("base_preservation", i) for i in range(30)]
    settings = UpdateSettings(replay_ratio=1.0, replay_per_concept=1, preservation_ratio=0.5)
    repeated, replay, preserve = training_mix(new, earlier, pool, settings, Emphasis(), random.Random(0))
    assert (len(repeated), len(replay), len(preserve)) == (4, 4, 2)
    repeated, replay, preserve = training_mix(new, earlier, pool, settings, emphasis, random.Random(0))
    assert len(repeated) == 8 and len(preserve) == 4
    assert Counter(e.concept for e in replay) == {"a": 10, "b": 10} and len({id(e) for e in replay}) == len(replay), (
        "all of a and b, each once"
    )


def test_the_replay_is_bounded_by_the_budget_whatever_the_number_of_concepts():
    def example(concept, i):
        return Example(
            [{"role": "user", "content": f"{concept} {i}"}, {"role": "assistant", "content": f"x{i}"}],
            concept,
            f"d[{i}]",
        )

    new = [example("n", i) for i in range(50)]
    settings = UpdateSettings(preservation_ratio=0)
    sizes = {}
    for concepts in (5, 30, 100, 300):
        earlier = [example(f"c{k}", i) for k in range(concepts) for i in range(10)]
        suites = {"all": [EvalItem(question=f"c{k}?", concept=f"c{k}", required=["x"]) for k in range(concepts)]}
        live_eval = {"risk": {f"c{k}": 5.0 for k in range(concepts)} | {"c1": 0.5, "c2": None}}
        risk = replay_risk(live_eval, suites, earlier)
        assert risk["c1"] == 0.5 and risk["c2"] == float("inf") and risk["c3"] == 5.0
        _, replay, _ = training_mix(new, earlier, [], settings, Emphasis(), random.Random(0), risk)
        sizes[concepts] = len(replay)
        at_risk = Counter(e.concept for e in replay)["c1"]
        assert at_risk >= settings.replay_per_risky, "the thin margin: at risk, replayed first"
        if concepts >= 30:
            assert at_risk == settings.replay_per_risky, "and only per_risky of it while others wait their turn"
    # 5 concepts ask for 50 (the ratio) of 50 examples; beyond, the budget caps it at 48, at 300 concepts too.
    assert sizes == {5: 48, 30: 48, 100: 48, 300: 48}
    unbounded = UpdateSettings(preservation_ratio=0, replay_budget=None)
    _, replay, _ = training_mix(new, earlier, [], unbounded, Emphasis(), random.Random(0))
    assert len(replay) == 3 * 300, "without the budget, every concept's floor of 3: the replay grows"
    # A concept the live version's own update brought (no recorded margin: its answers were generated) is at risk.
    assert replay_risk({"risk": {}}, suites, earlier)["c7"] == 0.0
    assert replay_risk({}, {}, earlier)["c7"] == float("inf"), "no suite asks about it: the rotation only"


def test_a_polish_continues_the_candidate_on_what_its_training_loss_shows_under_learned(foundation, home):
    polish = OPEN_GATES.model_copy(update={"polish_epochs": 1.0, "polish_loss": 1e-9})  # every new concept
    result = run_update(
        "know",
        home / "evening.json",
        eval_suite=home / "evening_suite.json",
        settings=polish,
        progress=False,
        log=lambda *_: None,
    )
    update = result.version.manifest.update.model_dump(by_alias=True)
    assert update["polish"]["concepts"] == ["pdca"] and update["polish"]["epochs"] == 1.0
    assert update["polish"]["first_concept_loss"]["pdca"] > 1e-9
    # All 6 pdca examples, and the replay and preservation in proportion (all of them: pdca is all the new data).
    assert update["polish"]["examples"] == 6 + update["replayed"] + update["preservation"]
    assert result.version.manifest.parent_version == "v1" and result.promoted
    assert (result.version.path / "adapter.gguf").is_file() and "evening_suite" in result.eval["suites"]
    assert result.version.manifest.config["training_config"]["num_epochs"] == 3, "the update's epochs, not the polish's"
    off = OPEN_GATES.model_copy(update={"polish_epochs": 1.0, "polish_loss": 1e9})  # nothing above: no polish
    again = run_update("know", home / "evening.json", settings=off, progress=False, log=lambda *_: None)
    assert "polish" not in again.version.manifest.update.model_dump(by_alias=True)


def test_a_repair_trains_the_candidate_further_on_the_new_concepts_it_answered_wrong(foundation, home):
    impossible = write(
        home / "impossible.json",
        [{"question": "What is PDCA?", "concept": "pdca", "required": ["a phrase the model never says"]}],
    )
    lines: list[str] = []
    gates = {"max_candidates": 1, "min_base_agreement": 0.0, "max_perplexity_increase": 100.0, "repair_epochs": 1.0}
    result = run_update(
        "know",
        home / "evening.json",
        eval_suite=impossible,
        settings=UpdateSettings(**gates),
        progress=False,
        log=lines.append,
    )
    assert not result.promoted and adapter_store.versions(foundation) == ["v1", "v2"], "one candidate, repaired"
    manifest = result.version.manifest
    repair = manifest.update.model_dump(by_alias=True)["repair"]
    assert repair["concepts"] == ["pdca"] and repair["forgotten"] == [] and repair["epochs"] == 1.0
    assert repair["first_reasons"][0].startswith("new knowledge impossible: 0%")
    assert repair["learning_rate"] == pytest.approx(3e-2 / 3 / 3), "a third of the update's rate"
    # All 6 pdca examples, and the replay and preservation in proportion (all of them: pdca is all the new data).
    assert repair["examples"] == 6 + manifest.update.replayed + manifest.update.preservation
    assert manifest.config["training_config"]["num_epochs"] == 3, "the update's epochs, not the repair's"
    assert manifest.metrics.learning_rate == pytest.approx(repair["learning_rate"]), "the repair's training"
    # Judged, repaired and judged again, twice (repair_rounds 2: the phrase is never said, so both rounds fail).
    assert sum("[candidate 1/1: evaluate]" in x for x in lines) == 3, "the repaired candidate was judged again"
    assert repair["round"] == 2 and [r["round"] for r in repair["earlier_rounds"]] == [1]
    assert repair["earlier_rounds"][0]["concepts"] == ["pdca"] and repair["first_reasons"][0].startswith("new know")
    assert repair["kept"] == [], "pdca is wrong again: aimed at, not kept"
    assert manifest.eval["reasons"][0].startswith("new knowledge impossible")
    assert (result.version.path / "eval" / "impossible.json").is_file() and any(
        "[candidate 1/1: repair]" in x for x in lines
    )
    # No repair for a concept the new data does not teach (nothing to train it on).
    elsewhere = write(
        home / "elsewhere.json", [{"question": "What is PDCA?", "concept": "elsewhere", "required": ["never said"]}]
    )
    lines.clear()
    untaught = run_update(
        "know",
        home / "evening.json",
        eval_suite=elsewhere,
        settings=UpdateSettings(**gates),
        progress=False,
        log=lines.append,
    )
    assert not untaught.promoted and "repair" not in untaught.version.manifest.update.model_dump(by_alias=True)
    assert sum("[candidate 1/1: evaluate]" in x for x in lines) == 1
    # No repair where it would not fit in the time an update may take.
    hurried = run_update(
        "know",
        home / "evening.json",
        eval_suite=impossible,
        progress=False,
        log=lines.append,
        settings=UpdateSettings(**{**gates, "max_update_seconds": 0.5}),
    )
    assert "repair" not in hurried.version.manifest.update.model_dump(by_alias=True)
    assert any(x.endswith("past the 0 s an update may take") and "no repair" in x for x in lines)


def test_a_repair_retrains_earlier_concepts_the_candidate_forgot(foundation, home):
    """An earlier question the live version answered right and the candidate does not: the repair trains the
    candidate further on every example of that earlier concept (with as many new examples), not a retry."""
    v1 = adapter_store.resolve("know@v1")
    # A question v1's manifest records as answered right, which no version can answer (its phrase is never said):
    # every candidate "forgets" it, so the foundation suite falls to 1 of 2 kept.
    impossible = {"question": "What does 42 mean, truly?", "concept": "42", "required": ["a phrase never said"]}
    suite = json.loads((v1.path / "eval" / "foundation.json").read_text())
    write(v1.path / "eval" / "foundation.json", suite + [impossible])
    manifest = json.loads((v1.path / "manifest.json").read_text())
    manifest["eval"]["suites"]["foundation"]["answers"].append(
        {"question": impossible["question"], "concept": "42", "answer": "a phrase never said", "passed": True}
    )
    write(v1.path / "manifest.json", manifest)
    lines: list[str] = []
    gates = {"max_candidates": 1, "min_base_agreement": 0.0, "max_perplexity_increase": 100.0, "repair_epochs": 1.0}
    result = run_update(
        "know",
        home / "evening.json",
        eval_suite=home / "evening_suite.json",
        settings=UpdateSettings(**gates),
        progress=False,
        log=lines.append,
    )
    update = result.version.manifest.update.model_dump(by_alias=True)
    repair = update["repair"]
    assert repair["forgotten"] == ["42"] and repair["concepts"] in ([], ["pdca"])  # the tiny model may miss pdca
    assert any(r.startswith("retention foundation: ") for r in repair["first_reasons"])
    # The 6 examples of the forgotten concept and the 6 new ones (focused when pdca was missed, else as many new
    # ones beside them), the replay less what is in already (all of it is concept 42), and the preservation in
    # proportion (all of it: at least as many focused examples as new ones).
    assert repair["examples"] == 6 + 6 + 0 + update["preservation"]
    assert any("[candidate 1/1: repair]" in x and "42 forgotten" in x for x in lines)
    assert sum("[candidate 1/1: evaluate]" in x for x in lines) == 3, "judged after each of the two repairs"
    assert not result.promoted, "the phrase is never said: still forgotten after the repair, so not promoted"
    assert any(r.startswith("retention foundation") for r in result.eval["reasons"])
    # A candidate that passes every gate is never repaired, though it lost an answer (here, below no gate).
    lenient = UpdateSettings(**{**gates, "min_retention": 0.0, "min_new_knowledge": 0.0})
    lines.clear()
    passed = run_update("know", home / "evening.json", settings=lenient, progress=False, log=lines.append)
    assert passed.promoted and "repair" not in passed.version.manifest.update.model_dump(by_alias=True)
    assert passed.eval["retention"]["foundation"] < 1.0, "it did lose the answer"
    assert not any("repair" in x for x in lines)


def test_shortfall_orders_candidates_by_gates_failed_then_by_what_they_missed():
    def verdict(reasons, new_accuracy, retention):
        under = []  # the new suite, when below its gate
        if new_accuracy is not None:
            right = round(new_accuracy * 20)
            under = [SuiteResult("new", [{"concept": "n", "passed": i < right} for i in range(20)])]
        failed = GateFailures(retention, under, {}, [])
        return Verdict(reasons, Emphasis(), {}, failed)

    one_miss = verdict(["new knowledge"], 0.9, {"old": 1.0})
    two_misses = verdict(["new knowledge"], 0.85, {"old": 1.0})
    one_miss_and_a_loss = verdict(["new knowledge"], 0.9, {"old": 0.96})
    two_gates = verdict(["new knowledge", "retention old"], 0.95, {"old": 0.9})
    passed = verdict([], None, {"old": 0.97})
    ranked = sorted([two_gates, one_miss_and_a_loss, passed, two_misses, one_miss], key=shortfall)
    assert ranked == [passed, one_miss, one_miss_and_a_loss, two_misses, two_gates]


def test_a_later_repair_round_keeps_training_what_an_earlier_round_repaired():
    rounds = [
        {"round": 1, "concepts": ["a", "b", "c"], "forgotten": ["old"]},
        {"round": 2, "concepts": ["c"], "forgotten": []},
    ]
    # Round 3 aims at c (still wrong) and at x, lost now: a and b, repaired in round 1, and old are kept.
    assert recently_repaired(rounds, ["c"], ["x"]) == (["a", "b"], ["old"])
    assert recently_repaired(rounds, [], ["old"]) == (["a", "b", "c"], []), "old is aimed at, not kept"
    assert recently_repaired([], ["c"], []) == ([], []), "a first round keeps nothing"


def test_update_flags_reach_the_settings_and_no_replay_budget_lifts_the_cap():
    from scalpel.cli.main import build_parser
    from scalpel.cli.update import settings_from_args

    def settings(*flags):
        return settings_from_args(build_parser().parse_args(["update", "know", "--data", "x.json", *flags]))

    assert settings().replay_budget == UpdateSettings().replay_budget == 48
    assert settings("--no-replay-budget").replay_budget is None
    assert settings("--replay-budget", "12", "--risk-margin", "1.5").model_dump(
        include={"replay_budget", "risk_margin"}
    ) == {
        "replay_budget": 12,
        "risk_margin": 1.5,
    }
    assert settings("--retention-check", "generate", "--new-repeats", "2", "--polish-epochs", "1").model_dump(
        include={"retention_check", "new_repeats", "polish_epochs"}
    ) == {"retention_check": "generate", "new_repeats": 2, "polish_epochs": 1.0}
    assert settings("--repair-epochs", "2", "--repair-rate-scale", "0.5").model_dump(
        include={"repair_epochs", "repair_rate_scale"}
    ) == {"repair_epochs": 2.0, "repair_rate_scale": 0.5}
    with pytest.raises(SystemExit):  # one or the other
        settings("--replay-budget", "12", "--no-replay-budget")


def test_a_retry_in_full_stays_within_the_budget():
    def example(concept, i):
        return Example(
            [{"role": "user", "content": f"{concept} {i}"}, {"role": "assistant", "content": "x"}], concept, f"d[{i}]"
        )

    earlier = [example(f"c{k}", i) for k in range(10) for i in range(20)]
    new = [example("n", i) for i in range(10)]
    forgotten = Emphasis(replay_in_full=tuple(f"c{k}" for k in range(10)))  # 200 examples asked for in full
    settings = UpdateSettings(preservation_ratio=0, replay_budget=30)
    _, replay, _ = training_mix(new, earlier, [], settings, forgotten, random.Random(0), {})
    assert len(replay) <= 2 * settings.replay_budget and len({id(e) for e in replay}) == len(replay)
    unbounded = settings.model_copy(update={"replay_budget": None})
    _, replay, _ = training_mix(new, earlier, [], unbounded, forgotten, random.Random(0), {})
    assert len(replay) == 200, "without a budget, a retry replays the forgotten concepts whole"


def test_a_gate_reason_never_rounds_a_miss_up_to_its_floor():
    answers = [{"concept": "a" if i else "b", "passed": bool(i)} for i in range(19)]  # 18 of 19 right
    failed = GateFailures({"old": 0.949}, [SuiteResult("new", answers)], {"old": 0.949}, [])
    reasons = gate_decision(failed, UpdateSettings())
    assert reasons == [
        "new knowledge new: 94.7% < 95% (failed: b)",
        "retention old: 94.9% of what the live version knew < 95%",
    ]
    failed = GateFailures({"old": 0.5}, [SuiteResult("new", answers[:2])], {"old": 0.5}, [])
    assert gate_decision(failed, UpdateSettings())[0].startswith("new knowledge new: 50% < 95%"), "whole percent"
