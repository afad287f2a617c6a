"""The conversion toolkit around the converters: quantization, verify, inspect, estimate, and bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conversion.architecture import layout_for
from conversion.estimate import NUCLEAR, load_profile, lora_size
from conversion.hf_to_gguf import convert_base, convert_to
from conversion.inspect_gguf import check_adapter
from conversion.verify import verify
from core.errors import ScalpelError
from core.gguf_meta import read_gguf
from scalpel.cli.main import main


@pytest.fixture(scope="module")
def f32_gguf(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("f32") / "tiny-f32.gguf"
    convert_base(tiny_llama, out, outtype="f32", progress=False)
    return out


def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)


def test_verify_f32_passes_at_1e3(tiny_llama, f32_gguf):
    report = verify(*hf(tiny_llama), f32_gguf)
    assert report.file_type == "ALL_F32" and report.passed and report.max_abs <= 1e-3
    assert report.top1 == 1.0 and report.positions > 50


def test_q8_0_keeps_top1_agreement(tiny_llama, tmp_path):
    out = tmp_path / "tiny-q8_0.gguf"
    convert_base(tiny_llama, out, outtype="q8_0", progress=False)
    report = verify(*hf(tiny_llama), out)
    assert report.file_type == "MOSTLY_Q8_0"
    assert report.top1_decided >= 0.98 and report.passed
    assert report.top1 >= 0.9  # near-ties may flip under llama.cpp's q8_0 activations, but not many


def test_k_quant_goes_through_llama_cpp(tiny_llama, tmp_path):
    out = convert_to(tiny_llama, tmp_path / "tiny-q4_k_m.gguf", "q4_k_m", progress=False)
    info = read_gguf(out, with_tokens=False)
    assert info.metadata["general.file_type"] == 15  # MOSTLY_Q4_K_M
    assert not list(tmp_path.glob(".*"))  # the f16 intermediate is gone


def test_verify_fails_when_the_gguf_is_wrong(tiny_llama, tmp_path):
    other = tmp_path / "other"
    from tests.tiny_models import build_tiny_llama

    build_tiny_llama(other, seed=99)
    convert_base(other, tmp_path / "other.gguf", outtype="f32", progress=False)
    assert not verify(*hf(tiny_llama), tmp_path / "other.gguf").passed


def test_unsupported_architecture_is_named(tiny_llama, tmp_path):
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScalpelError, match="GPT2LMHeadModel") as err:
        convert_base(folder, tmp_path / "x.gguf")
    assert err.value.code == "unsupported_architecture"
    assert not (tmp_path / "x.gguf").exists()


def test_unsupported_rope_scaling_is_named(tiny_llama, tmp_path):
    folder = tmp_path / "yarn"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScalpelError, match="config.json: rope_parameters.rope_type: yarn is not supported") as err:
        convert_base(folder, tmp_path / "x.gguf")
    assert err.value.param == "config.json: rope_parameters.rope_type"
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_gguf_is_refused_before_llama_cpp(f32_gguf, tmp_path, damage):
    bad = tmp_path / "bad.gguf"
    data = f32_gguf.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ScalpelError) as err:
        read_gguf(bad)
    assert err.value.code == "invalid_gguf" and str(bad) in err.value.message
    assert main(["inspect", str(bad)]) == 2
    assert main(["models", "add", "broken", str(bad)]) == 2


def test_inspect_reports_and_checks_compatibility(tiny_llama, f32_gguf, tmp_path, capsys):
    import torch
    from peft import LoraConfig, get_peft_model

    from conversion.lora_to_gguf import convert_lora

    torch.manual_seed(0)
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    ).save_pretrained(tmp_path / "peft")
    adapter = tmp_path / "a.gguf"
    convert_lora(tmp_path / "peft", layout_for(f32_gguf), adapter)
    assert check_adapter(read_gguf(adapter), layout_for(f32_gguf)).compatible
    assert main(["inspect", str(adapter), "--base", str(f32_gguf)]) == 0
    out = capsys.readouterr().out
    assert "adapter" in out and "blk.0.attn_q.weight.lora_a" in out and "compatible" in out

    from tests.tiny_models import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", hidden=32, n_head=2, n_head_kv=1)
    result = check_adapter(read_gguf(adapter), layout_for(other))
    assert not result.compatible and any("do not fit" in p for p in result.problems)
    assert main(["inspect", str(adapter), "--base", str(other)]) == 2


def test_estimate_codellama_from_config_alone():
    config, layout = load_profile("codellama-7b-instruct")
    surgical = lora_size(layout, 8, ["q_proj", "k_proj", "v_proj"])
    assert surgical.params == 32 * 3 * 8 * (4096 + 4096)
    assert 15 <= surgical.size_mb["f32"] <= 30  # the plan's 15-30 MB
    nuclear = lora_size(layout, NUCLEAR["r"], NUCLEAR["target_modules"])
    assert nuclear.params == 32 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008))


def test_estimate_cli_json(capsys):
    assert main(["estimate", "--base", "smollm2-135m-instruct", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"]["params"] == 30 * 8 * (576 + 192 + 192 + 3 * 576)
    assert result["memory"]["base_params"] > 130e6


@pytest.mark.e2e
def test_default_model_round_trip_verifies(home, tmp_path):
    """The embedded SmolLM2, dequantized to an HF folder, converted back: f32 exact, q8_0 top-1 >= 98%, and
    q8_0 passes the base-agreement gate."""
    from core import model_store
    from training.base_model import load_model, load_tokenizer

    entry = model_store.ensure_default()
    model, tokenizer = load_model(entry), load_tokenizer(entry)
    folder = tmp_path / "smollm2-hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for outtype in ("f32", "q8_0"):
        gguf_path = convert_to(folder, tmp_path / f"smollm2-{outtype}.gguf", outtype, progress=False)
        report = verify(model, tokenizer, gguf_path)
        assert report.passed, report
    assert report.top1_decided >= 0.98
    # The base-agreement gate's calibration (scalpel/evaluate.py): a mere re-quantization, which nobody
    # would call damage to the base, flips some near-ties but none of the base's decided picks.
    from scalpel import evaluate
    from serving.engine import Engine

    engine = Engine(entry)
    try:
        reference = evaluate.base_reference(engine)
    finally:
        engine.close()
    engine = Engine(model_store.register_gguf("smollm2-q8", gguf_path))
    try:
        q8 = evaluate.base_regression(engine, (), reference)  # the q8_0 base against the default's picks
    finally:
        engine.close()
    assert q8.agreement >= 0.99, "the gate would reject a mere re-quantization"
    assert q8.agreement_all_positions < 1.0 and 0.5 < q8.decided_share < 0.9, "but near-ties do flip"
