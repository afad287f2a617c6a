"""Convert a PEFT LoRA adapter (safetensors) into a llama.cpp GGUF LoRA adapter for a given base."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open

from conversion.architecture import BaseLayout
from conversion.tensor_types import OUTTYPES, choose_type, encode
from core.atomic import temporary_path
from core.errors import ScalpelError

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>A|B)\.weight$")


@dataclass
class LoraConversion:
    path: Path
    alpha: float
    rank: int
    n_modules: int
    n_bytes: int


def _read_adapter_config(adapter_dir: Path) -> dict:
    f = adapter_dir / "adapter_config.json"
    if not f.is_file():
        raise ScalpelError(f"{adapter_dir} has no adapter_config.json: not a PEFT adapter", param=str(adapter_dir))
    config = json.loads(f.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ScalpelError(f"{f}: peft_type {config.get('peft_type')!r} is not LoRA", param="peft_type")
    if config.get("use_dora"):
        raise ScalpelError(
            f"{f}: DoRA adapters cannot be expressed as a llama.cpp LoRA (use_dora=true)",
            param="use_dora",
            code="unsupported_adapter",
        )
    if config.get("modules_to_save"):
        raise ScalpelError(
            f"{f}: modules_to_save {config['modules_to_save']} are full weight copies, "
            "which a GGUF LoRA adapter cannot carry",
            param="modules_to_save",
            code="unsupported_adapter",
        )
    return config


def _scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's scale for one module: alpha/r, or alpha/sqrt(r) with rsLoRA, honouring per-module patterns."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _load_pairs(adapter_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file():
        raise ScalpelError(
            f"{adapter_dir} has no adapter_model.safetensors (only safetensors adapters are accepted)",
            param=str(adapter_dir),
        )
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(f), framework="pt") as st:
        for key in st.keys():  # noqa: SIM118 - safe_open lists its tensors by keys(); it is not iterable
            if "lora_magnitude_vector" in key:
                raise ScalpelError(
                    f"{f}: {key} is a DoRA magnitude: DoRA cannot be converted", param=key, code="unsupported_adapter"
                )
            if "lora_embedding" in key or "embed_tokens" in key:
                raise ScalpelError(
                    f"{f}: {key}: LoRA on embeddings cannot be converted", param=key, code="unsupported_adapter"
                )
            if "lm_head" in key:
                raise ScalpelError(
                    f"{f}: {key}: LoRA on lm_head cannot be converted; target attention or MLP projections",
                    param=key,
                    code="unsupported_adapter",
                )
            match = _KEY.match(key)
            if not match:
                raise ScalpelError(
                    f"{f}: unexpected tensor {key!r} (only lora_A/lora_B weights can be converted)",
                    param=key,
                    code="unsupported_adapter",
                )
            pairs.setdefault(match["module"], {})[match["side"]] = st.get_tensor(key).float().numpy()
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ScalpelError(
                f"{f}: {module} has lora_{''.join(pair)} but not both A and B", param=module, code="invalid_adapter"
            )
    if not pairs:
        raise ScalpelError(f"{f}: no LoRA weights", param=str(f), code="invalid_adapter")
    return pairs


def convert_lora(
    adapter_dir: Path,
    base: BaseLayout,
    out_path: Path,
    *,
    outtype: str = "f32",
    metadata: dict[str, str] | None = None,
    dry_run: bool = False,
) -> LoraConversion:
    """Write `out_path` atomically; every lora_B carries the permutation and scale the base needs.

    `dry_run` checks the adapter against the base and sizes the file without writing it."""
    if outtype not in OUTTYPES:
        raise ScalpelError(f"unsupported outtype {outtype!r}; choose from {sorted(OUTTYPES)}", param="outtype")
    adapter_dir = Path(adapter_dir)
    config = _read_adapter_config(adapter_dir)
    pairs = _load_pairs(adapter_dir)

    # llama.cpp scales every pair by alpha / rank(lora_b). One alpha for the file; a module whose
    # PEFT scale differs (rsLoRA, rank or alpha patterns) has the difference folded into its lora_b.
    first_module = sorted(pairs)[0]
    first_rank = pairs[first_module]["A"].shape[0]
    gguf_alpha = _scaling(config, first_module, first_rank) * first_rank

    tensors: list[tuple[str, np.ndarray]] = []
    for module in sorted(pairs):
        a, b = pairs[module]["A"], pairs[module]["B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise ScalpelError(
                f"{module}: lora_A has rank {rank} but lora_B has {b.shape[1]}", param=module, code="invalid_adapter"
            )
        name = base.gguf_name(module)
        expected = base.shapes.get(f"{name}.weight")
        if expected is None:
            raise ScalpelError(
                f"{module} ({name}.weight) does not exist in the base {base.source}", param=module, code="base_mismatch"
            )
        if expected != (b.shape[0], a.shape[1]):
            raise ScalpelError(
                f"{module}: the adapter expects a {b.shape[0]}x{a.shape[1]} weight but the "
                f"base {base.source} has {expected[0]}x{expected[1]}: this adapter was "
                "trained for a different base",
                param=module,
                code="base_mismatch",
            )
        factor = _scaling(config, module, rank) / (gguf_alpha / rank)
        if not math.isclose(factor, 1.0, rel_tol=1e-6):
            b = b * factor
        tensors.append((f"{name}.weight.lora_a", a))
        tensors.append((f"{name}.weight.lora_b", base.permute_rows(b, name)))

    if dry_run:
        n_bytes = sum(encode(data, choose_type(data.shape, outtype)).nbytes for _, data in tensors)
        return LoraConversion(Path(out_path), alpha=gguf_alpha, rank=first_rank, n_modules=len(pairs), n_bytes=n_bytes)
    writer_meta = metadata or {}
    with temporary_path(Path(out_path)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), base.arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(gguf_alpha))
        writer.add_name(adapter_dir.name)
        for key, value in writer_meta.items():
            writer.add_string(key, value)
        n_bytes = 0
        for name, data in tensors:
            qtype = choose_type(data.shape, outtype)
            encoded = encode(data, qtype)
            writer.add_tensor(name, encoded, raw_dtype=qtype)
            n_bytes += encoded.nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return LoraConversion(path=Path(out_path), alpha=gguf_alpha, rank=first_rank, n_modules=len(pairs), n_bytes=n_bytes)
