"""A CodeLlama-shaped toy (SentencePiece + 16 added tokens, rope theta 1e6) converts exactly."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conversion.hf_to_gguf import convert_base
from conversion.verify import verify
from core.gguf_meta import read_gguf
from tests.conversion.test_tokenizer import TRICKY, llama_tokens
from tests.tiny_models import build_tiny_spm_llama
from training.base_model import match_llama_cpp_spm


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    folder = build_tiny_spm_llama(tmp_path_factory.mktemp("spm") / "model")
    out = folder.parent / "model-f32.gguf"
    convert_base(folder, out, outtype="f32", progress=False)
    return folder, out


def test_metadata_carries_codellama_specifics(spm_model):
    _, gguf_path = spm_model
    info = read_gguf(gguf_path)
    assert info.metadata["tokenizer.ggml.model"] == "llama"
    assert info.metadata["llama.rope.freq_base"] == pytest.approx(1e6)
    assert len(info.tokens) == 416 and info.tokens[400:402] == ["<extra_0>", "<extra_1>"]
    assert "[INST]" in info.metadata["tokenizer.chat_template"]
    assert info.metadata["tokenizer.ggml.bos_token_id"] == 1


def test_f32_logits_match(spm_model):
    folder, gguf_path = spm_model
    report = verify(AutoModelForCausalLM.from_pretrained(folder), _tokenizer(folder), gguf_path)
    assert report.passed and report.max_abs <= 1e-3


def _tokenizer(folder):
    return match_llama_cpp_spm(AutoTokenizer.from_pretrained(folder))


@pytest.mark.parametrize(
    "text", [t for t in TRICKY if "<|" not in t] + ["<extra_3>", "a<extra_15>b", "<extra_1><extra_2>x", "x<extra_1>"]
)
def test_tokenization_is_identical(spm_model, text):
    folder, gguf_path = spm_model
    assert llama_tokens(gguf_path, text) == _tokenizer(folder)(text, add_special_tokens=False)["input_ids"]


def test_text_after_a_special_token_needs_the_alignment(spm_model):
    """Without match_llama_cpp_spm, transformers' non-legacy SentencePiece drops the '▁' that llama.cpp puts
    before text following a special token: training would see other tokens than serving feeds."""
    folder, gguf_path = spm_model
    plain = AutoTokenizer.from_pretrained(folder)("a<extra_15>b", add_special_tokens=False)["input_ids"]
    assert plain != llama_tokens(gguf_path, "a<extra_15>b")


def test_the_gguf_loaded_tokenizer_matches_too(spm_model):
    """Training loads the tokenizer from the GGUF (load_tokenizer); it must agree with llama.cpp as well."""
    _, gguf_path = spm_model
    tokenizer = match_llama_cpp_spm(AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name))
    for text in ["a<extra_15>b", "def f(x):\n    return x", "[INST] hi [/INST]"]:
        assert llama_tokens(gguf_path, text) == tokenizer(text, add_special_tokens=False)["input_ids"], text
