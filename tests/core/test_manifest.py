"""The typed manifest: today's shape round-trips unchanged, older and minimal shapes load, damage names the file."""

from __future__ import annotations

import json
import math

import pytest

from core import adapter_store
from core.errors import ScalpelError
from core.manifest import (
    MANIFEST_NAME,
    BaseRef,
    DatasetRef,
    GgufInfo,
    Manifest,
    Metrics,
    read_manifest,
    write_manifest,
)

# What scalpel/publish.py writes today for an evening update's candidate trained by a job (every key at once).
FULL = {
    "adapter": "know",
    "base": {"name": "tiny", "fingerprint": "ab" * 32, "gguf": "/models/tiny/model.gguf"},
    "parent_version": "v1",
    "datasets": {
        "train": {"path": "/data/evening.json", "sha256": "cd" * 32},
        "eval": {"path": "/data/eval.json", "sha256": "ef" * 32},
    },
    "config": {
        "model_name": "tiny",
        "output_dir": "adapters/know",
        "lora_config": {"r": 4, "lora_alpha": 8},
        "training_config": {"learning_rate": 0.01, "distill_concepts": ["base_preservation"]},
    },
    "metrics": {
        "train_runtime": 1.5,
        "train_loss": 2.0,
        "epoch": 2.0,
        "final_loss": 1.25,
        "global_step": 6,
        "device": "cpu",
        "precision": "fp32",
        "examples": 6,
        "tokens": 120,
        "truncated_examples": 0,
        "train_seconds": 1.6,
        "convert_seconds": 0.02,
        "concepts": {"pdca": 6},
        "concept_loss": {"pdca": 0.5},
    },
    "gguf": {"outtype": "f32", "alpha": 8.0, "rank": 4, "modules": 14, "size_bytes": 123456},
    "data_quality": {
        "examples": 6,
        "concepts": {"pdca": 6},
        "avg_answer_words": 5.0,
        "errors": 0,
        "warnings": 1,
        "findings": [{"level": "warning", "where": "d[0]", "message": "few", "code": "few_examples"}],
    },
    "eval": {
        "suites": {"evening": {"accuracy": 1.0}},
        "promoted": True,
        "reasons": [],
        "lean_next": {"new_repeats": 1, "replay_in_full": ["pdca"], "preservation_scale": 1.0},
    },
    "update": {
        "new_data": "/data/evening.json",
        "new_examples": 2,
        "replayed": 6,
        "preservation": 3,
        "from": "know@v1",
        "candidate": 2,
        "emphasis": {"new_repeats": 2, "replay_in_full": ["pdca"], "preservation_scale": 1.0},
        "retry_of": "v2",
    },
    "job_id": "ftjob-abc",
    "fine_tuned_model": "ft:tiny:know:ftjob-abc",
    "created_at": "2025-01-01T20:00:00+00:00",
    "files": {"adapter.gguf": "12" * 32, "report.md": "34" * 32},
    "report": "report.md",
    "written_by_a_newer_scalpel": {"kept": True},
}

# The first manifests (no data_quality, concept_loss, report, nor anything an update or a job adds).
OLD = {
    "adapter": "old",
    "base": {"name": "tiny", "fingerprint": "ab" * 32, "gguf": "/m.gguf"},
    "parent_version": None,
    "datasets": {"train": {"path": "/d.json", "sha256": "cd" * 32}},
    "config": {"model_name": "tiny"},
    "metrics": {
        "final_loss": float("nan"),
        "global_step": 3,
        "examples": 6,
        "tokens": 60,
        "truncated_examples": 0,
        "train_seconds": 1.0,
        "convert_seconds": 0.1,
        "concepts": {"a": 6},
    },
    "gguf": {"outtype": "f32", "alpha": 8, "rank": 4, "modules": 14, "size_bytes": 1000},
    "eval": None,
    "files": {"adapter.gguf": "00" * 32},
    "created_at": "2024-06-01T10:00:00+00:00",
}


