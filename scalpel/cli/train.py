"""`scalpel train`: train a surgical LoRA from a plan-style config and publish it as a new version."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conversion.tensor_types import OUTTYPES


def cmd_train(args) -> None:
    from scalpel.publish import train_and_publish
    from training.config import load_config

    config = load_config(Path(args.config))
    if args.suite:
        from scalpel.evaluate import load_suite

        for suite in args.suite:
            load_suite(Path(suite))  # a bad suite fails now, not after training
    result = train_and_publish(
        config,
        Path(args.data),
        eval_data=Path(args.eval_data) if args.eval_data else None,
        model=args.model,
        outtype=args.outtype,
        max_steps=args.max_steps,
        eval_suites=tuple(Path(s) for s in args.suite),
        on_warnings=_print_warnings,
    )
    m = result.version.manifest  # the typed manifest, as published
    print(f"\nadapter {result.version.ref} written to {result.version.path}")
    final_loss = m.metrics.final_loss if m.metrics.final_loss is not None else float("nan")
    size_mb = m.gguf.size_bytes / 1e6 if m.gguf else float("nan")
    print(
        f"  final loss {final_loss:.4f}, {m.metrics.examples} examples, "
        f"train {result.train_seconds:.0f} s, convert {result.convert_seconds:.2f} s, "
        f"GGUF {size_mb:.2f} MB"
    )


def _print_warnings(findings: list) -> None:
    for finding in findings:
        print(f"data warning: {finding.where}: {finding.message} [{finding.code}]", file=sys.stderr)


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
    train = sub.add_parser("train", help="train a LoRA from a plan-style config and publish a new version")
    train.add_argument("config", help="training config JSON (the plan's format)")
    train.add_argument("--data", required=True, help="JSON list, JSONL, or OpenAI chat JSONL")
    train.add_argument("--eval-data", help="validation examples, evaluated every eval_steps")
    train.add_argument("--model", help="base to train on instead of the config's model_name")
    train.add_argument("--outtype", choices=list(OUTTYPES), default="f32", help="GGUF type of the adapter")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument(
        "--suite",
        action="append",
        default=[],
        help="eval suite kept with the version: later updates must retain it (repeatable)",
    )
    train.set_defaults(func=cmd_train)
