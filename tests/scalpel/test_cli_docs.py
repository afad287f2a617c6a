"""The README lists every command with its real flags: the synopsis block is what the parser says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _synopsis():
    spec = importlib.util.spec_from_file_location("cli_synopsis", ROOT / "scripts" / "cli_synopsis.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_synopsis_matches_the_parser():
    synopsis = _synopsis()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert synopsis.block() in readme, "README.md's CLI block is stale: run scripts/cli_synopsis.py --write"


def test_every_flag_of_every_command_is_listed():
    synopsis = _synopsis()
    text = "\n".join(synopsis.lines())
    for flag in (
        "--max-steps",
        "--suite",
        "--verify",
        "--n-ctx",
        "--threads",
        "--n-gpu-layers",
        "--api-key-file",
        "--replace",
        "--out",
        "--json",
        "--max-seq-length",
        "--[no-]keep-full-replay",
    ):
        assert flag in text, flag
