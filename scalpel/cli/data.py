"""`scalpel data check`: validate a knowledge file before training on it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import ScalpelError


def cmd_data_check(args) -> None:
    from training.dataset import load_examples
    from training.quality import QualityRules, check

    examples = load_examples(Path(args.file))
    rules = QualityRules(min_examples=args.min_examples, min_avg_answer_words=args.min_avg_words, strict=args.strict)
    counts = None
    if args.model:
        from core import model_store
        from training.base_model import load_tokenizer, template_info
        from training.dataset import tokenize_example

        entry = model_store.get(args.model)
        tokenizer, info = load_tokenizer(entry), template_info(entry)
        counts = [tokenize_example(ex, tokenizer, info, args.max_seq_length)["n_tokens"] for ex in examples]
    report = check(examples, rules, counts, args.max_seq_length)
    print(
        json.dumps(report.as_dict(), indent=2, ensure_ascii=False) if args.json else f"{args.file}: {report.as_text()}"
    )
    if report.errors:
        raise ScalpelError(f"{args.file}: {len(report.errors)} errors", code="dataset_errors")


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
    data = sub.add_parser("data", help="knowledge files").add_subparsers(dest="action", required=True)
    check = data.add_parser(
        "check",
        help="validate a dataset: schema, encoding, duplicates, conflicts, "
        "length, concept balance, the plan's quality metrics",
    )
    check.add_argument("file")
    check.add_argument("--model", help="count tokens with this base's tokenizer and chat template")
    check.add_argument("--max-seq-length", type=int, default=2048)
    check.add_argument("--min-examples", type=int, default=100)
    check.add_argument("--min-avg-words", type=float, default=150)
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_data_check)
