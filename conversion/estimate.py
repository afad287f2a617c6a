"""Size a LoRA before training, from config.json alone: parameters, file size per dtype, memory to train and serve."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conversion.architecture import BaseLayout, layout_from_gguf, layout_from_hf_config, read_hf_config
from core.errors import ScalpelError

PROFILES = Path(__file__).resolve().parent / "profiles"
MODULE_TENSORS = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
# Bits per weight of common GGUF base types, for serving memory.
BASE_BITS = {
    "f32": 32,
    "f16": 16,
    "bf16": 16,
    "q8_0": 8.5,
    "q6_k": 6.56,
    "q5_k_m": 5.69,
    "q4_k_m": 4.85,
    "q4_1": 5.0,
    "q4_0": 4.5,
}
NUCLEAR: dict[str, Any] = {"r": 32, "lora_alpha": 64, "target_modules": list(MODULE_TENSORS)}


@dataclass
class LoraEstimate:
    r: int
    target_modules: list[str]
    params: int
    size_mb: dict[str, float]


@dataclass
class MemoryEstimate:
    base_params: int
    train_gb: float
    serve_gb: float
    notes: list[str]


def load_profile(spec: str) -> tuple[dict, BaseLayout]:
    """A shipped profile name, a config.json (or a folder holding one), or a GGUF file."""
    shipped = PROFILES / f"{spec}.json"
    path = shipped if shipped.is_file() else Path(spec)
    if path.is_dir():
        config = read_hf_config(path)
    elif path.suffix == ".gguf" and path.is_file():
        layout = layout_from_gguf(path)
        return {"gguf": str(path)}, layout
    elif path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
    else:
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.json")))
        raise ScalpelError(f"no profile, config.json or GGUF named {spec!r} (shipped profiles: {known})", param="base")
    return config, layout_from_hf_config(config, str(path))


def hf_id(profile: str) -> str | None:
    """The Hugging Face id of the model a shipped profile describes (`_hf_id`), if there is such a profile."""
    shipped = PROFILES / f"{profile}.json"
    if not shipped.is_file():
        return None
    return json.loads(shipped.read_text(encoding="utf-8")).get("_hf_id")


def lora_size(layout: BaseLayout, r: int, target_modules: list[str]) -> LoraEstimate:
    params = 0
    for i in range(layout.n_layers):
        for module in target_modules:
            out_features, in_features = layout.shapes[f"blk.{i}.{MODULE_TENSORS[module]}.weight"]
            params += r * (in_features + out_features)
    return LoraEstimate(
        r=r,
        target_modules=list(target_modules),
        params=params,
        size_mb={dtype: params * b / 1e6 for dtype, b in BYTES.items()},
    )


def base_params(layout: BaseLayout, config: dict) -> int:
    params = sum(out * inp for name, (out, inp) in layout.shapes.items() if name.startswith("blk."))
    hidden = layout.shapes["token_embd.weight"][1] if "token_embd.weight" in layout.shapes else 0
    vocab = layout.shapes.get("token_embd.weight", (0, 0))[0]
    params += vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    params += hidden * (2 * layout.n_layers + 1)  # RMS norms
    return params


def memory(
    layout: BaseLayout,
    config: dict,
    lora: LoraEstimate,
    *,
    seq: int = 2048,
    batch: int = 1,
    train_dtype_bytes: int = 2,
    base_type: str = "q4_k_m",
    n_ctx: int = 4096,
) -> MemoryEstimate:
    """Rough but explicit: weights + LoRA optimizer state + activations to train; GGUF + KV cache to serve."""
    n = base_params(layout, config)
    hidden = config.get("hidden_size", 0)
    vocab = config.get("vocab_size", 0)
    n_head = layout.n_head or 1
    head_dim = config.get("head_dim") or (hidden // n_head if hidden else 0)
    weights = n * train_dtype_bytes
    lora_state = lora.params * (4 + 4 + 8)  # fp32 weights, gradients, AdamW moments
    # Per layer activations kept for backward, ~ seq*batch*hidden*(34 + 5*heads*seq/hidden) bytes at 16 bits
    # (Korthikanti et al. 2022), plus the logits and their gradient in fp32.
    per_layer = seq * batch * hidden * (34 + 5 * n_head * seq / max(hidden, 1)) * train_dtype_bytes / 2
    activations = per_layer * layout.n_layers + 2 * seq * batch * vocab * 4
    train = weights + lora_state + activations
    kv = n_ctx * layout.n_layers * 2 * layout.n_head_kv * head_dim * 2  # f16 K and V
    serve = n * BASE_BITS[base_type] / 8 + kv + lora.size_mb["f32"] * 1e6
    notes = [
        f"training: {train_dtype_bytes * 8}-bit base weights, batch {batch} x {seq} tokens, no gradient "
        "checkpointing (it cuts activations by about the number of layers)",
        f"serving: {base_type} base, {n_ctx}-token f16 KV cache, one f32 adapter",
    ]
    return MemoryEstimate(base_params=n, train_gb=train / 1e9, serve_gb=serve / 1e9, notes=notes)
