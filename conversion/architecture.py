"""What conversion needs to know about a base: its GGUF architecture, head counts and the shape of every weight."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import gguf
import numpy as np

from core.errors import ScalpelError
from core.gguf_meta import read_gguf

# Hugging Face architectures whose weights map onto a llama.cpp architecture, with the q/k row
# permutation llama.cpp's LLAMA graph expects (it applies "normal" rope to permuted rows).
HF_ARCHITECTURES = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,  # NEOX rope: no q/k permutation
}
PERMUTED_ARCHS = {gguf.MODEL_ARCH.LLAMA}


def arch_from_name(name: str) -> gguf.MODEL_ARCH:
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ScalpelError(
        f"unknown GGUF architecture {name!r}", param="general.architecture", code="unsupported_architecture"
    )


@dataclass
class BaseLayout:
    """A base model's architecture and weight shapes, read from a GGUF or from an HF config.json."""

    arch: gguf.MODEL_ARCH
    n_layers: int
    n_head: int
    n_head_kv: int
    shapes: dict[str, tuple[int, int]]  # GGUF tensor name -> (out_features, in_features)
    source: str

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    @cached_property
    def name_map(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.arch, self.n_layers)  # slow to build: once per layout

    def gguf_name(self, hf_name: str) -> str:
        """HF module or tensor name -> GGUF tensor name (without the '.weight' suffix for modules)."""
        mapped = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ScalpelError(
                f"{hf_name!r} has no GGUF name for architecture {self.arch_name}", param=hf_name, code="unmapped_tensor"
            )
        return mapped

    def permute_rows(self, rows: np.ndarray, gguf_name: str) -> np.ndarray:
        """Apply llama.cpp's q/k row order to a matrix whose rows are the output features."""
        if self.arch not in PERMUTED_ARCHS:
            return rows
        if gguf_name.endswith(".attn_q") or gguf_name.endswith(".attn_q.weight"):
            heads = self.n_head
        elif gguf_name.endswith(".attn_k") or gguf_name.endswith(".attn_k.weight"):
            heads = self.n_head_kv
        else:
            return rows
        out = rows.shape[0]
        return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def layout_from_gguf(path: Path) -> BaseLayout:
    info = read_gguf(path, with_tokens=False)
    if info.file_type != "model":
        raise ScalpelError(f"{path} is a GGUF {info.file_type!r}, not a base model", param=str(path))
    arch = arch_from_name(info.architecture)
    n_head = int(info.arch_value("attention.head_count", 0))
    shapes = {name: (t.ne[1], t.ne[0]) for name, t in info.tensors.items() if len(t.ne) == 2}
    return BaseLayout(
        arch=arch,
        n_layers=int(info.arch_value("block_count", 0)),
        n_head=n_head,
        n_head_kv=int(info.arch_value("attention.head_count_kv", n_head)),
        shapes=shapes,
        source=str(path),
    )


def read_hf_config(folder: Path) -> dict:
    """config.json as a dict; a missing, binary, non-JSON or non-object file is a ScalpelError naming it."""
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise ScalpelError(f"{folder} has no config.json: not a Hugging Face model folder", param=str(folder))
    try:
        data = json.loads(f.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ScalpelError(f"{f}: config.json is not UTF-8 text (byte {exc.start})", param="config.json") from exc
    except json.JSONDecodeError as exc:
        raise ScalpelError(
            f"{f}:{exc.lineno}:{exc.colno}: config.json is not valid JSON: {exc.msg}", param="config.json"
        ) from exc
    except OSError as exc:
        raise ScalpelError(f"{f}: cannot read config.json ({exc.strerror})", param="config.json") from exc
    if not isinstance(data, dict):
        raise ScalpelError(f"{f}: config.json must be a JSON object, not {type(data).__name__}", param="config.json")
    return data


def hf_arch(config: dict) -> gguf.MODEL_ARCH:
    names = config.get("architectures") or []
    for name in names:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    raise ScalpelError(
        f"config.json: architectures: {names or config.get('model_type')!r} is not supported; "
        f"supported: {sorted(HF_ARCHITECTURES)}",
        param="config.json: architectures",
        code="unsupported_architecture",
    )


def layout_from_hf_config(config: dict, source: str = "config.json") -> BaseLayout:
    """Shapes computed from config.json alone, so no weights are needed."""
    arch = hf_arch(config)
    hidden, n_head, ffn, n_layers, _ = (
        _positive(config, key)
        for key in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size")
    )
    n_head_kv = _positive(config, "num_key_value_heads") if config.get("num_key_value_heads") else n_head
    head_dim = config.get("head_dim") or hidden // n_head
    per_layer = {
        "attn_q": (n_head * head_dim, hidden),
        "attn_k": (n_head_kv * head_dim, hidden),
        "attn_v": (n_head_kv * head_dim, hidden),
        "attn_output": (hidden, n_head * head_dim),
        "ffn_gate": (ffn, hidden),
        "ffn_up": (ffn, hidden),
        "ffn_down": (hidden, ffn),
    }
    shapes = {f"blk.{i}.{t}.weight": s for i in range(n_layers) for t, s in per_layer.items()}
    shapes["token_embd.weight"] = (config["vocab_size"], hidden)
    return BaseLayout(arch=arch, n_layers=n_layers, n_head=n_head, n_head_kv=n_head_kv, shapes=shapes, source=source)


def _positive(config: dict, key: str) -> int:
    """A size config.json must give, as a positive integer; anything else is an error naming the field."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problem = "is missing" if value is None else f"must be a positive integer, not {value!r}"
        raise ScalpelError(f"config.json: {key} {problem}", param=f"config.json: {key}", code="invalid_config")
    return value


def layout_for(path: Path) -> BaseLayout:
    """A GGUF file or an HF folder."""
    path = Path(path)
    if path.is_dir():
        return layout_from_hf_config(read_hf_config(path), str(path / "config.json"))
    return layout_from_gguf(path)
