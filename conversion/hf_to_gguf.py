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
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    theta = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    if kind == "default":
        return Rope(theta)
    if kind == "linear":
        return Rope(theta, linear_factor=float(rope["factor"]))
    if kind == "llama3":
        return Rope(theta, freq_factors=llama3_freq_factors(theta, head_dim, rope))
    raise ScalpelError(
        f"rope type {kind!r} is not supported (supported: default, linear, llama3)",
        param="rope_parameters.rope_type",
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
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(FILE_TYPES[outtype])


def _write_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """BPE vocabularies from tokenizer.json ("gpt2"), SentencePiece from tokenizer.model ("llama")."""
    if (folder / "tokenizer.model").is_file():
        _sentencepiece_vocab(writer, folder, vocab_size)
    elif (folder / "tokenizer.json").is_file():
        _bpe_vocab(writer, folder, vocab_size)
    else:
        raise ScalpelError(f"{folder} has neither tokenizer.json nor tokenizer.model", param=str(folder))
    special = gguf.SpecialVocab(folder, load_merges=not (folder / "tokenizer.model").is_file(), n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)


def _bpe_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise ScalpelError(
            f"tokenizer.json model type {model.get('type')!r} is not supported",
            param="tokenizer.json",
            code="unsupported_tokenizer",
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, token_id in model["vocab"].items():
        if token_id < vocab_size:
            tokens[token_id], types[token_id] = text, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe_pre_type(data.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def bpe_pre_type(pre: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer (the regex split before BPE) that tokenizer.json describes.

    Tokenization only matches transformers when this is right, so an unknown one is refused rather
    than guessed.
    """
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        pattern = parts[0].get("pattern", {}).get("Regex", "")
        if "\\p{N}{1,3}" in pattern or r"\p{N}{1,3}" in pattern:
            return "llama-bpe"
        if "\\p{N}|" in pattern or r"\p{N}|" in pattern:
            return "qwen2"
    raise ScalpelError(
        f"tokenizer.json has a pre-tokenizer llama.cpp is not known to match ({kinds}); "
        "supported: GPT-2 byte-level, SmolLM, Llama 3, Qwen2",
        param="tokenizer.json",
        code="unsupported_tokenizer",
    )


def _added_tokens(folder: Path) -> list[tuple[int, str, bool]]:
    """Tokens added on top of a SentencePiece model (CodeLlama's 16 infill tokens, say), wherever
    transformers recorded them: tokenizer.json, or the older added_tokens.json."""
    if (folder / "tokenizer.json").is_file():
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        return [(t["id"], t["content"], bool(t.get("special"))) for t in data.get("added_tokens", [])]
    if (folder / "added_tokens.json").is_file():
        return [(i, text, False) for text, i in json.loads((folder / "added_tokens.json").read_text()).items()]
    return []


def _sentencepiece_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (
            gguf.TokenType.UNKNOWN
            if sp.is_unknown(i)
            else gguf.TokenType.CONTROL
            if sp.is_control(i)
            else gguf.TokenType.UNUSED
            if sp.is_unused(i)
            else gguf.TokenType.BYTE
            if sp.is_byte(i)
            else gguf.TokenType.NORMAL
        )
    for token_id, text, special in _added_tokens(folder):
        if token_id < vocab_size and (token_id >= sp.vocab_size() or tokens[token_id] != text):
            tokens[token_id], scores[token_id] = text, -1000.0
            types[token_id] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def convert_base(folder: Path, out_path: Path, *, outtype: str = "f16", progress: bool = True) -> BaseConversion:
    """Stream every tensor from safetensors into the GGUF: memory stays at one tensor at a time."""
    if outtype not in OUTTYPES:
        raise ScalpelError(f"unsupported outtype {outtype!r}; choose from {sorted(OUTTYPES)}", param="outtype")
    folder = Path(folder)
    config = read_hf_config(folder)
    layout = layout_from_hf_config(config, str(folder))
    files = _safetensors_files(folder)

    plan: list[tuple[Path, str, str, gguf.GGMLQuantizationType]] = []  # file, hf name, gguf name, type
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open lists its tensors by keys(); it is not iterable
                if key.endswith(_SKIPPED):
                    continue
                shape = st.get_slice(key).get_shape()
                name = layout.gguf_name(key)
                plan.append((f, key, name, choose_type(shape, outtype)))
    # Tensors that exist only in the GGUF, computed from the config (llama.cpp reads rope_freqs by this name).
    extra: dict[str, np.ndarray] = {}
    rope = rope_from_config(config, _head_dim(config, layout))
    if rope.freq_factors is not None:
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = rope.freq_factors
    names = {p[2] for p in plan}
    if "output.weight" not in names and not config.get("tie_word_embeddings", False):
        raise ScalpelError(f"{folder}: no lm_head weight and tie_word_embeddings is false", param="lm_head")

    n_bytes = 0
    with temporary_path(Path(out_path)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), layout.arch_name)
        _write_metadata(writer, config, layout, rope, outtype, folder.name)
        _write_tokenizer(writer, folder, config["vocab_size"])
        for f, key, name, qtype in plan:
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
            plan, desc=f"writing {Path(out_path).name}", unit="tensor", disable=not progress
        ):
            if f != current or handle is None:
                handle = safe_open(str(f), framework="pt")
                current = f
            tensor = handle.get_tensor(key)
            data = tensor.numpy() if tensor.dtype in (torch.float16, torch.float32) else tensor.float().numpy()
            writer.write_tensor_data(encode(layout.permute_rows(data, name), qtype))
        for data in extra.values():
            writer.write_tensor_data(data)
        writer.close()
    return BaseConversion(path=Path(out_path), n_tensors=len(plan) + len(extra), n_bytes=n_bytes)


def convert_to(folder: Path, out_path: Path, outtype: str, *, progress: bool = True) -> Path:
    """Any output type: ours directly, llama.cpp's k-quants and q4_0 through an f16 intermediate."""
    if outtype in OUTTYPES:
        return convert_base(folder, out_path, outtype=outtype, progress=progress).path
    from conversion.quantize import quantize

    intermediate = Path(out_path).with_name(f".{Path(out_path).name}.f16")
    try:
        convert_base(folder, intermediate, outtype="f16", progress=progress)
        return quantize(intermediate, Path(out_path), outtype)
    finally:
        intermediate.unlink(missing_ok=True)
