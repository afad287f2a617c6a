"""Load a registered base into PyTorch: the GGUF dequantized by transformers, so training sees the weights we serve."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from scalpel.model_store import ModelEntry
from scalpel.paths import enforce_offline
from training.dataset import TemplateInfo


def _source_kwargs(entry: ModelEntry) -> tuple[Path, dict]:
    if entry.format == "gguf":
        return entry.source_path.parent, {"gguf_file": entry.source_path.name}
    return entry.source_path, {}


def load_tokenizer(entry: ModelEntry):
    enforce_offline()
    folder, kwargs = _source_kwargs(entry)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(entry: ModelEntry, dtype: torch.dtype = torch.float32):
    enforce_offline()
    folder, kwargs = _source_kwargs(entry)
    # Safetensors only and never remote code: a base folder cannot run code or unpickle objects.
    if entry.format == "hf":
        kwargs["use_safetensors"] = True
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False,
                                                             **kwargs)


def template_info(entry: ModelEntry) -> TemplateInfo:
    return TemplateInfo(chat_template=entry.chat_template, bos_token=entry.bos_token,
                        eos_token=entry.eos_token, add_bos=entry.add_bos)
