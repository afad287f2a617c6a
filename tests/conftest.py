"""Shared fixtures: an isolated SCALPEL_HOME per test session, and tiny models built on the spot."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A fresh, empty scalpel home: its own models/ and adapters/ stores."""
    monkeypatch.setenv("SCALPEL_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
