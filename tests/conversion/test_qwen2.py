"""Qwen2 (biases, NEOX rope) converts exactly, base and adapter, through the same gguf name maps."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from conversion.hf_to_gguf import convert_base
from conversion.verify import verify
from core.gguf_meta import read_gguf
from tests.tiny_models import build_tiny_qwen2


def test_qwen2_base_and_adapter_match(tmp_path):
    folder = build_tiny_qwen2(tmp_path / "qwen2")
    out = tmp_path / "qwen2.gguf"
    convert_base(folder, out, outtype="f32", progress=False)
    assert read_gguf(out).architecture == "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert verify(AutoModelForCausalLM.from_pretrained(folder), tokenizer, out).max_abs <= 1e-3

    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "peft")
    report = verify(AutoModelForCausalLM.from_pretrained(folder), tokenizer, out, peft_dir=tmp_path / "peft")
    assert report.adapter and report.passed and report.max_abs <= 1e-3
