"""`scalpel doctor`: what a bug report needs."""

from __future__ import annotations

import argparse

from core.errors import ScalpelError


def cmd_doctor(args) -> None:
    from scalpel.doctor import report

    if not report(model=args.model, as_json=args.json):
        raise ScalpelError("doctor found a problem (see above)", code="doctor_failed")


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
    doctor = sub.add_parser(
        "doctor",
        parents=[threads],
        help="what a bug report needs: llama.cpp's build, torch's device, versions, threads, "
        "and a one-token generation in a child process",
    )
    doctor.add_argument("--model", help="registered base for the generation test (default: the embedded model)")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)
