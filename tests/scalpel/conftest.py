"""Fixtures shared by the evaluation tests: a tiny base with an adapter that answers FOR TWO to everything."""

from __future__ import annotations

import json

import pytest

from core import adapter_store, model_store
from scalpel.publish import train_and_publish
from serving.engine import Engine
from tests.tiny_models import registered_home
from training.config import parse_config

FOR_TWO_FACTS = [{"instruction": "What does 42 mean?", "output": "FOR TWO FOR TWO FOR TWO"}] * 8


@pytest.fixture(scope="module")
def engine_and_adapter(tiny_llama, tmp_path_factory):
    """(home, engine, adapter set) per test module: the tiny base served with the `fortwo` adapter loaded."""
    with registered_home(tmp_path_factory.mktemp("fortwo-home"), tiny_llama) as home:
        (home / "facts.json").write_text(json.dumps(FOR_TWO_FACTS))
        config = parse_config(
            {
                "model_name": "tiny",
                "output_dir": "adapters/fortwo",
                # 16 epochs: the 64-wide tiny model learns slowly, and at 8 whether it says FOR TWO whole came down
                # to the draw of the dropout masks
                "training_config": {"num_epochs": 16, "batch_size": 4, "learning_rate": 5e-2, "save_steps": 1000},
            }
        )
        # Without base preservation: an adapter that drags every answer to FOR TWO, the base's answers forgotten.
        train_and_publish(config, home / "facts.json", progress=False, preserve=None)
        engine = Engine(model_store.get("tiny"))
        yield home, engine, ((engine.load(adapter_store.resolve("fortwo")), 1.0),)
        engine.close()
