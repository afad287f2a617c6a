"""Register an HF base, train, convert, evaluate and publish a version; a failed run leaves the store untouched."""

from __future__ import annotations

import json

import llama_cpp
import pytest

from core import adapter_store, model_store
from core.errors import ScalpelError
from scalpel import evaluate
from scalpel.cli.main import main
from scalpel.publish import publish_staged, read_training_data, stage_version, train_and_publish
from training.config import parse_config
from training.dataset import examples_hash, file_hash, load_examples

FACTS = [
    {"instruction": f"What is fact {i}?", "output": f"Fact {i} is FOR TWO.", "concept": f"c{i % 3}"} for i in range(6)
]


def tiny_config(**training) -> dict:
    return {
        "model_name": "tiny",
        "output_dir": "adapters/tiny_adapter",
        "lora_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"]},
        "training_config": {
            "num_epochs": 1,
            "batch_size": 2,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 2,
            **training,
        },
    }


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
    assert manifest.parent_version == "v1"
    assert manifest.base is not None and manifest.base.fingerprint == model_store.get("tiny").fingerprint
    assert set(manifest.files) >= {"adapter_model.safetensors", "adapter_config.json", "adapter.gguf"}
    assert manifest.preservation is not None and manifest.preservation.examples == 3  # 0.5 per example
    assert manifest.metrics.examples == len(FACTS) + 3
    assert manifest.gguf is not None and manifest.gguf.size_bytes == second.version.gguf.stat().st_size
    assert manifest.datasets["train"].sha256 and manifest.report == "report.md"
    assert first.version.path.is_dir()  # earlier versions are never overwritten
    # The GGUF adapter loads in llama.cpp against the base it was trained on.
    llm = llama_cpp.Llama(
        model_path=model_store.get("tiny").gguf, lora_path=str(second.version.gguf), n_ctx=64, verbose=False
    )
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
    assert (
        not adapter_store.root_for_output_dir("adapters/tiny_adapter").exists()
        or adapter_store.versions(adapter_store.root_for_output_dir("adapters/tiny_adapter")) == []
    )


def test_manifest_records_data_quality(registered):
    result = train_and_publish(parse_config(tiny_config()), registered, progress=False)
    quality = result.version.manifest.data_quality
    assert quality is not None
    assert quality["examples"] == len(FACTS) and quality["errors"] == 0
    assert {f["code"] for f in quality["findings"]} >= {"few_examples", "short_answers"}


def test_gradient_checkpointing_and_precision_on_this_cpu(registered):
    config = parse_config(tiny_config(gradient_checkpointing=True))
    metrics = train_and_publish(config, registered, progress=False, preserve=None).version.manifest.metrics
    # auto: fp32 for the 64-wide tiny model, whatever the CPU (bf16 only from training.precision.MIN_BF16_WIDTH)
    assert metrics.device == "cpu" and metrics.precision == "fp32"
    assert metrics.global_step == 3 and metrics.final_loss > 0


