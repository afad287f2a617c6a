"""PyTorch (transformers + PEFT) and llama.cpp agree on logits for our converted base and adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conversion import verify
from conversion.architecture import layout_for
from conversion.hf_to_gguf import convert_base
from conversion.lora_to_gguf import convert_lora

N_TOKENS = 32


def llama_cpp_logits(gguf_path, tokens, lora_path=None) -> np.ndarray:
    """llama.cpp's logits for one prompt, with the f32 KV cache verify uses."""
    return verify.llama_cpp_logits(gguf_path, [tokens], lora_path)[0]


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    convert_base(tiny_llama, out, outtype="f32", progress=False)
    return out


@pytest.fixture(scope="module")
def prompt(tiny_llama):
    rng = np.random.default_rng(7)
    vocab = AutoModelForCausalLM.from_pretrained(tiny_llama).config.vocab_size
    return [int(t) for t in rng.integers(3, vocab, size=N_TOKENS)]


def torch_logits(model, tokens) -> np.ndarray:
    return verify.torch_logits(model, [tokens])[0]


def test_base_logits_match(tiny_llama, converted, prompt):
    expected = torch_logits(AutoModelForCausalLM.from_pretrained(tiny_llama), prompt)
    got = llama_cpp_logits(converted, prompt)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_logits_match(tiny_llama, converted, prompt, tmp_path, use_rslora):
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj"],
            init_lora_weights=False,
            use_rslora=use_rslora,
            lora_dropout=0.0,
        ),
    )
    peft_model.save_pretrained(tmp_path / "peft")
    expected = torch_logits(peft_model, prompt)
    without = torch_logits(AutoModelForCausalLM.from_pretrained(tiny_llama), prompt)
    assert np.abs(expected - without).max() > 1e-2, "the random adapter must change the logits"

    gguf_adapter = tmp_path / "adapter.gguf"
    convert_lora(tmp_path / "peft", layout_for(converted), gguf_adapter, outtype="f32")
    got = llama_cpp_logits(converted, prompt, lora_path=gguf_adapter)
    assert np.abs(got - expected).max() < 1e-3


SCALED_ROPE = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "linear": {"rope_type": "linear", "factor": 4.0},
}


@pytest.mark.parametrize("kind", sorted(SCALED_ROPE))
def test_scaled_rope_logits_match(tmp_path, prompt, kind):
    """Llama 3.1's rope scaling (the rope_freqs tensor) and linear scaling reach llama.cpp intact."""
    from tests.tiny_models import build_tiny_llama

    scaled = build_tiny_llama(tmp_path / "scaled", rope=SCALED_ROPE[kind])
    plain = build_tiny_llama(tmp_path / "plain")
    out = tmp_path / "scaled.gguf"
    convert_base(scaled, out, outtype="f32", progress=False)
    expected = torch_logits(AutoModelForCausalLM.from_pretrained(scaled), prompt)
    unscaled = torch_logits(AutoModelForCausalLM.from_pretrained(plain), prompt)
    assert np.abs(expected - unscaled).max() > 1e-2, "the scaling must change the logits"
    assert np.abs(llama_cpp_logits(out, prompt) - expected).max() < 1e-3
