"""`scalpel export vllm NAME[@vN]`: what vLLM needs to serve a stored version on a GPU fleet."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path


def cmd_export_vllm(args) -> None:
    from scalpel.export import export_vllm

    export = export_vllm(args.ref, Path(args.out) if args.out else None, base_model=args.base_model)
    if args.json:
        print(json.dumps(export.as_dict(), indent=2))
        return
    print(f"# {export.ref}: PEFT folder {export.adapter_dir}, base {export.base_model}")
    print("# serve it with vLLM (the client's model name stays the same as with scalpel):")
    print(shlex.join(export.serve_command()))
    print("# or load it into a running vLLM started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True:")
    body = shlex.quote(json.dumps(export.load_request()))
    print(f"curl -s http://127.0.0.1:8000/v1/load_lora_adapter -H 'Content-Type: application/json' -d {body}")


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
    export = sub.add_parser("export", help="hand a stored version to another serving engine")
    targets = export.add_subparsers(dest="target", required=True)
    vllm = targets.add_parser("vllm", help="the PEFT folder, the HF base and the vLLM command for a version")
    vllm.add_argument("ref", help="NAME (its live version) or NAME@vN")
    vllm.add_argument("--out", help="copy the PEFT folder into OUT/<NAME>-<vN>/ (default: point at the store)")
    vllm.add_argument("--base-model", help="the base's Hugging Face id or folder (default: from the base's profile)")
    vllm.add_argument("--json", action="store_true", help="print the export as JSON")
    vllm.set_defaults(func=cmd_export_vllm)
