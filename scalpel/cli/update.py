"""`scalpel update`: the evening update of an adapter, from a file or an inbox folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.errors import ScalpelError
from scalpel.update_settings import INBOX_ATTEMPTS, UpdateSettings


def cmd_update(args) -> None:
    from scalpel.update import run_inbox, run_update

    if bool(args.data) == bool(args.inbox):
        raise ScalpelError("give either --data FILE (with an optional --eval) or --inbox DIR", param="data")
    settings = settings_from_args(args)
    if args.inbox:
        results = run_inbox(args.name, Path(args.inbox), settings=settings, attempts=args.attempts)
    else:
        results = [
            run_update(args.name, Path(args.data), eval_suite=Path(args.eval) if args.eval else None, settings=settings)
        ]
    for r in results:
        print(f"{r.version.ref}: {'live' if r.promoted else 'kept, not live'} after {r.seconds:.0f} s")
        for c in r.candidates[:-1]:
            print(f"  candidate {c['version']} failed its gates first ({'; '.join(c['reasons'])})")
        for name, suite in r.eval["suites"].items():
            print(f"  {name:<40} {suite['accuracy']:6.0%}")
        general = r.eval.get("general")
        if general:
            print(
                f"  {'general questions':<40} {general['passed']}/{general['total']}   "
                f"(the bare base: {general['base_passed']}/{general['total']})"
            )
        base = r.eval.get("base_regression")
        if base:
            print(
                f"  {'base agreement':<40} {base['agreement']:6.1%}   ({base['agreement_all_positions']:.1%} of all "
                f"picks)   perplexity {base['perplexity_change']:+.1%}"
            )
        for reason in r.reasons:
            print(f"  gate failed: {reason}")


def settings_from_args(args) -> UpdateSettings:
    """The update's settings: the flags given, the defaults for the rest."""
    values = {
        "replay_ratio": args.replay_ratio,
        "replay_per_concept": args.replay_per_concept,
        "preservation_ratio": args.preservation_ratio,
        "preservation_loss": args.preservation_loss,
        "preservation_weight": args.preservation_weight,
        "num_epochs": args.epochs,
        "new_repeats": args.new_repeats,
        "polish_epochs": args.polish_epochs,
        "polish_loss": args.polish_loss,
        "repair_epochs": args.repair_epochs,
        "paraphrases": args.paraphrases,
        "repair_rate_scale": args.repair_rate_scale,
        "repair_rounds": args.repair_rounds,
        "learning_rate": args.learning_rate,
        "min_retention": args.min_retention,
        "min_new_knowledge": args.min_new_knowledge,
        "min_base_agreement": args.min_base_agreement,
        "max_perplexity_increase": args.max_perplexity_increase,
        "relative_base_gate": args.relative_base_gate,
        "max_candidates": args.candidates,
        "max_update_seconds": args.max_seconds,
        "keep_full_replay": args.keep_full_replay,
        "replay_budget": args.replay_budget,
        "risk_margin": args.risk_margin,
        "retention_check": args.retention_check,
    }
    given = {k: v for k, v in values.items() if v is not None}
    if args.no_replay_budget:
        given["replay_budget"] = None  # after the filter: None is what lifts the cap
    try:
        settings = UpdateSettings(**given)
    except ValueError as exc:
        raise ScalpelError(f"invalid update setting: {exc}", param="settings") from exc
    return settings


