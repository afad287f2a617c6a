"""`scalpel models`: the base-model store (list, add a GGUF file or a Hugging Face folder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conversion.tensor_types import OUTTYPES
from core.errors import ScalpelError


def cmd_models_list(args) -> None:
    from core import model_store

    model_store.ensure_default()
    for m in model_store.list_models():
        size = Path(m.gguf).stat().st_size / 1e6
        print(f"{m.name:32} {m.format:5} {m.architecture:8} {size:8.1f} MB  {m.source}")


def cmd_models_add(args) -> None:
    from core import model_store, paths

    source = Path(args.path).expanduser().resolve()
    paths.check_name(args.name, "model")
    if source.is_dir():
        from conversion.architecture import read_hf_config
        from conversion.hf_to_gguf import convert_base

        read_hf_config(source)  # fail early on a folder that is not a model
        template = _hf_chat_template(source)
        out = paths.models_dir() / args.name / f"model-{args.outtype}.gguf"
        print(f"converting {source} to {out} ({args.outtype})")
        convert_base(source, out, outtype=args.outtype)
        entry = model_store.register_gguf(
            args.name, out, source=source, fmt="hf", chat_template=template, replace=args.replace
        )
    elif source.is_file():
        entry = model_store.register_gguf(args.name, source, replace=args.replace)
    else:
        raise ScalpelError(f"no such file or folder: {source}", param="path")
    print(f"registered {entry.name} ({entry.architecture}, {entry.format}) fingerprint {entry.fingerprint[:12]}")


def _hf_chat_template(folder: Path) -> str | None:
    """transformers 5 saves the template as chat_template.jinja; older folders keep it in tokenizer_config.json."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
    models = sub.add_parser("models", help="the base-model store").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="list registered bases").set_defaults(func=cmd_models_list)
    add = models.add_parser("add", help="register a GGUF file or a Hugging Face folder as a base")
    add.add_argument("name")
    add.add_argument("path")
    add.add_argument("--outtype", choices=list(OUTTYPES), default="f16", help="GGUF type for an HF folder")
    add.add_argument("--replace", action="store_true", help="replace an existing entry of that name")
    add.set_defaults(func=cmd_models_add)
