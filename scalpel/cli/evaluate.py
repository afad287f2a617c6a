"""`scalpel eval`: score a base or an adapter version through llama.cpp."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import ScalpelError


def cmd_eval(args) -> None:
    import time

    from core import adapter_store, model_store, paths
    from core.atomic import write_json
    from scalpel import evaluate
    from serving.engine import Engine

    suites = {Path(f).stem: evaluate.load_suite(Path(f)) for f in args.suite}
    if args.ref in [e.name for e in model_store.list_models()]:
        base, version = model_store.get(args.ref), None
    else:
        version = adapter_store.resolve(args.ref)
        base = model_store.get(version.manifest.require_base().name)
        if not suites:  # the suites recorded with the version, if any
            suites = {Path(f).stem: evaluate.load_suite(f) for f in sorted(version.path.glob("eval/*.json"))}
    if not suites and args.no_regression:
        raise ScalpelError("nothing to evaluate: give --suite FILE, or drop --no-regression", param="suite")
    engine = Engine(base)
    try:
        adapters = ((engine.load(version), 1.0),) if version else ()
        report = evaluate.evaluate(
            engine,
            adapters,
            suites,
            version.ref if version else base.name,
            regression=not args.no_regression,
            progress=True,
        )
    finally:
        engine.close()
    out = (
        Path(args.out)
        if args.out
        else paths.state_dir() / "evals" / f"{report.ref.replace('@', '-')}-{int(time.time())}"
    )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", report.as_dict())
    report.plot(out / "eval.png")
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.as_text())
    print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}", file=sys.stderr)


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
    ev = sub.add_parser(
        "eval",
        parents=[threads],
        help="score a base or adapter version through llama.cpp (greedy): suites and base regression",
    )
    ev.add_argument("ref", help="a base name, an adapter (its live version) or NAME@vN")
    ev.add_argument(
        "--suite",
        action="append",
        default=[],
        help="eval suite JSON (repeatable; default: the suites stored with the version)",
    )
    ev.add_argument("--no-regression", action="store_true", help="skip the base-regression checks")
    ev.add_argument("--out", help="folder for eval.json and eval.png (default .scalpel/evals/...)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)
