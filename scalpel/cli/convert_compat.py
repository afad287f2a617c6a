"""llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py arguments, for `scalpel convert` and the thin
`scalpel-convert-hf` / `scalpel-convert-lora` entry points: a user's existing command works after its first word."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import ScalpelError

_WRITES = "scalpel writes one little-endian, unsplit GGUF of a Llama-family text model"
# Reference flags we do not implement, refused by name (flag -> (takes a value, why)).
REFUSED_HF = {
    "--bigendian": (False, "big-endian GGUFs are not written; " + _WRITES),
    "--split-max-tensors": (True, "split GGUFs are not written; " + _WRITES),
    "--split-max-size": (True, "split GGUFs are not written; " + _WRITES),
    "--no-tensor-first-split": (False, "split GGUFs are not written; " + _WRITES),
    "--metadata": (True, "authorship metadata overrides are not supported"),
    "--remote": (False, "scalpel reads local folders only and downloads nothing"),
    "--mmproj": (False, "multimodal projectors are not converted; " + _WRITES),
    "--mtp": (False, "draft heads are not exported; " + _WRITES),
    "--no-mtp": (False, "draft heads are not exported; " + _WRITES),
    "--no-nextn": (False, "draft heads are not exported; " + _WRITES),
    "--dspark": (False, "draft heads are not exported; " + _WRITES),
    "--mistral-format": (False, "only Hugging Face (transformers) folders are converted"),
    "--disable-mistral-community-chat-template": (False, "only Hugging Face (transformers) folders are converted"),
    "--sentence-transformers-dense-modules": (False, "only causal language models are converted"),
    "--fuse-gate-up-exps": (False, "mixture-of-experts models are not supported"),
    "--fuse-qkv": (False, "q/k/v stay separate tensors, as llama.cpp's llama and qwen2 graphs expect"),
    "--fp8-as-q8": (False, "FP8 checkpoints are not supported"),
    "--target-model-dir": (True, "draft models are not supported"),
}
# The ones a llama.cpp user is likely to type, which `scalpel convert base` refuses with its reason too (the
# entry points refuse every one; elsewhere argparse still names an unknown flag).
COMMON = ("--bigendian", "--split-max-tensors", "--split-max-size", "--no-tensor-first-split", "--remote", "--metadata")
REFUSED_CONVERT = {flag: REFUSED_HF[flag] for flag in COMMON}
REFUSED_LORA = {
    "--bigendian": REFUSED_HF["--bigendian"],
    "--trust-remote-code": (False, "a model folder never runs code here"),
}
# Accepted and needing nothing: our converters always stream one tensor at a time.
NO_OPS = ("--use-temp-file", "--no-lazy")
HF_OUTTYPES = ["f32", "f16", "bf16", "q8_0", "auto"]


def add_refused(parser: argparse.ArgumentParser, refused: dict[str, tuple[bool, str]]) -> None:
    for flag, (takes_value, _) in refused.items():
        kwargs: dict = {"default": None, "metavar": "X"} if takes_value else {"action": "store_true"}
        parser.add_argument(flag, dest=_dest(flag), help=argparse.SUPPRESS, **kwargs)
    for flag in NO_OPS:
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)


def _dest(flag: str) -> str:
    return "refused_" + flag.lstrip("-").replace("-", "_")


def check_refused(args: argparse.Namespace) -> None:
    """A refused flag that was given (a split size of 0 means no split, so it passes) is an error naming it."""
    for flag, (_, why) in {**REFUSED_HF, **REFUSED_LORA}.items():
        value = getattr(args, _dest(flag), None)
        if value and str(value) != "0":
            raise ScalpelError(f"{flag} is not supported: {why}", param=flag, code="unsupported_option")


def outfile(template: str | None, default: Path, outtype: str) -> Path:
    """--outfile, with the reference's `{ftype}` placeholder filled in."""
    return Path(template.replace("{ftype}", outtype)) if template else default


