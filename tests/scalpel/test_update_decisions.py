"""The evening update's decisions on a small inbox of the example evenings, compared with a recorded golden file.

Two evenings on the tiny base: a file whose suite the tiny model cannot pass (rejected, retried, held, tried again
the next evening from the new live version, then set aside), a file without a suite (promoted), and a file the
dataset check refuses. Only what is decided is recorded, not seconds or scores that depend on float rounding;
the base-regression gates are opened wide because on a tiny random model they hang on a handful of tokens.

Regenerate the golden file (after a change that is meant to change decisions) with
SCALPEL_RECORD_DECISIONS=1 .venv/bin/python -m pytest tests/scalpel/test_update_decisions.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from core import adapter_store
from scalpel.cli.main import main
from scalpel.publish import train_and_publish
from scalpel.update import UpdateResult, UpdateSettings, run_inbox
from training.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
EVENINGS = ROOT / "examples" / "evenings"
GOLDEN = Path(__file__).with_name("update_decisions.json")
# Open base gates (see the module docstring) and a time limit that can never decide whether a retry runs.
SETTINGS = dict(min_base_agreement=0.0, max_perplexity_increase=100.0, max_update_seconds=1e9)


def _copy(source: Path, target: Path, keep: slice = slice(None), mtime: float | None = None) -> Path:
    """A trimmed copy of an example file (fewer examples: the test stays short on two cores)."""
    target.write_text(
        json.dumps(json.loads(source.read_text(encoding="utf-8"))[keep], ensure_ascii=False), encoding="utf-8"
    )
    if mtime is not None:
        os.utime(target, (mtime, mtime))  # run_inbox goes oldest first
    return target


def _decision(result: UpdateResult) -> dict:
    """What one update decided, and the candidates it trained on the way."""
    return {
        "file": Path(_manifest(result.version.path)["update"]["new_data"]).name,
        "version": result.version.version,
        "promoted": result.promoted,
        "reasons": result.reasons,
        "candidates": [
            {"version": c["version"], "promoted": c["promoted"], "reasons": c["reasons"], "emphasis": c["emphasis"]}
            for c in result.candidates
        ],
        "trained": [_candidate(_manifest(result.version.path.parent / c["version"])) for c in result.candidates],
    }


def _manifest(folder: Path) -> dict:
    """A version's manifest.json as written (plain JSON: the golden file compares JSON)."""
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _candidate(manifest: dict) -> dict:
    """A candidate's mix and gate outcome, from its manifest."""
    update, outcome = manifest["update"], manifest["eval"]
    return {
        "parent_version": manifest["parent_version"],
        "examples": manifest["metrics"]["examples"],
        **{k: update[k] for k in ("from", "candidate", "retry_of", "new_examples", "replayed", "preservation")},
        "suites": {name: suite["accuracy"] for name, suite in outcome["suites"].items()},
        "retention": outcome["retention"],
        "promoted": outcome["promoted"],
        "reasons": outcome["reasons"],
        "lean_next": outcome["lean_next"],
        "kept": sorted(k for k in manifest["files"] if k.startswith(("data/", "eval/"))),
    }


def _inbox_state(inbox: Path) -> dict:
    """Where every file of the inbox went (the time-stamped folder names left out)."""

    def names(folder: str) -> list[str]:
        return sorted(f.name for f in (inbox / folder).rglob("*") if f.is_file())

    errors = {
        f.name: f.read_text(encoding="utf-8").replace(str(inbox), "<inbox>")
        for f in (inbox / "rejected").rglob("*.error.txt")
    }
    attempts = {
        f.name: {k: v for k, v in json.loads(f.read_text()).items() if k != "sha256"}
        for f in (inbox / "not-promoted").rglob("*.attempts.json")
    }
    held = {
        name: {k: v for k, v in tried.items() if k != "sha256"}
        for name, tried in json.loads((inbox / ".held.json").read_text()).items()
    }
    return {
        "inbox": sorted(f.name for f in inbox.iterdir() if f.is_file()),
        "archive": names("archive"),
        "not-promoted": names("not-promoted"),
        "rejected": names("rejected"),
        "errors": errors,
        "attempts": attempts,
        "held": held,
        "live": adapter_store.active_version(adapter_store.root_for_name("know")),
    }


def test_the_evening_updates_decide_as_recorded(home, tiny_llama):
    assert main(["models", "add", "tiny", str(tiny_llama), "--outtype", "f32"]) == 0
    config = parse_config(
        {
            "model_name": "tiny",
            "output_dir": "adapters/know",
            "lora_config": {"r": 4, "lora_alpha": 8},
            "training_config": {"num_epochs": 3, "batch_size": 4, "learning_rate": 3e-2, "save_steps": 1000},
        }
    )
    foundation = json.loads((EVENINGS / "foundation.json").read_text(encoding="utf-8"))
    found = home / "foundation.json"
    found.write_text(json.dumps(foundation[:3] + foundation[10:13], ensure_ascii=False), encoding="utf-8")
    suite = _copy(EVENINGS / "foundation.eval.json", home / "foundation.eval.json", slice(0, 6, 3))
    train_and_publish(config, found, progress=False, eval_suites=(suite,))

    inbox = home / "inbox"
    inbox.mkdir()
    for i, stem in enumerate(("evening01_one_plus_one", "evening03_tsranger_testing", "evening05_pdca")):
        _copy(EVENINGS / f"{stem}.json", inbox / f"{stem}.json", slice(4), mtime=1e9 + i)
        if stem != "evening05_pdca":  # an evening without a suite: only retention and the base are gated
            _copy(EVENINGS / f"{stem}.eval.json", inbox / f"{stem}.eval.json")
    broken = json.loads((inbox / "evening03_tsranger_testing.json").read_text(encoding="utf-8"))
    broken[1] = {
        "messages": [{"role": "user", "content": broken[1]["instruction"]}, {"role": "assistant", "content": "   "}],
        "concept": broken[1]["concept"],
    }
    (inbox / "evening03_tsranger_testing.json").write_text(json.dumps(broken), encoding="utf-8")
    os.utime(inbox / "evening03_tsranger_testing.json", (1e9 + 1, 1e9 + 1))  # the dataset check refuses it

    recorded = []
    # Evening one: two candidates each; evening two: the file held back is tried once more, then set aside.
    for evening, candidates in ((1, 2), (2, 1)):
        settings = UpdateSettings(max_candidates=candidates, **SETTINGS)
        results = run_inbox("know", inbox, settings=settings, attempts=2, progress=False, log=lambda *_: None)
        recorded.append({"evening": evening, "updates": [_decision(r) for r in results], "after": _inbox_state(inbox)})

    recorded = json.loads(json.dumps(recorded))  # as the golden file has it: tuples become lists
    if os.environ.get("SCALPEL_RECORD_DECISIONS") == "1":
        GOLDEN.write_text(json.dumps(recorded, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    assert recorded == json.loads(GOLDEN.read_text(encoding="utf-8")), (
        "the evening update decided differently from tests/scalpel/update_decisions.json"
    )
