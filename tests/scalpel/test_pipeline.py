"""Register an HF base, train, convert and publish a version; a failed run leaves the store untouched."""

from __future__ import annotations

import json

import llama_cpp
import pytest

from scalpel import adapter_store, model_store
from scalpel.cli import main
from scalpel.errors import ScalpelError
from scalpel.pipeline import train_and_publish
from training.config import parse_config

FACTS = [{"instruction": f"What is fact {i}?", "output": f"Fact {i} is FOR TWO.", "concept": f"c{i % 3}"}
         for i in range(6)]


def tiny_config(**training) -> dict:
    return {"model_name": "tiny", "output_dir": "adapters/tiny_adapter",
            "lora_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"]},
            "training_config": {"num_epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
                                "save_steps": 2, **training}}


@pytest.fixture()
def registered(home, tiny_llama):
    assert main(["models", "add", "tiny", str(tiny_llama), "--outtype", "f32"]) == 0
    data = home / "facts.json"
    data.write_text(json.dumps(FACTS))
    return data


def test_hf_folder_registers_as_gguf_base(registered):
    entry = model_store.get("tiny")
    assert entry.format == "hf" and entry.architecture == "llama"
    assert entry.gguf_path.is_file() and entry.gguf_path.name == "model-f32.gguf"
    assert "<|im_start|>" in entry.chat_template


def test_train_publishes_complete_versions_and_keeps_old_ones(registered, home):
    config = parse_config(tiny_config())
    first = train_and_publish(config, registered, progress=False)
    second = train_and_publish(config, registered, progress=False)
    root = adapter_store.root_for_output_dir(config.output_dir)
    assert adapter_store.versions(root) == ["v1", "v2"]
    assert adapter_store.active_version(root) == "v2"
    manifest = second.version.manifest
    assert manifest["parent_version"] == "v1"
    assert manifest["base"]["fingerprint"] == model_store.get("tiny").fingerprint
    assert set(manifest["files"]) >= {"adapter_model.safetensors", "adapter_config.json", "adapter.gguf"}
    assert manifest["metrics"]["examples"] == len(FACTS)
    assert first.version.path.is_dir()  # earlier versions are never overwritten
    # The GGUF adapter loads in llama.cpp against the base it was trained on.
    llm = llama_cpp.Llama(model_path=model_store.get("tiny").gguf, lora_path=str(second.version.gguf),
                          n_ctx=64, verbose=False)
    assert llm.tokenize(b"hello")
    llm.close()


def test_failed_training_leaves_the_store_exactly_as_it_was(registered, home):
    config = parse_config(tiny_config())
    train_and_publish(config, registered, progress=False)
    root = adapter_store.root_for_output_dir(config.output_dir)
    before = sorted(p.name for p in root.iterdir())
    long_prompt = [{"instruction": "word " * 400, "output": "x"}]
    bad = home / "too_long.json"
    bad.write_text(json.dumps(long_prompt))
    with pytest.raises(ScalpelError, match="max_seq_length"):
        train_and_publish(parse_config(tiny_config(max_seq_length=32)), bad, progress=False)
    assert sorted(p.name for p in root.iterdir()) == before
    assert adapter_store.active_version(root) == "v1"


def test_cli_names_the_bad_field_and_line(registered, home, capsys):
    bad_config = home / "bad.json"
    bad_config.write_text(json.dumps({**tiny_config(), "lora_config": {"r": "eight"}}))
    assert main(["train", str(bad_config), "--data", str(registered)]) == 2
    assert "lora_config.r" in capsys.readouterr().err

    good_config = home / "good.json"
    good_config.write_text(json.dumps(tiny_config()))
    bad_data = home / "bad.jsonl"
    bad_data.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    assert main(["train", str(good_config), "--data", str(bad_data)]) == 2
    assert f"{bad_data}:2" in capsys.readouterr().err


def test_convert_lora_cli_verifies_against_pytorch(registered, home, capsys):
    result = train_and_publish(parse_config(tiny_config()), registered, progress=False)
    out = home / "again.gguf"
    assert main(["convert", "lora", str(result.version.path), "--base", "tiny", "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "ALL_F32 + adapter" in printed and "PASS" in printed and out.is_file()


def test_dataset_errors_stop_training_before_it_starts(registered, home):
    bad = home / "empty_answer.json"
    bad.write_text(json.dumps(FACTS + [{"instruction": "q", "output": "   "}]))
    with pytest.raises(ScalpelError, match="empty") as err:
        train_and_publish(parse_config(tiny_config()), bad, progress=False)
    assert err.value.param.startswith(f"{bad}[6]")
    assert not adapter_store.root_for_output_dir("adapters/tiny_adapter").exists() or \
        adapter_store.versions(adapter_store.root_for_output_dir("adapters/tiny_adapter")) == []


def test_manifest_records_data_quality(registered):
    result = train_and_publish(parse_config(tiny_config()), registered, progress=False)
    quality = result.version.manifest["data_quality"]
    assert quality["examples"] == len(FACTS) and quality["errors"] == 0
    assert {f["code"] for f in quality["findings"]} >= {"few_examples", "short_answers"}


def test_gradient_checkpointing_and_precision_on_this_cpu(registered):
    config = parse_config(tiny_config(gradient_checkpointing=True))
    metrics = train_and_publish(config, registered, progress=False).version.manifest["metrics"]
    assert metrics["device"] == "cpu" and metrics["precision"] == "fp32"
    assert metrics["global_step"] == 3 and metrics["final_loss"] > 0


def test_each_version_has_a_report_with_plots(registered):
    version = train_and_publish(parse_config(tiny_config()), registered, progress=False).version
    report = (version.path / "report.md").read_text()
    assert "![loss](loss.png)" in report and "nuclear adapter" in report and "dataset sha256" in report
    assert set(version.manifest["metrics"]["concept_loss"]) == {"c0", "c1", "c2"}
    for png in ("loss.png", "lr.png", "concepts.png"):
        assert (version.path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in version.manifest["files"]


def test_eval_data_gives_concept_loss_at_every_evaluation(registered):
    config = parse_config(tiny_config(eval_steps=1))
    result = train_and_publish(config, registered, eval_data=registered, progress=False)
    per_eval = [h["eval_concept_loss"] for h in json.loads((result.version.path / "trainer_log.json").read_text())
                if "eval_concept_loss" in h]
    assert len(per_eval) == result.manifest["metrics"]["global_step"]
    assert set(per_eval[-1]) == {"c0", "c1", "c2"} and all(v > 0 for v in per_eval[-1].values())
    assert "![loss per concept](concepts.png)" in (result.version.path / "report.md").read_text()