def auto_outtype(folder: Path) -> str:
    """The reference's --outtype auto: the highest-fidelity 16-bit type for the weights (bf16 for bf16)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if files:
        with safe_open(str(files[0]), framework="pt") as st:
            keys = list(st.keys())
            if keys and str(st.get_slice(keys[0]).get_dtype()) == "BF16":
                return "bf16"
    return "f16"


def resolve_lora_base(adapter: Path, base: str | None, base_model_id: str | None) -> str:
    """The base an adapter is for, as the reference finds it: --base-model-id (which overrides --base), --base,
    else adapter_config.json's base_model_name_or_path; a hub id only from the local Hugging Face cache."""
    if base_model_id:
        return _cached_hub_folder(base_model_id, "--base-model-id")
    if base:
        return base
    config_file = adapter / "adapter_config.json"
    try:
        name = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise ScalpelError(f"{config_file}: cannot be read ({exc})", param=str(config_file)) from exc
    if not name:
        raise ScalpelError(
            f"{config_file}: base_model_name_or_path is not set; pass --base",
            param=f"{config_file}: base_model_name_or_path",
        )
    return name if Path(name).exists() else _cached_hub_folder(name, f"{config_file}: base_model_name_or_path")


def _cached_hub_folder(repo_id: str, field: str) -> str:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(found, str):
        raise ScalpelError(
            f"{field}: {repo_id} is not in the local Hugging Face cache, and scalpel downloads nothing; "
            "pass --base with the base's folder (config.json is enough), GGUF or registered name",
            param=field,
        )
    return str(Path(found).parent)


def hf_parser(prog: str = "scalpel-convert-hf") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="convert_hf_to_gguf.py's arguments, with scalpel's converter")
    p.add_argument("model", nargs="?", help="Hugging Face model folder")
    p.add_argument("--outfile", help="path to write to ({ftype} is replaced by the outtype)")
    p.add_argument("--outtype", choices=HF_OUTTYPES, default="auto")
    p.add_argument("--vocab-only", action="store_true", help="write the metadata and vocabulary, no tensors")
    p.add_argument("--dry-run", action="store_true", help="check the folder and print the plan; write nothing")
    p.add_argument("--model-name", help="general.name (default: the folder's name)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--print-supported-models", action="store_true")
    add_refused(p, REFUSED_HF)
    return p


def lora_parser(prog: str = "scalpel-convert-lora") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="convert_lora_to_gguf.py's arguments, with scalpel's converter")
    p.add_argument("lora_path", help="PEFT adapter folder")
    p.add_argument("--outfile", help="path to write to ({ftype} is replaced by the outtype)")
    p.add_argument("--outtype", choices=HF_OUTTYPES, default="f32", help="auto: f16, or bf16 for bf16 weights")
    p.add_argument("--base", help="base: HF folder (config.json is enough), GGUF file or registered name")
    p.add_argument("--base-model-id", help="base's Hugging Face id, found in the local cache only")
    p.add_argument("--dry-run", action="store_true", help="check the adapter against the base; write nothing")
    p.add_argument("--verbose", action="store_true")
    add_refused(p, REFUSED_LORA)
    return p


def run_hf(args: argparse.Namespace) -> None:
    """convert_hf_to_gguf.py's arguments, run as `scalpel convert base`."""
    from conversion.architecture import HF_ARCHITECTURES
    from scalpel.cli.convert import cmd_convert_base

    if args.print_supported_models:
        print("\n".join(sorted(HF_ARCHITECTURES)))
        return
    if not args.model:
        raise ScalpelError("the model folder is required", param="model")
    args.source, args.out, args.verify, args.json = args.model, args.outfile, False, False
    cmd_convert_base(args)


def run_lora(args: argparse.Namespace) -> None:
    """convert_lora_to_gguf.py's arguments, run as `scalpel convert lora`."""
    from scalpel.cli.convert import cmd_convert_lora

    args.adapter, args.out, args.verify = args.lora_path, args.outfile, False
    cmd_convert_lora(args)


def _entry(parser: argparse.ArgumentParser, run, argv: list[str] | None) -> int:
    from core.paths import enforce_offline

    enforce_offline()
    args = parser.parse_args(argv)
    try:
        run(args)
    except ScalpelError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def main_hf(argv: list[str] | None = None) -> int:
    """`scalpel-convert-hf`: convert_hf_to_gguf.py's command line."""
    return _entry(hf_parser(), run_hf, argv)


def main_lora(argv: list[str] | None = None) -> int:
    """`scalpel-convert-lora`: convert_lora_to_gguf.py's command line."""
    return _entry(lora_parser(), run_lora, argv)
