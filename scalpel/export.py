"""`scalpel export vllm`: hand a stored version to vLLM's multi-LoRA serving, for fleets of GPUs.

Every version keeps its PEFT folder (adapter_config.json and adapter_model.safetensors) beside its GGUF, and
vLLM loads PEFT folders as they are (`--lora-modules`, or `POST /v1/load_lora_adapter` at run time). vLLM
serves Hugging Face weights, not our quantized GGUF, so the export also names the base's HF id or folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conversion.estimate import hf_id
from core import adapter_store, model_store
from core.errors import ScalpelError

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
VLLM_PORT = 8000


@dataclass
class VllmExport:
    """What vLLM needs to serve one version, under the name clients already use with scalpel."""

    lora_name: str  # the `model` a client sends: NAME (the version exported) or NAME@vN, as asked
    ref: str  # NAME@vN, the version exported
    adapter_dir: Path  # the PEFT folder vLLM loads
    base_model: str  # the Hugging Face id or folder vLLM serves as the base
    max_lora_rank: int

    def serve_command(self) -> list[str]:
        modules = {"name": self.lora_name, "path": str(self.adapter_dir), "base_model_name": self.base_model}
        return [
            "vllm",
            "serve",
            self.base_model,
            "--host",
            "127.0.0.1",
            "--port",
            str(VLLM_PORT),
            "--enable-lora",
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--lora-modules",
            json.dumps(modules),
        ]

    def load_request(self) -> dict:
        """The body of vLLM's POST /v1/load_lora_adapter (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""
        return {"lora_name": self.lora_name, "lora_path": str(self.adapter_dir)}

    def as_dict(self) -> dict:
        return {
            "lora_name": self.lora_name,
            "ref": self.ref,
            "adapter_dir": str(self.adapter_dir),
            "base_model": self.base_model,
            "max_lora_rank": self.max_lora_rank,
            "serve_command": self.serve_command(),
            "load_lora_adapter": self.load_request(),
        }


def base_model_for(version: adapter_store.AdapterVersion, override: str | None = None) -> str:
    """The HF base vLLM should serve: the override, else the registered HF folder, else a shipped profile's id."""
    if override:
        return override
    base = version.manifest.base
    if base is None:
        raise ScalpelError(f"{version.ref} names no base model; pass --base-model", param="base_model")
    try:
        entry = model_store.get(base.name)
    except ScalpelError:
        entry = None
    if entry is not None and entry.format == "hf":
        return entry.source
    found = hf_id(base.name)
    if found is None:
        raise ScalpelError(
            f"the Hugging Face weights of base {base.name!r} are not known: pass --base-model with its HF id or folder",
            param="base_model",
        )
    return found


def max_lora_rank(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ScalpelError(f"rank {rank} is above the largest LoRA rank vLLM serves ({VLLM_LORA_RANKS[-1]})", param="r")


def export_vllm(ref: str, out: Path | None = None, *, base_model: str | None = None) -> VllmExport:
    """Describe (and with `out`, copy) the PEFT folder of `ref` for vLLM.

    Without `out` the export points at the version's own folder in the store, which never changes once
    published. With `out`, the PEFT files are copied into out/<NAME>-<vN>/ (written to a temporary folder
    and renamed into place), with the config's base_model_name_or_path set to the base vLLM serves.
    """
    version = adapter_store.resolve(ref)
    adapter_store.verify(version)  # the files are the ones the manifest hashed
    missing = [f for f in PEFT_FILES if not (version.path / f).is_file()]
    if missing:
        raise ScalpelError(
            f"{version.ref} has no PEFT folder ({', '.join(missing)} missing): it was imported as a GGUF, "
            "which vLLM cannot load",
            param="model",
            code="no_peft_weights",
        )
    base = base_model_for(version, base_model)
    config = json.loads((version.path / "adapter_config.json").read_text(encoding="utf-8"))
    rank = max_lora_rank(int(config.get("r", 8)))
    folder = version.path
    if out is not None:
        folder = Path(out).resolve() / f"{version.name}-{version.version}"
        if folder.exists():
            raise ScalpelError(f"{folder.name} already exists in the output folder", param="out", code="exists")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            shutil.copy2(version.path / "adapter_model.safetensors", staging / "adapter_model.safetensors")
            config["base_model_name_or_path"] = base
            (staging / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
            staging.rename(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return VllmExport(lora_name=ref, ref=version.ref, adapter_dir=folder, base_model=base, max_lora_rank=rank)
