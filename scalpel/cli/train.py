"""`scalpel train`: train a surgical LoRA from a plan-style config and publish it as a new version."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conversion.tensor_types import OUTTYPES

# The flags of torchrun's that `scalpel train` passes on, as a Launch's fields (training.distributed).
LAUNCH_FLAGS = {
    "nproc_per_node": "--nproc-per-node",
    "nnodes": "--nnodes",
    "node_rank": "--node-rank",
    "rdzv_endpoint": "--rdzv-endpoint",
    "accelerate_config": "--accelerate-config",
}


def cmd_train(args) -> None:
    from scalpel.publish import train_and_publish
    from scalpel.update_settings import PreservationSettings
    from training.config import load_config
    from training.distributed import NodeDone, launch_settings

    launch = launch_settings(LAUNCH_FLAGS, **{field: getattr(args, field) for field in LAUNCH_FLAGS})
    config = load_config(Path(args.config))
    if args.suite:
        from scalpel.evaluate import load_suite

        for suite in args.suite:
            load_suite(Path(suite))  # a bad suite fails now, not after training
    try:
        result = train_and_publish(
            config,
            Path(args.data),
            eval_data=Path(args.eval_data) if args.eval_data else None,
            model=args.model,
            outtype=args.outtype,
            max_steps=args.max_steps,
            eval_suites=tuple(Path(s) for s in args.suite),
            on_warnings=_print_warnings,
            launch=launch,
            preserve=None if args.no_preservation else PreservationSettings(),
        )
    except NodeDone as done:
        print(done)
        return
    m = result.version.manifest  # the typed manifest, as published
    print(f"\nadapter {result.version.ref} written to {result.version.path}")
    final_loss = m.metrics.final_loss if m.metrics.final_loss is not None else float("nan")
    size_mb = m.gguf.size_bytes / 1e6 if m.gguf else float("nan")
    print(
        f"  final loss {final_loss:.4f}, {m.metrics.examples} examples, "
        f"train {result.train_seconds:.0f} s, convert {result.convert_seconds:.2f} s, "
        f"GGUF {size_mb:.2f} MB"
    )
    if (m.metrics.world_size or 1) > 1:
        print(
            f"  {m.metrics.world_size} processes ({m.metrics.backend}), global batch {m.metrics.global_batch}, "
            f"learning rate {m.metrics.learning_rate:g}"
        )
    from scalpel.evaluate import outcome_lines

    preserved = m.preservation
    print(
        f"  base preservation: {preserved.examples} of the base's answers"
        if preserved and preserved.enabled
        else "  base preservation: off"
    )
    print("\n".join(outcome_lines(m.eval)))


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
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="train on this many processes under torchrun (DDP: one per GPU on CUDA, gloo on a CPU); "
        "batch_size is per process",
    )
    train.add_argument("--nnodes", type=int, default=1, metavar="N", help="machines taking part (torchrun's --nnodes)")
    train.add_argument("--node-rank", type=int, default=0, metavar="I", help="this machine's index; node 0 publishes")
    train.add_argument(
        "--rdzv-endpoint", metavar="HOST:PORT", help="on node 0, reached by every node (with several nodes)"
    )
    train.add_argument(
        "--accelerate-config",
        metavar="YAML",
        help="an accelerate config YAML (FSDP for a 70B-class base: examples/accelerate/fsdp_70b.yaml); "
        "`accelerate launch` starts the processes instead of torchrun",
    )
    train.add_argument(
        "--suite",
        action="append",
        default=[],
        help="eval suite kept with the version: later updates must retain it (repeatable); without one, "
        "a suite is derived from the training data",
    )
    train.add_argument(
        "--no-preservation",
        action="store_true",
        help="train on the data alone, without the base's own answers to general prompts mixed in "
        "(base preservation, on by default as in every update)",
    )
    train.set_defaults(func=cmd_train)
