"""Describe a GGUF file (metadata, tensors, sizes) and check whether an adapter fits a given base."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from conversion.architecture import BaseLayout
from core.gguf_meta import BASE_FINGERPRINT_KEY, GGUFInfo

_ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


@dataclass
class Compatibility:
    compatible: bool
    problems: list[str] = field(default_factory=list)


def summarize(info: GGUFInfo) -> dict:
    by_type: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "mb": 0.0})
    for t in info.tensors.values():
        by_type[t.type]["tensors"] += 1
        by_type[t.type]["mb"] += t.n_bytes / 1e6
    return {
        "file": str(info.path),
        "type": info.file_type,
        "architecture": info.architecture,
        "size_mb": info.path.stat().st_size / 1e6,
        "tensors": len(info.tensors),
        "tensor_types": dict(by_type),
        "vocab_size": len(info.tokens) or None,
    }


def check_adapter(adapter: GGUFInfo, base: BaseLayout, base_fingerprint: str | None = None) -> Compatibility:
    """The checks llama.cpp makes when it loads an adapter, made first so they can be explained."""
    problems = []
    if adapter.file_type != "adapter" or adapter.metadata.get("adapter.type") != "lora":
        problems.append("not a LoRA adapter (general.type / adapter.type)")
    if adapter.architecture != base.arch_name:
        problems.append(f"architecture {adapter.architecture!r} but the base is {base.arch_name!r}")
    stamped = adapter.metadata.get(BASE_FINGERPRINT_KEY)
    if base_fingerprint and stamped and stamped != base_fingerprint:
        problems.append("converted for another base (scalpel.base.fingerprint differs)")
    pairs: dict[str, dict[str, tuple]] = defaultdict(dict)
    for name, t in adapter.tensors.items():
        if name.endswith(_ADAPTER_SUFFIXES):
            pairs[name.rsplit(".", 1)[0]][name.rsplit(".", 1)[1]] = t.ne
    for target, pair in sorted(pairs.items()):
        if set(pair) != {"lora_a", "lora_b"}:
            problems.append(f"{target}: needs both lora_a and lora_b")
            continue
        if target not in base.shapes:
            problems.append(f"{target}: no such tensor in the base")
            continue
        out_features, in_features = base.shapes[target]
        a, b = pair["lora_a"], pair["lora_b"]
        if a[0] != in_features or b[1] != out_features or a[1] != b[0]:
            problems.append(
                f"{target}: lora_a {list(a)} / lora_b {list(b)} do not fit the base's {out_features}x{in_features}"
            )
    if not pairs:
        problems.append("no lora_a/lora_b tensors")
    return Compatibility(compatible=not problems, problems=problems)


def tensor_table(info: GGUFInfo, limit: int | None = None) -> list[tuple[str, str, str, float]]:
    return [
        (name, t.type, "x".join(str(x) for x in t.ne), t.n_bytes / 1e6)
        for name, t in list(info.tensors.items())[:limit]
    ]
