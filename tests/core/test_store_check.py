"""The adapter store heals: damage is found per entry, reported, and repaired from the pointer's own history."""

from __future__ import annotations

import pytest

from core import adapter_store, paths
from core.atomic import sha256_file
from core.manifest import Manifest, write_manifest
from core.store_check import check_store
from scalpel.cli.main import main


def publish_fake(name: str, payload: bytes) -> adapter_store.AdapterVersion:
    """A version with an adapter.gguf and a sealed manifest, as publishing leaves it (no model needed)."""
    root = adapter_store.root_for_name(name)
    with adapter_store.new_staging(root) as stage:
        (stage / "adapter.gguf").write_bytes(payload)
        write_manifest(
            stage / "manifest.json",
            Manifest(adapter=name, files={"adapter.gguf": sha256_file(stage / "adapter.gguf")}),
        )
        return adapter_store.publish(root, stage)


@pytest.fixture()
def store(home):
    publish_fake("a", b"first")
    publish_fake("a", b"second")  # a@v2 is live, a@v1 was before it
    publish_fake("b", b"other")
    return paths.adapters_dir()


def test_an_intact_store_has_no_findings(store, capsys):
    assert check_store() == []
    assert main(["adapters", "check"]) == 0 and "intact" in capsys.readouterr().out


def test_an_empty_pointer_is_rebuilt_from_the_activation_log(store, capsys):
    (store / "a" / "active.json").write_text("")
    assert adapter_store.list_adapters() == ["b"]
    assert main(["adapters", "check"]) == 2
    out = capsys.readouterr()
    assert "a/active.json: it is empty" in out.out and "--repair" in out.out and "1 problem" in out.err
    assert main(["adapters", "check", "--repair"]) == 0
    assert adapter_store.active_version(store / "a") == "v2" and adapter_store.list_adapters() == ["a", "b"]
    assert check_store() == []


def test_a_damaged_live_version_falls_back_to_the_last_intact_one(store):
    (store / "a" / "v2" / "adapter.gguf").write_bytes(b"flipped")
    findings = check_store(["a"])
    assert len(findings) == 1 and "sha256" in findings[0].problem and "v1" in (findings[0].repair or "")
    assert adapter_store.problems("a") and adapter_store.problems("b") == []
    check_store(["a"], repair=True)
    assert adapter_store.active_version(store / "a") == "v1"
    reasons = [h["reason"] for h in adapter_store.activation_history(store / "a")]
    assert "repaired" in reasons[-1]


def test_damage_without_history_is_reported_not_guessed(store, capsys):
    (store / "b" / "active.json").write_text("{not json")
    (store / "b" / "activations.jsonl").unlink()
    (store / "a" / "v1" / "manifest.json").write_text("[]")  # not live: reported, nothing to repair
    assert main(["adapters", "check", "--repair"]) == 2
    out = capsys.readouterr().out
    assert "b/active.json" in out and "a/v1/manifest.json" in out and "cannot be repaired" in out
    assert adapter_store.list_adapters() == ["a"]
    assert str(paths.home()) not in out
