"""Load a registered base into PyTorch: the GGUF dequantized by transformers, so training sees the weights we serve
(rounded to bf16 when training in bf16: training.precision)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from core.model_store import ModelEntry
from core.paths import enforce_offline
from training import dense_cache
from training.dataset import TemplateInfo


def _source_kwargs(entry: ModelEntry) -> tuple[Path, dict]:
    if entry.format == "gguf":
        return entry.source_path.parent, {"gguf_file": entry.source_path.name}
    return entry.source_path, {}


def _dense(entry: ModelEntry) -> dict:
    """For a GGUF base, ask transformers to unpack every weight at load time: LoRA trains on dense weights, and
    without it transformers tries to fetch a packed-matmul kernel from the Hub (offline here) and warns that a
    bf16 load is slower for packed weights, which are never used."""
    if entry.format != "gguf":
        return {}
    return {"quantization_config": transformers.GgufConfig(gguf_file=entry.source_path.name, dequantize=True)}


def load_tokenizer(entry: ModelEntry):
    enforce_offline()
    folder, kwargs = _source_kwargs(entry)

    def convert():
        return match_llama_cpp_spm(transformers.AutoTokenizer.from_pretrained(folder, **kwargs))

    def load(copy: Path):  # matched when it was kept; matching again is a no-op, and guards an older copy
        return match_llama_cpp_spm(transformers.AutoTokenizer.from_pretrained(copy))

    tokenizer = dense_cache.cached(entry, "tokenizer", load, convert, lambda _: 0)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def match_llama_cpp_spm(tokenizer):
    """Make a SentencePiece tokenizer split text as llama.cpp (and sentencepiece itself) does.

    llama.cpp puts a '▁' before every text fragment, the first and each one after an added or special
    token ("a<tok>b" ends in '▁b'), even one that already starts with a space ("  x" is '▁▁▁x').
    transformers' Metaspace prefixes only the first fragment, and none that starts with a space. Training
    must see the tokens that serving will feed, so the '▁' moves into a Prepend/Replace normalizer (which
    runs on every fragment) and added tokens are matched before it. BPE tokenizers are returned unchanged.
    """
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if backend is None or not isinstance(pre, pre_tokenizers.Metaspace) or pre.prepend_scheme == "never" or pre.split:
        return tokenizer
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(pre.replacement), normalizers.Replace(" ", pre.replacement)]
    )
    backend.pre_tokenizer = None
    backend.add_tokens(
        [
            AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip, normalized=False)
            for t in backend.get_added_tokens_decoder().values()
            if t.normalized and not t.special
        ]
    )
    return tokenizer


def load_model(entry: ModelEntry, dtype: torch.dtype = torch.float32):
    """The base as a dense PyTorch model in `dtype`: a GGUF is unpacked once, and the copy kept (dense_cache)."""
    enforce_offline()
    folder, kwargs = _source_kwargs(entry)
    # Safetensors only and never remote code: a base folder cannot run code or unpickle objects.
    if entry.format == "hf":
        kwargs["use_safetensors"] = True

    def convert():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=False, **kwargs, **_dense(entry)
        )
        if entry.format == "gguf":
            _detach_gguf_quantizer(model)
        return model

    def load(copy: Path):
        loaded: Any = transformers.AutoModelForCausalLM.from_pretrained(
            copy, dtype=dtype, trust_remote_code=False, use_safetensors=True, output_loading_info=True
        )
        model, info = loaded  # with output_loading_info, the model and what loading it found
        # A copy missing a tensor would load with random weights in its place, and only a warning: refuse it, so
        # that the cache converts the GGUF again.
        broken = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if broken:
            raise ValueError(f"the kept copy does not match the model: {broken}")
        # Named as a fresh conversion names it (PEFT writes it into the adapter's base_model_name_or_path), not by the
        # cache folder, which may be gone tomorrow.
        model.name_or_path = model.config._name_or_path = str(folder)
        return model

    def size(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    return dense_cache.cached(entry, str(dtype).removeprefix("torch."), load, convert, size)


def _detach_gguf_quantizer(model) -> None:
    """transformers tags a GGUF-loaded model as quantized even when it dequantized every weight, and the
    Trainer then refuses it. We train LoRA on dense weights only, so check they are dense and drop the tag."""
    packed = [name for name, module in model.named_modules() if "gguf" in type(module).__name__.lower()]
    if packed:
        raise RuntimeError(f"GGUF weights were left packed ({packed[:3]}...); cannot train on them")
    model.hf_quantizer = None
    model.__dict__.pop("is_quantized", None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def template_info(entry: ModelEntry) -> TemplateInfo:
    return TemplateInfo(
        chat_template=entry.chat_template, bos_token=entry.bos_token, eos_token=entry.eos_token, add_bos=entry.add_bos
    )