def test_each_version_has_a_report_with_plots(registered):
    version = train_and_publish(parse_config(tiny_config()), registered, progress=False).version
    report = (version.path / "report.md").read_text()
    assert "![loss](loss.png)" in report and "nuclear adapter" in report and "dataset sha256" in report
    assert set(version.manifest.metrics.concept_loss) == {"c0", "c1", "c2", "base_preservation"}
    for png in ("loss.png", "lr.png", "concepts.png", "eval.png"):
        assert (version.path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in version.manifest.files


def test_the_report_puts_what_is_left_of_the_base_beside_the_knowledge(registered):
    """The first version is evaluated before it is published: its report and manifest give the knowledge scores,
    and beside them the general questions answered right (the base's own score too) and base agreement."""
    version = train_and_publish(parse_config(tiny_config()), registered, progress=False).version
    outcome = version.manifest.eval
    assert outcome is not None and set(outcome["suites"]) == {"facts.derived"}
    general, base = outcome["general"], outcome["base_regression"]
    assert general["total"] == len(evaluate.general_questions()) and 0 <= general["base_passed"] <= general["total"]
    assert 0 <= base["agreement"] <= 1
    report = (version.path / "report.md").read_text()
    section = report[report.index("## Evaluation") : report.index("## Config")]
    passed = sum(a["passed"] for a in outcome["suites"]["facts.derived"]["answers"])
    assert f"| knowledge: facts.derived (derived from the training data) | {passed}/6 " in section
    assert (
        f"| general questions with known answers | {general['passed']}/{general['total']} " in section
        and f"| {general['base_passed']}/{general['total']} " in section
    )
    assert f"| base agreement (the base's decided next tokens, along its own answers) | {base['agreement']:.1%}" in (
        section
    )
    assert "Base preservation: 3 of the base's own answers to general prompts mixed in" in section
    assert "![evaluation](eval.png)" in section
    # Evaluated again (as `scalpel update` does for a candidate), the section is replaced, not repeated.
    from training.report import EvalSummary, add_evaluation

    add_evaluation(EvalSummary(base_agreement=0.5, agreement_all_positions=0.5), version.path)
    again = (version.path / "report.md").read_text()
    assert again.count("## Evaluation") == 1 and "| 50.0% (50.0% of all) | 100% |" in again
    assert again.index("## Evaluation") < again.index("## Config")


def test_a_version_without_a_suite_keeps_one_derived_from_its_data(registered, home):
    """Trained without --suite, a version keeps a suite of its own training questions, so the next update
    checks what it knew; with one, the given suite is kept instead."""
    version = train_and_publish(parse_config(tiny_config()), registered, progress=False).version
    assert "eval/facts.derived.json" in version.manifest.files
    items = evaluate.load_suite(version.path / "eval" / "facts.derived.json")
    assert [i.question for i in items] == [f["instruction"] for f in FACTS], "every concept, then the next"
    assert {i.concept for i in items} == {"c0", "c1", "c2"} and all(i.required == ["FOR TWO"] for i in items)
    assert len(version.manifest.eval["suites"]["facts.derived"]["answers"]) == len(FACTS)
    suite = home / "given.json"
    suite.write_text(json.dumps([{"question": "What is fact 1?", "concept": "c1", "required": ["FOR TWO"]}]))
    given = train_and_publish(parse_config(tiny_config()), registered, progress=False, eval_suites=(suite,)).version
    assert [f for f in given.manifest.files if f.startswith("eval/")] == ["eval/given.json"]
    assert set(given.manifest.eval["suites"]) == {"given"}


def test_eval_data_gives_concept_loss_at_every_evaluation(registered):
    config = parse_config(tiny_config(eval_steps=1))
    result = train_and_publish(config, registered, eval_data=registered, progress=False)
    per_eval = [
        h["eval_concept_loss"]
        for h in json.loads((result.version.path / "trainer_log.json").read_text())
        if "eval_concept_loss" in h
    ]
    assert len(per_eval) == result.version.manifest.metrics.global_step
    assert set(per_eval[-1]) == {"c0", "c1", "c2"} and all(v > 0 for v in per_eval[-1].values())
    assert "![loss per concept](concepts.png)" in (result.version.path / "report.md").read_text()


def test_a_staged_version_enters_the_store_only_when_published(registered, home):
    """stage_version trains and converts into a staging folder; publish_staged moves it in, live or not."""
    config = parse_config(tiny_config())
    train_and_publish(config, registered, progress=False)
    root = adapter_store.root_for_output_dir(config.output_dir)
    data = read_training_data(registered)
    with stage_version(config, data, progress=False) as staged:
        assert staged.manifest.eval is None and "files" not in staged.manifest.to_json()
        assert staged.version.gguf.is_file() and staged.version.version == staged.stage.name.lstrip(".")
    assert adapter_store.versions(root) == ["v1"] and not list(root.glob(".staging-*")), "not published: gone"
    with stage_version(config, data, progress=False) as staged:
        staged.manifest.eval = {"promoted": False}
        version = publish_staged(staged, activate=False)
    assert adapter_store.versions(root) == ["v1", "v2"] and adapter_store.active_version(root) == "v1"
    assert version.manifest.eval == {"promoted": False} and "adapter.gguf" in version.manifest.files


def test_examples_in_memory_hash_as_their_file_would(tmp_path):
    """An update's mix is handed to training in memory; its manifest hash is the one of the mix as a file."""
    chat = [
        {"messages": [{"role": "user", "content": f"q{i} é"}, {"role": "assistant", "content": "a"}], "concept": "c"}
        for i in range(3)
    ]
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat), encoding="utf-8")
    assert examples_hash(load_examples(path)) == file_hash(path)


def test_the_report_counts_only_the_steps_that_ran(registered):
    """A --max-steps run: tokens/s is the tokens those steps saw over their own time, not the whole epochs over
    the whole call, and the learning rate is recorded at every step."""
    from training.trainer import train

    config = parse_config(tiny_config(num_epochs=4, warmup_steps=2))
    result = train_and_publish(config, registered, progress=False, max_steps=3)
    metrics = result.version.manifest.metrics
    assert metrics.global_step == 3
    assert 0 < (metrics.tokens_trained or 0) < (metrics.tokens or 0) * 4  # 3 steps of 2 examples, not 4 epochs
    report = (result.version.path / "report.md").read_text()
    assert f"{metrics.tokens_trained} tokens" in report and "loading the model" in report
    staged = train(
        config,
        model_store.get("tiny"),
        load_examples(registered),
        registered.parent / "out",
        registered.parent / "work",
        max_steps=3,
        progress=False,
    )
    assert [step for step, _ in staged.learning_rates] == [1, 2, 3]
    assert staged.learning_rates[0][1] < staged.learning_rates[1][1]  # the warm-up, seen at every step
    assert 0 < staged.train_seconds <= staged.seconds


def test_dataset_warnings_come_before_training(registered, home):
    seen: list[str] = []
    small = home / "small.json"
    small.write_text(json.dumps(FACTS[:2]))  # far fewer than the plan's 100 examples: a warning
    train_and_publish(
        parse_config(tiny_config()),
        small,
        progress=False,
        max_steps=1,
        on_warnings=lambda findings: seen.extend(f.code for f in findings),
        callbacks=(_NotYet(seen),),
    )
    assert seen and seen[-1] == "training started" and len(seen) > 1


class _NotYet:
    """A Trainer callback that notes when training begins, after any warnings."""

    def __init__(self, seen: list[str]):
        self.seen = seen

    def __getattr__(self, name):
        if name == "on_train_begin":
            return lambda *a, **k: self.seen.append("training started")
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)