def _default(field: str) -> str:
    """A setting's default as the help text shows it, read from UpdateSettings (where it is written once)."""
    value = UpdateSettings.model_fields[field].default
    return (
        "on"
        if value is True
        else "off"
        if value is False
        else f"{value:.3g}"
        if isinstance(value, float)
        else str(value)
    )


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
    up = sub.add_parser(
        "update",
        parents=[threads],
        help="the evening update: continue the live version on new "
        "knowledge, with replay and base preservation, promote "
        "only past the gates",
    )
    up.add_argument("name", help="the adapter to update (its live version is the starting point)")
    up.add_argument("--data", help="the new knowledge file")
    up.add_argument("--eval", help="eval suite for the new knowledge (kept with the version)")
    up.add_argument(
        "--inbox",
        help="process every knowledge file in this folder (NAME.eval.json beside each), "
        "then archive it; one that is not promoted stays for the next run",
    )
    up.add_argument(
        "--attempts",
        type=int,
        default=INBOX_ATTEMPTS,
        help=f"with --inbox: runs a file is tried on before it moves to not-promoted/ (default {INBOX_ATTEMPTS})",
    )
    up.add_argument(
        "--replay-ratio",
        type=float,
        help="earlier examples replayed per new example, spread over the "
        f"earlier concepts (default {_default('replay_ratio')})",
    )
    up.add_argument(
        "--replay-per-concept",
        type=int,
        help=f"but at least this many from every earlier concept (default {_default('replay_per_concept')})",
    )
    budget = up.add_mutually_exclusive_group()
    budget.add_argument(
        "--replay-budget",
        type=int,
        help="at most this many replayed examples, whatever the number of concepts learned, the concepts at "
        f"risk first (default {_default('replay_budget')})",
    )
    budget.add_argument(
        "--no-replay-budget",
        action="store_true",
        help="no cap: replay from every earlier concept, a replay that grows with every concept learned",
    )
    up.add_argument(
        "--risk-margin",
        type=float,
        help="a concept is at risk when the thinnest margin (logits) of its kept answers is below this "
        f"(default {_default('risk_margin')})",
    )
    up.add_argument(
        "--retention-check",
        choices=["forced", "generate"],
        help="forced: check earlier suites by teacher-forcing the live version's right answers, generating only "
        f"where that cannot decide; generate: generate every answer (default {_default('retention_check')})",
    )
    up.add_argument(
        "--preservation-ratio",
        type=float,
        help=f"base-model answers per new example (default {_default('preservation_ratio')})",
    )
    up.add_argument(
        "--preservation-loss",
        choices=["distill", "answers"],
        help="distill: match the base's whole next-token distribution on those answers (KL); "
        f"answers: learn them as ordinary answers (default {_default('preservation_loss')})",
    )
    up.add_argument(
        "--preservation-weight",
        type=float,
        help=f"weight of the distillation term (default {_default('preservation_weight')})",
    )
    up.add_argument("--epochs", type=float, help="default: the live version's num_epochs")
    up.add_argument(
        "--polish-epochs",
        type=float,
        help="after training a candidate, this many more epochs on the new concepts whose training loss is "
        "still above --polish-loss, from the candidate, before it is evaluated "
        f"(default {_default('polish_epochs')}: off)",
    )
    up.add_argument(
        "--polish-loss", type=float, help=f"what counts as under-learned (default {_default('polish_loss')})"
    )
    up.add_argument(
        "--paraphrases",
        type=int,
        help="up to this many rewrites of each new answer's question, by the base, kept only where the answer "
        "stays about as likely after them; the new examples' repeats are asked in those words "
        f"(default {_default('paraphrases')}: off)",
    )
    up.add_argument(
        "--repair-epochs",
        type=float,
        help="a candidate that fails on knowledge alone (new concepts answered wrong, earlier answers lost) is "
        "trained this many more epochs on those concepts, from its own weights, and judged again "
        f"(default {_default('repair_epochs')}: off)",
    )
    up.add_argument(
        "--repair-rate-scale",
        type=float,
        help=f"the repair's learning rate, times the update's (default {UpdateSettings().repair_rate_scale:.3g})",
    )
    up.add_argument(
        "--repair-rounds",
        type=int,
        help="repairs of one candidate at most, each on what the one before still got wrong, while the time allows "
        f"(default {_default('repair_rounds')})",
    )
    up.add_argument(
        "--new-repeats",
        type=int,
        help="each new example this many times per epoch: with fewer --epochs, the new knowledge gets its passes "
        f"and the replay and preservation fewer (default {_default('new_repeats')})",
    )
    up.add_argument(
        "--learning-rate",
        type=float,
        help=f"default: the first version's learning_rate times {_default('learning_rate_scale')}",
    )
    up.add_argument("--min-retention", type=float, help=f"gate on earlier suites (default {_default('min_retention')})")
    up.add_argument(
        "--min-new-knowledge", type=float, help=f"gate on the new suite (default {_default('min_new_knowledge')})"
    )
    up.add_argument(
        "--min-base-agreement",
        type=float,
        help="gate on base regression: the share of the bare base's own decided picks the new version must "
        f"make (default {_default('min_base_agreement')})",
    )
    up.add_argument(
        "--max-perplexity-increase",
        type=float,
        help="gate on base regression: perplexity on general text at most this much above the bare base's "
        f"(default {_default('max_perplexity_increase')})",
    )
    up.add_argument(
        "--relative-base-gate",
        action="store_true",
        default=None,
        help="when the live version is already below those base targets, judge the new one against the live "
        f"version instead (no more than {_default('base_tolerance')} worse); off: always against the bare base",
    )
    up.add_argument(
        "--candidates",
        type=int,
        help="candidates trained at most, each leaning on what the one "
        f"before failed (default {_default('max_candidates')})",
    )
    up.add_argument(
        "--max-seconds",
        type=float,
        help="no further candidate is started when it would end past "
        f"this many seconds (default {_default('max_update_seconds')})",
    )
    up.add_argument(
        "--keep-full-replay",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start with the full replay of every concept an earlier update had to replay in full; under a "
        f"replay budget they are counted as at risk instead (default {_default('keep_full_replay')})",
    )
    up.set_defaults(func=cmd_update)