def stored(home, data, name: str = "know", version: str = "v1") -> adapter_store.AdapterVersion:
    folder = home / "adapters" / name / version
    folder.mkdir(parents=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (folder / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return adapter_store.AdapterVersion(name, version, folder)


def test_todays_manifest_is_typed_and_round_trips_unchanged(home):
    manifest = stored(home, FULL).manifest
    assert manifest.base == BaseRef(name="tiny", fingerprint="ab" * 32, gguf="/models/tiny/model.gguf")
    assert manifest.datasets["eval"] == DatasetRef(path="/data/eval.json", sha256="ef" * 32)
    assert manifest.metrics.final_loss == 1.25 and manifest.metrics.global_step == 6
    assert manifest.metrics.concept_loss == {"pdca": 0.5}
    assert manifest.metrics.model_extra == {"train_runtime": 1.5, "train_loss": 2.0, "epoch": 2.0}
    assert isinstance(manifest.gguf, GgufInfo) and manifest.gguf.size_bytes == 123456
    assert manifest.update is not None and manifest.update.from_ == "know@v1"
    assert manifest.update.emphasis.replay_in_full == ["pdca"] and manifest.update.retry_of == "v2"
    assert manifest.job_id == "ftjob-abc" and manifest.fine_tuned_model == "ft:tiny:know:ftjob-abc"
    assert manifest.config["training_config"]["learning_rate"] == 0.01  # the config stays a dict
    assert manifest.model_extra == {"written_by_a_newer_scalpel": {"kept": True}}
    assert manifest.to_json() == FULL, 'the JSON keys are the file\'s ("from", not from_), unknown ones kept'

    again = home / "again" / MANIFEST_NAME
    write_manifest(again, manifest)
    assert json.loads(again.read_text(encoding="utf-8")) == FULL
    assert read_manifest(again) == manifest
    assert not list(again.parent.glob(".*.tmp")), "written atomically, no temporary file left"


def test_old_and_minimal_manifests_load(home):
    old = stored(home, OLD, "old").manifest
    assert old.base is not None and old.base.name == "tiny" and old.parent_version is None
    assert math.isnan(old.metrics.final_loss) and old.metrics.concept_loss == {}
    assert old.data_quality is None and old.report is None and old.update is None and old.job_id is None
    assert old.gguf is not None and old.gguf.alpha == 8.0
    written = home / "old.json"
    write_manifest(written, old)
    assert set(json.loads(written.read_text(encoding="utf-8"))) == set(OLD), "no keys added on the way back"

    bench = stored(home, {"adapter": "bench_0", "bench": True}, "bench_0").manifest  # bench/serving.py's
    assert bench.adapter == "bench_0" and bench.base is None and bench.gguf is None
    assert bench.metrics == Metrics() and bench.datasets == {} and bench.fine_tuned_model is None
    assert bench.model_extra == {"bench": True} and bench.to_json() == {"adapter": "bench_0", "bench": True}
    with pytest.raises(ScalpelError, match="names no base model"):
        bench.require_base()

    assert stored(home, {}, "empty_object").manifest == Manifest()
    assert stored(
        home, {"update": {"emphasis": {"replay_in_full": ["a"]}}}, "partial"
    ).manifest.update.emphasis.replay_in_full == ["a"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is empty"),
        ("   \n", "is empty"),
        ('{"adapter": "know",', "not valid JSON"),
        ("[1, 2]", "must be a JSON object, not list"),
        ('{"gguf": {"outtype": "f32", "alpha": 8, "rank": 4, "modules": 1, "size_bytes": "big"}}', "gguf.size_bytes"),
        ('{"base": {"name": "tiny"}}', "base.fingerprint"),
    ],
)
def test_a_damaged_manifest_names_its_file_relative_to_the_store(home, text, says):
    version = stored(home, text)
    with pytest.raises(ScalpelError, match=says) as err:
        version.manifest  # noqa: B018 (reading is the test)
    assert err.value.param == "adapters/know/v1/manifest.json"
    assert err.value.message.startswith("adapters/know/v1/manifest.json")
    assert str(home) not in err.value.message and err.value.code == "manifest_invalid"


def test_a_missing_manifest_and_one_outside_the_home_are_named_without_absolute_paths(home, tmp_path_factory):
    folder = home / "adapters" / "know" / "v2"
    folder.mkdir(parents=True)
    with pytest.raises(ScalpelError, match="no manifest") as err:
        adapter_store.AdapterVersion("know", "v2", folder).manifest  # noqa: B018
    assert err.value.param == "adapters/know/v2/manifest.json" and err.value.code == "manifest_missing"

    elsewhere = tmp_path_factory.mktemp("elsewhere") / "mine" / "v1" / MANIFEST_NAME
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("{", encoding="utf-8")
    with pytest.raises(ScalpelError) as err:
        read_manifest(elsewhere)
    assert err.value.param == "mine/v1/manifest.json" and str(elsewhere.parent) not in err.value.message
