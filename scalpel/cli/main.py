"""The `scalpel` command: one subcommand per stage of the journey, and `demo` for the whole loop.

Each command group lives in its own module beside this one and adds itself to the parser.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

from core.errors import ScalpelError
from core.paths import enforce_offline
from scalpel.cli import (
    adapters,
    chat,
    convert,
    data,
    demo,
    doctor,
    evaluate,
    export,
    jobs,
    models,
    serve,
    train,
    update,
)

GROUPS = [models, train, convert, serve, chat, data, adapters, update, evaluate, export, jobs, demo, doctor]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scalpel", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"scalpel {importlib.metadata.version('scalpel')}")
    sub = p.add_subparsers(dest="command", required=True)
    # --threads for every command that runs llama.cpp; it sets SCALPEL_THREADS for this process
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument(
        "--threads", type=int, help="llama.cpp CPU threads (default: $SCALPEL_THREADS, else every usable physical core)"
    )
    for group in GROUPS:
        group.register(sub, threads)
    return p


def main(argv: list[str] | None = None) -> int:
    enforce_offline()
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:
            from core import threads

            os.environ[threads.ENV] = str(threads.resolve(args.threads))
        args.func(args)
    except ScalpelError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the stores are unchanged", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
