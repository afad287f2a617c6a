"""Load a registered base into PyTorch: the GGUF dequantized by transformers, so training sees the weights we serve."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from core.model_store import ModelEntry
from core.paths import enforce_offline
from training.dataset import TemplateInfo


def _source_kwargs(entry: ModelEntry) -> tuple[Path, dict]:
    if entry.format == "gguf":
        return entry.source_path.parent, {"gguf_file": entry.source_path.name}
    return entry.source_path, {}


def load_tokenizer(entry: ModelEntry):
    enforce_offline()
    folder, kwargs = _source_kwargs(entry)
    tokenizer = match_llama_cpp_spm(transformers.AutoTokenizer.from_pretrained(folder, **kwargs))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def match_llama_cpp_spm(tokenizer):
    """Make a SentencePiece tokenizer split text after an added or special token as llama.cpp does.

    llama.cpp gives every text fragment that follows a special token its own '▁' prefix ("a<tok>b" ends
    in '▁b'); transformers' non-legacy Metaspace prefixes only the first fragment ('b'). Training must
    see the tokens that serving will feed, so SPM tokenizers get Metaspace(prepend_scheme="always").
    BPE tokenizers are returned unchanged.
    """
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if backend is not None and isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=pre.replacement, prepend_scheme="always", split=pre.split
        )
    return tokenizer


def load_model(entry: ModelEntry, dtype: torch.dtype = torch.float32):
    enforce_offline()
    folder, kwargs = _source_kwargs(entry)
    # Safetensors only and never remote code: a base folder cannot run code or unpickle objects.
    if entry.format == "hf":
        kwargs["use_safetensors"] = True
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False, **kwargs)
    if entry.format == "gguf":
        _detach_gguf_quantizer(model)
    return model


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
