"""llama.cpp's own converters (from the pinned llama-cpp-python sdist) as the reference for ours, per tiny
architecture: same tokens on llama.cpp's test strings, same f32 logits for the base and base + LoRA."""

from __future__ import annotations

import pytest

from bench.reference import compare, find_reference
from tests.tiny_models import ARCHITECTURES

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def reference():
    folder, why = find_reference()
    if folder is None:
        pytest.skip(f"llama.cpp's reference converters are not available: {why}")
    return folder


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_ours_matches_llama_cpp_converters(reference, name, tmp_path):
    row = compare(name, reference, tmp_path)
    assert row.base_max_abs <= TOLERANCE and row.lora_max_abs <= TOLERANCE
    assert row.base_vs_torch <= TOLERANCE and row.lora_vs_torch <= TOLERANCE
    assert row.tokens_agree_hf == row.strings, "our GGUF must tokenize as transformers does"
    if ARCHITECTURES[name][1] == "SentencePiece tokenizer.model":
        # The reference reads added tokens from added_tokens.json or tokenizer_config.json, which transformers 5
        # no longer writes: it leaves CodeLlama-style <extra_N> tokens as [PAD], so only those strings differ.
        assert row.differ and all("<extra_" in t for t in row.differ)
    else:
        assert row.tokens_agree == row.strings
