"""`scalpel serve`: the OpenAI-compatible server, with the plan's adapter and training routes."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import pydantic

from core.errors import ScalpelError


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
    with flag_errors():
        settings = ServeSettings(**overrides)
    if args.replicas is None and args.ray_address is None:
        serve(settings)
        return
    # A fleet on Ray Serve; Ray is imported only here, so a plain `scalpel serve` never starts it.
    from scalpel.fleet import FleetSettings, serve_fleet

    fleet = {
        "replicas": args.replicas,
        "ray_address": args.ray_address,
        "max_adapters_per_replica": args.max_adapters_per_replica,
        "cpus_per_replica": args.cpus_per_replica,
    }
    with flag_errors():
        chosen = FleetSettings(**{k: v for k, v in fleet.items() if v is not None})
    serve_fleet(settings, chosen)


@contextlib.contextmanager
def flag_errors() -> Iterator[None]:
    """A setting out of range is a clear error naming its flag, not a traceback."""
    try:
        yield
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "settings"
        raise ScalpelError(f"--{field.replace('_', '-')}: {first['msg']}", param=field) from exc


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
    fleet = serve.add_argument_group("fleet", "several replicas of the server on Ray Serve, routed by model")
    fleet.add_argument("--replicas", type=int, help="run this many replicas on Ray Serve (default: one plain server)")
    fleet.add_argument(
        "--ray-address",
        help="run the fleet on a running Ray cluster: auto, or HEAD:6379 (2 replicas unless --replicas; "
        "default: a Ray cluster in this process, on 127.0.0.1)",
    )
    fleet.add_argument(
        "--max-adapters-per-replica", type=int, help="adapter versions each replica keeps loaded (default 3)"
    )
    fleet.add_argument(
        "--cpus-per-replica",
        type=int,
        help="CPUs Ray reserves per replica, and its llama.cpp threads (default: --threads, else cores / replicas)",
    )
    serve.set_defaults(func=cmd_serve)
