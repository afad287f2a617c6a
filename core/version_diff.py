"""What changed between two versions of an adapter: config, data, metrics, evaluation and the weights themselves."""

from __future__ import annotations

import math

from core import adapter_store

WEIGHTS_NAME = "adapter_model.safetensors"


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _changes(a: dict, b: dict) -> dict:
    fa, fb = _flatten(a or {}), _flatten(b or {})
    return {
        key: {"from": fa.get(key), "to": fb.get(key)}
        for key in sorted(fa.keys() | fb.keys())
        if fa.get(key) != fb.get(key)
    }


def _weight_change(a: adapter_store.AdapterVersion, b: adapter_store.AdapterVersion) -> dict:
    """Relative L2 change of the LoRA update per module, ||dW_b - dW_a|| / ||dW_a|| with dW = B @ A (scaled alike)."""
    from safetensors.torch import load_file

    if not ((a.path / WEIGHTS_NAME).is_file() and (b.path / WEIGHTS_NAME).is_file()):  # a GGUF-only import
        return {"comparable": False, "reason": f"a version without PEFT weights ({WEIGHTS_NAME}): a GGUF import"}
    wa, wb = load_file(a.path / WEIGHTS_NAME), load_file(b.path / WEIGHTS_NAME)
    if wa.keys() != wb.keys():
        return {
            "comparable": False,
            "only_in_a": sorted(wa.keys() - wb.keys())[:5],
            "only_in_b": sorted(wb.keys() - wa.keys())[:5],
        }
    changes = []
    for key in sorted(k for k in wa if "lora_A" in k):
        key_b = key.replace("lora_A", "lora_B")
        delta_a = wa[key_b].float() @ wa[key].float()
        delta_b = wb[key_b].float() @ wb[key].float()
        norm = float(delta_a.norm())
        changes.append(float((delta_b - delta_a).norm()) / norm if norm else math.inf)
    return {
        "comparable": True,
        "modules": len(changes),
        "mean_relative_change": sum(changes) / len(changes),
        "max_relative_change": max(changes),
    }


def diff(name: str, a: str, b: str) -> dict:
    va, vb = adapter_store.resolve(f"{name}@{a}"), adapter_store.resolve(f"{name}@{b}")
    ma, mb = va.manifest, vb.manifest
    keep = ("final_loss", "examples", "tokens", "global_step", "train_seconds")
    return {
        "adapter": name,
        "a": a,
        "b": b,
        "lineage": {"a_parent": ma.parent_version, "b_parent": mb.parent_version},
        "base_changed": (ma.base.fingerprint if ma.base else None) != (mb.base.fingerprint if mb.base else None),
        "config": _changes(ma.config, mb.config),
        "datasets": _changes(
            {k: v.sha256 for k, v in ma.datasets.items()}, {k: v.sha256 for k, v in mb.datasets.items()}
        ),
        "metrics": _changes({k: getattr(ma.metrics, k) for k in keep}, {k: getattr(mb.metrics, k) for k in keep}),
        "eval": _changes(ma.eval or {}, mb.eval or {}),
        "size_bytes": {"from": ma.gguf.size_bytes if ma.gguf else None, "to": mb.gguf.size_bytes if mb.gguf else None},
        "weights": _weight_change(va, vb),
    }
