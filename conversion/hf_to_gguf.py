"""Convert a Llama-family Hugging Face folder (safetensors) into a GGUF base, one tensor at a time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from conversion.architecture import BaseLayout, layout_from_hf_config, read_hf_config
from conversion.tensor_types import OUTTYPES, choose_type, encode, tensor_info
from conversion.vocab import write_tokenizer
from core.atomic import temporary_path
from core.errors import ScalpelError

FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_SKIPPED = ("rotary_emb.inv_freq",)


@dataclass
class BaseConversion:
    path: Path
    n_tensors: int
    n_bytes: int


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ScalpelError(
            f"{folder} has no .safetensors weights (pickled .bin weights are not loaded)",
            param=str(folder),
            code="no_safetensors",
        )
    return files


@dataclass
class Rope:
    """The rotary embedding as llama.cpp's llama graph takes it: a base, an optional linear scaling, and
    for Llama 3.1-style scaling a per-frequency divisor stored as the `rope_freqs` tensor."""

    theta: float
    linear_factor: float | None = None
    freq_factors: np.ndarray | None = None


def rope_from_config(config: dict, head_dim: int) -> Rope:
    field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope = config.get(field) or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    theta = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    if kind == "default":
        return Rope(theta)
    if kind == "linear":
        return Rope(theta, linear_factor=float(rope["factor"]))
    if kind == "llama3":
        return Rope(theta, freq_factors=llama3_freq_factors(theta, head_dim, rope))
    raise ScalpelError(
        f"config.json: {field}.rope_type: {kind} is not supported (supported: default, linear, llama3)",
        param=f"config.json: {field}.rope_type",
        code="unsupported_architecture",
    )


def llama3_freq_factors(theta: float, head_dim: int, rope: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling, as divisors of each rotary frequency: high frequencies
    are kept, low ones divided by `factor`, and the band between is interpolated smoothly."""
    factor, old_context = float(rope["factor"]), float(rope["original_max_position_embeddings"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = np.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def _head_dim(config: dict, layout: BaseLayout) -> int:
    return config.get("head_dim") or config["hidden_size"] // layout.n_head


def _write_metadata(
    writer: gguf.GGUFWriter, config: dict, layout: BaseLayout, rope: Rope, outtype: str, name: str
) -> None:
    hidden = config["hidden_size"]
    head_dim = _head_dim(config, layout)
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layout.n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(layout.n_head)
    writer.add_head_count_kv(layout.n_head_kv)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(rope.theta)
    if rope.linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.linear_factor)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // layout.n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        # Recorded only: llama.cpp's llama graph attends to the whole context (as Mistral does within its window).
        writer.add_sliding_window(int(config["sliding_window"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(FILE_TYPES[outtype])


@dataclass
class BasePlan:
    """What a conversion will write, worked out from config.json and the safetensors headers alone."""

    config: dict
    layout: BaseLayout
    rope: Rope
    tensors: list[tuple[Path, str, str, gguf.GGMLQuantizationType]]  # file, hf name, gguf name, type
    extra: dict[str, np.ndarray]  # tensors computed from the config (llama.cpp reads rope_freqs by name)


def plan_base(folder: Path, outtype: str = "f16") -> BasePlan:
    """Check a folder and list its tensors without writing anything (--dry-run, and convert_base)."""
    if outtype not in OUTTYPES:
        raise ScalpelError(f"unsupported outtype {outtype!r}; choose from {sorted(OUTTYPES)}", param="outtype")
    folder = Path(folder)
    config = read_hf_config(folder)
    layout = layout_from_hf_config(config, str(folder))
    tensors: list[tuple[Path, str, str, gguf.GGMLQuantizationType]] = []
    for f in _safetensors_files(folder):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open lists its tensors by keys(); it is not iterable
                if key.endswith(_SKIPPED):
                    continue
                shape = st.get_slice(key).get_shape()
                tensors.append((f, key, layout.gguf_name(key), choose_type(shape, outtype)))
    extra: dict[str, np.ndarray] = {}
    rope = rope_from_config(config, _head_dim(config, layout))
    if rope.freq_factors is not None:
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = rope.freq_factors
    if "output.weight" not in {t[2] for t in tensors} and not config.get("tie_word_embeddings", False):
        raise ScalpelError(
            f"{folder}: no lm_head weight and config.json: tie_word_embeddings is false",
            param="config.json: tie_word_embeddings",
        )
    return BasePlan(config, layout, rope, tensors, extra)


def convert_base(
    folder: Path,
    out_path: Path,
    *,
    outtype: str = "f16",
    progress: bool = True,
    vocab_only: bool = False,
    name: str | None = None,
) -> BaseConversion:
    """Stream every tensor from safetensors into the GGUF: memory stays at one tensor at a time.

    `vocab_only` writes the metadata and tokenizer and no tensors (llama.cpp's --vocab-only)."""
    folder = Path(folder)
    plan = plan_base(folder, outtype)
    tensors, extra = ([], {}) if vocab_only else (plan.tensors, plan.extra)
    n_bytes = 0
    with temporary_path(Path(out_path)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), plan.layout.arch_name)
        _write_metadata(writer, plan.config, plan.layout, plan.rope, outtype, name or folder.name)
        write_tokenizer(writer, folder, plan.config["vocab_size"])
        for f, key, name, qtype in tensors:
            with safe_open(str(f), framework="pt") as st:
                shape = st.get_slice(key).get_shape()
            info_shape, dtype, nbytes = tensor_info(shape, qtype)
            writer.add_tensor_info(name, info_shape, dtype, nbytes, raw_dtype=qtype)
            n_bytes += nbytes
        for name, data in extra.items():
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
            n_bytes += data.nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        current, handle = None, None
        for f, key, name, qtype in tqdm(
            tensors, desc=f"writing {Path(out_path).name}", unit="tensor", disable=not progress
        ):
            if f != current or handle is None:
                handle = safe_open(str(f), framework="pt")
                current = f
            tensor = handle.get_tensor(key)
            data = tensor.numpy() if tensor.dtype in (torch.float16, torch.float32) else tensor.float().numpy()
            writer.write_tensor_data(encode(plan.layout.permute_rows(data, name), qtype))
        for data in extra.values():
            writer.write_tensor_data(data)
        writer.close()
    return BaseConversion(path=Path(out_path), n_tensors=len(tensors) + len(extra), n_bytes=n_bytes)


def convert_to(
    folder: Path,
    out_path: Path,
    outtype: str,
    *,
    progress: bool = True,
    vocab_only: bool = False,
    name: str | None = None,
) -> Path:
    """Any output type: ours directly, llama.cpp's k-quants and q4_0 through an f16 intermediate."""
    if outtype in OUTTYPES or vocab_only:
        kind = outtype if outtype in OUTTYPES else "f16"
        return convert_base(folder, out_path, outtype=kind, progress=progress, vocab_only=vocab_only, name=name).path
    from conversion.quantize import quantize

    intermediate = Path(out_path).with_name(f".{Path(out_path).name}.f16")
    try:
        convert_base(folder, intermediate, outtype="f16", progress=progress, name=name)
        return quantize(intermediate, Path(out_path), outtype)
    finally:
        intermediate.unlink(missing_ok=True)
