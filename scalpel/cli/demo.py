"""`scalpel demo`: the whole loop on the embedded default model."""

from __future__ import annotations

import argparse


def cmd_demo(args) -> None:
    from scalpel.demo import run_demo

    run_demo(max_steps=args.max_steps, preservation=not args.no_preservation)


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
    demo = sub.add_parser("demo", parents=[threads], help="the whole loop on the embedded default model")
    demo.add_argument("--max-steps", type=int, help="cap training steps (for a quick look)")
    demo.add_argument(
        "--no-preservation",
        action="store_true",
        help="train without the base's own answers mixed in (to see what the adapter costs the base without them)",
    )
    demo.set_defaults(func=cmd_demo)
