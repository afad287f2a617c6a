"""The conversion commands users already type: llama.cpp's converter flags work on `scalpel convert` and on the
`scalpel-convert-hf` / `scalpel-convert-lora` entry points, or are refused by name."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from core.gguf_meta import read_gguf
from scalpel.cli.convert_compat import COMMON, main_hf, main_lora
from scalpel.cli.main import main
from tests.conversion.test_tokenizer import llama_tokens

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    torch.manual_seed(5)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(folder)
    return folder


def test_the_entry_points_are_installed_scripts():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'scalpel-convert-hf = "scalpel.cli.convert_compat:main_hf"' in pyproject
    assert 'scalpel-convert-lora = "scalpel.cli.convert_compat:main_lora"' in pyproject
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert installed.get("scalpel-convert-hf") == "scalpel.cli.convert_compat:main_hf"
    assert installed.get("scalpel-convert-lora") == "scalpel.cli.convert_compat:main_lora"


def test_reference_base_command_writes_what_scalpel_convert_writes(tiny_llama, tmp_path):
    assert main_hf([str(tiny_llama), "--outfile", str(tmp_path / "ref-{ftype}.gguf"), "--outtype", "f32"]) == 0
    args = ["convert", "base", str(tiny_llama), "--outfile", str(tmp_path / "ours.gguf"), "--outtype", "f32"]
    assert main(args) == 0
    assert (tmp_path / "ref-f32.gguf").read_bytes() == (tmp_path / "ours.gguf").read_bytes()
    assert read_gguf(tmp_path / "ours.gguf", with_tokens=False).metadata["general.file_type"] == 0  # ALL_F32


def test_outtype_auto_is_16_bit(tiny_llama, tmp_path):
    assert main_hf([str(tiny_llama), "--outfile", str(tmp_path / "m-{ftype}.gguf")]) == 0  # auto is the default
    assert read_gguf(tmp_path / "m-f16.gguf", with_tokens=False).metadata["general.file_type"] == 1  # MOSTLY_F16


def test_vocab_only_writes_a_tokenizer_and_no_tensors(tiny_llama, tmp_path):
    out = tmp_path / "vocab.gguf"
    assert main(["convert", "base", str(tiny_llama), "--vocab-only", "--outfile", str(out)]) == 0
    info = read_gguf(out)
    assert not info.tensors and len(info.tokens) > 300
    assert llama_tokens(out, "def add(a, b):") == llama_tokens(_full(tiny_llama, tmp_path), "def add(a, b):")


def _full(folder, tmp_path):
    out = tmp_path / "full.gguf"
    assert main_hf([str(folder), "--outfile", str(out), "--outtype", "f16"]) == 0
    return out


@pytest.mark.parametrize("command", ["hf", "scalpel"])
def test_dry_run_writes_nothing(tiny_llama, tmp_path, capsys, command):
    out = tmp_path / "x.gguf"
    argv = [str(tiny_llama), "--outfile", str(out), "--dry-run"]
    assert (main_hf(argv) if command == "hf" else main(["convert", "base", *argv])) == 0
    assert "would write" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "flag", [["--bigendian"], ["--split-max-size", "2G"], ["--mmproj"], ["--remote"], ["--metadata", "m.json"]]
)
def test_unimplemented_reference_flags_are_refused_by_name(tiny_llama, tmp_path, capsys, flag):
    argv = [str(tiny_llama), "--outfile", str(tmp_path / "x.gguf"), *flag]
    assert main_hf(argv) == 2
    if flag[0] in COMMON:  # `scalpel convert base` gives the reason for the ones users type most
        assert main(["convert", "base", *argv]) == 2
    assert capsys.readouterr().err.count(f"{flag[0]} is not supported") == (2 if flag[0] in COMMON else 1)
    assert not list(tmp_path.iterdir())


def test_reference_defaults_that_mean_nothing_pass(tiny_llama, tmp_path):
    argv = [str(tiny_llama), "--outfile", str(tmp_path / "x.gguf"), "--split-max-size", "0", "--no-lazy"]
    assert main_hf([*argv, "--use-temp-file", "--model-name", "Tiny"]) == 0
    assert read_gguf(tmp_path / "x.gguf", with_tokens=False).metadata["general.name"] == "Tiny"


def test_reference_lora_command_writes_what_scalpel_convert_writes(tiny_llama, adapter, tmp_path):
    ref = ["--outfile", str(tmp_path / "ref.gguf"), "--outtype", "f32", "--base", str(tiny_llama)]
    assert main_lora([str(adapter), *ref]) == 0
    assert (
        main(["convert", "lora", str(adapter), "--base", str(tiny_llama), "--outfile", str(tmp_path / "o.gguf")]) == 0
    )
    assert (tmp_path / "ref.gguf").read_bytes() == (tmp_path / "o.gguf").read_bytes()


def test_lora_base_defaults_to_the_adapter_config(adapter, tmp_path):
    """As the reference does without --base: adapter_config.json's base_model_name_or_path (a folder here)."""
    assert main_lora([str(adapter), "--outfile", str(tmp_path / "a.gguf")]) == 0
    assert read_gguf(tmp_path / "a.gguf", with_tokens=False).tensors


def test_lora_base_model_id_outside_the_cache_is_named(adapter, tmp_path, capsys):
    assert main_lora([str(adapter), "--base-model-id", "nobody/no-such-model", "--outfile", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--base-model-id: nobody/no-such-model is not in the local Hugging Face cache" in err
    assert not list(tmp_path.iterdir())


def test_lora_dry_run_and_refusals(tiny_llama, adapter, tmp_path, capsys):
    base = ["--base", str(tiny_llama), "--outfile", str(tmp_path / "a.gguf")]
    assert main_lora([str(adapter), *base, "--dry-run"]) == 0
    assert "would write" in capsys.readouterr().out
    assert main_lora([str(adapter), *base, "--bigendian"]) == 2
    assert main(["convert", "lora", str(adapter), *base, "--trust-remote-code"]) == 2
    err = capsys.readouterr().err
    assert "--bigendian is not supported" in err and "--trust-remote-code is not supported" in err
    assert not list(tmp_path.iterdir())


def test_an_existing_reference_command_works_after_changing_its_first_word(tiny_llama, tmp_path):
    """`python convert_hf_to_gguf.py DIR --outfile F --outtype f32` becomes `scalpel-convert-hf DIR ...`."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "scalpel-convert-hf"
    if not script.is_file():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    out = tmp_path / "m.gguf"
    done = subprocess.run(
        [str(script), str(tiny_llama), "--outfile", str(out), "--outtype", "f32"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert read_gguf(out, with_tokens=False).metadata["general.file_type"] == 0
    refused = subprocess.run([str(script), str(tiny_llama), "--bigendian"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--bigendian is not supported" in refused.stderr
    assert "Traceback" not in refused.stderr
