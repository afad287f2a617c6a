"""`scalpel serve`: the OpenAI-compatible server, with the plan's adapter and training routes."""

from __future__ import annotations

import argparse


def cmd_serve(args) -> None:
    from scalpel.serve import ServeSettings, serve

    overrides = {
        k: v
        for k, v in {
            "model": args.model,
            "host": args.host,
            "port": args.port,
            "n_ctx": args.n_ctx,
            "slots": args.slots,
            "prompt_block": args.prompt_block,
            "deterministic": args.deterministic or None,
            "engine_process": False if args.in_process else None,
            "threads": args.threads,
            "n_gpu_layers": args.n_gpu_layers,
            "api_key_file": args.api_key_file,
            "api_keys": args.api_key or None,
            "admin_keys": args.admin_key or None,
            "preload": args.adapter or None,
            "training_data": args.training_data,
            "attach_on_load": args.attach_on_load or None,
        }.items()
        if v is not None
    }
    serve(ServeSettings(**overrides))


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
    serve = sub.add_parser(
        "serve", parents=[threads], help="OpenAI-compatible server (settings also from SCALPEL_* env vars)"
    )
    serve.add_argument("--model", help="registered base name")
    serve.add_argument("--host", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--n-ctx", type=int, help="tokens of context per KV slot (default 4096)")
    serve.add_argument("--slots", type=int, help="KV slots: requests decoded together (default 4)")
    serve.add_argument("--prompt-block", type=int, help="prompt evaluation and cache reuse granularity (default 32)")
    serve.add_argument(
        "--deterministic",
        action="store_true",
        help="never batch two requests in one llama_decode: a greedy answer never depends on its neighbours",
    )
    serve.add_argument(
        "--in-process", action="store_true", help="run the engine in the server's process (default: its own)"
    )
    serve.add_argument("--n-gpu-layers", type=int, help="-1 (default): all layers on Metal/CUDA builds")
    serve.add_argument("--api-key", action="append", help="client Bearer key: inference, models (repeatable)")
    serve.add_argument("--admin-key", action="append", help="admin Bearer key: every route (repeatable)")
    serve.add_argument("--api-key-file", help="file with one key per line: admin:KEY, client:KEY or KEY (client)")
    serve.add_argument("--adapter", action="append", help="adapter to load at start (repeatable)")
    serve.add_argument(
        "--training-data",
        help="dataset for /api/training/start requests that name none (a path below SCALPEL_HOME, or a file id)",
    )
    serve.add_argument(
        "--attach-on-load",
        action="store_true",
        help="the plan's flow: POST /api/adapters/NAME/load makes the base's name serve that adapter until it is "
        "unloaded; BASE@base stays the bare base (default off; env SCALPEL_ATTACH_ON_LOAD)",
    )
    serve.set_defaults(func=cmd_serve)
