"""A GGUF base unpacked once: the kept copy gives the tokens and weights of a fresh conversion, is written whole or
not at all, and is not kept past the size limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from core import model_store
from tests.tiny_models import build_tiny_spm_llama, registered_home
from training import dense_cache
from training.base_model import load_model, load_tokenizer

TEXTS = ["What does 42 mean?", "  two leading spaces", "a<|im_end|>b", "FOR TWO: 1 + 1 = 11.\nnew line"]


@pytest.fixture(params=["bpe", "spm"])
def gguf_base(request, tiny_llama, tmp_path, monkeypatch):
    """A tiny base registered as a GGUF file (the cache's case), from a BPE or a SentencePiece tokenizer."""
    model = tiny_llama if request.param == "bpe" else build_tiny_spm_llama(tmp_path / "spm")
    with registered_home(tmp_path / "home", model) as home:
        converted = home / "models" / "tiny" / "model-f32.gguf"
        yield model_store.register_gguf("tinygguf", converted)


def test_the_kept_copy_gives_the_fresh_conversions_tokens_and_weights(gguf_base, monkeypatch):
    fresh_tokenizer, fresh_model = load_tokenizer(gguf_base), load_model(gguf_base, torch.float32)
    for what in ("tokenizer", "float32"):
        copy = dense_cache.folder(gguf_base, what)
        assert (copy / "done").is_file(), f"{what} kept after the first load"
        assert copy.stat().st_mode & 0o005 == 0o005 & ~current_umask(), "readable by the store's other users"
    read = []
    loader = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda source, *a, **k: read.append(Path(source)) or loader(source, *a, **k),
    )
    kept_tokenizer, kept_model = load_tokenizer(gguf_base), load_model(gguf_base, torch.float32)
    assert read == [dense_cache.folder(gguf_base, "float32")], "the second load reads the kept copy, not the GGUF"
    for text in TEXTS:
        assert kept_tokenizer(text)["input_ids"] == fresh_tokenizer(text)["input_ids"], text
    assert kept_model.name_or_path == fresh_model.name_or_path, "named by the GGUF's folder, not the cache's"
    fresh, kept = fresh_model.state_dict(), kept_model.state_dict()
    assert fresh.keys() == kept.keys() and all(torch.equal(fresh[k], kept[k]) for k in fresh)
    ids = torch.randint(3, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(kept_model(input_ids=ids).logits, fresh_model(input_ids=ids).logits)
    bf16 = load_model(gguf_base, torch.bfloat16)  # another dtype, another copy
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert (dense_cache.folder(gguf_base, "bfloat16") / "done").is_file()


def test_a_partial_copy_is_ignored_and_the_limit_keeps_none(gguf_base, monkeypatch):
    partial = dense_cache.folder(gguf_base, "float32")
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # a run killed while it wrote: no "done"
    model = load_model(gguf_base, torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    assert (partial / "done").is_file(), "the half-written folder was not read, and a whole copy replaced it"
    monkeypatch.setenv(dense_cache.LIMIT_ENV, "0")
    load_model(gguf_base, torch.bfloat16)
    assert not dense_cache.folder(gguf_base, "bfloat16").exists(), "the cache is off: not kept"
    monkeypatch.setenv(dense_cache.LIMIT_ENV, "0.000001")  # about a kilobyte: the tiny model is bigger
    load_model(gguf_base, torch.bfloat16)
    assert not dense_cache.folder(gguf_base, "bfloat16").exists(), "over the limit: not kept"


def test_a_copy_that_cannot_be_read_is_made_again(gguf_base):
    load_model(gguf_base, torch.float32)
    copy = dense_cache.folder(gguf_base, "float32")
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(b"not safetensors")
    model = load_model(gguf_base, torch.float32)  # reads the damaged copy, fails, converts, keeps a new one
    assert next(model.parameters()).dtype == torch.float32
    assert (copy / "done").is_file() and next(copy.glob("*.safetensors")).stat().st_size > 1000


def test_a_copy_missing_a_tensor_is_made_again_not_filled_at_random(gguf_base):
    fresh = load_model(gguf_base, torch.float32).state_dict()
    copy = dense_cache.folder(gguf_base, "float32")
    weights = next(copy.glob("*.safetensors"))
    tensors = safetensors.torch.load_file(weights)
    dropped = next(k for k in tensors if "layers.0.self_attn.q_proj" in k)
    safetensors.torch.save_file({k: v for k, v in tensors.items() if k != dropped}, weights, metadata={"format": "pt"})
    again = load_model(gguf_base, torch.float32).state_dict()
    assert torch.equal(again[dropped], fresh[dropped]), "converted again, not a random tensor in its place"
    assert dropped in safetensors.torch.load_file(next(copy.glob("*.safetensors"))), "and kept whole again"


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
