"""Print the README's CLI synopsis from the parser itself, so the README lists every real flag.

    .venv/bin/python scripts/cli_synopsis.py            # print it
    .venv/bin/python scripts/cli_synopsis.py --write    # replace the block in README.md

tests/scalpel/test_cli_docs.py fails when README.md's block differs from what this prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scalpel.cli.main import build_parser  # noqa: E402

START, END = "<!-- cli-synopsis:start (scripts/cli_synopsis.py --write) -->", "<!-- cli-synopsis:end -->"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public way to list a parser's subcommands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest.upper()
    flag = max(action.option_strings, key=len)
    if isinstance(action, argparse.BooleanOptionalAction):
        return f"[--[no-]{action.option_strings[0].removeprefix('--')}]"
    if action.nargs == 0:
        return f"[{flag}]"
    value = "|".join(action.choices) if action.choices else action.metavar or action.dest.upper()
    text = f"{flag} {value}" + (" ..." if isinstance(action, argparse._AppendAction) else "")
    return text if action.required else f"[{text}]"


def lines(parser: argparse.ArgumentParser | None = None, prefix: str = "scalpel") -> list[str]:
    """One line per leaf command: its positionals, then every flag (help and --version left out)."""
    parser = parser or build_parser()
    children = _subparsers(parser)
    if not children:
        args = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]
        args.sort(key=lambda a: bool(a.option_strings))  # positionals first, each group in its own order
        return [" ".join([prefix, *(_argument(a) for a in args)])]
    out: list[str] = []
    for name, child in children.items():
        out += lines(child, f"{prefix} {name}")
    return out


def block() -> str:
    return "\n".join([START, "```", *lines(), "```", END])


def main() -> int:
    readme = ROOT / "README.md"
    if "--write" in sys.argv[1:]:
        text = readme.read_text(encoding="utf-8")
        start, end = text.index(START), text.index(END) + len(END)
        readme.write_text(text[:start] + block() + text[end:], encoding="utf-8")
    else:
        print(block())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
