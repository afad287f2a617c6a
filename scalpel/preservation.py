"""Base preservation, for the first version and for every update: the base's own answers to general prompts, mixed
into training and learned by distillation, so that new knowledge does not cost the base its skills.

The answers are the bare base's greedy ones to reference/preservation_prompts.json, generated once per base and
cached (scalpel.evaluate.base_reference). On them the adapted model is pulled toward the base's whole next-token
distribution (training_config.distill_concepts, distill_weight), or, with loss "answers", learns them as answers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from core import model_store
from scalpel import evaluate
from scalpel.update_settings import PreservationSettings
from serving.engine import Engine
from training.config import TrainConfig, parse_config
from training.dataset import Example, examples_from_records

PRESERVATION_PROMPTS = evaluate.REFERENCE / "preservation_prompts.json"
PRESERVATION_CONCEPT = "base_preservation"


def preservation_examples(engine: evaluate.AnyEngine, *, progress: bool = False) -> list[dict]:
    """The base's own greedy answers to general prompts, as chat examples (cached per base)."""
    prompts = json.loads(PRESERVATION_PROMPTS.read_text(encoding="utf-8"))
    reference = evaluate.base_reference(engine, prompts, progress=progress)
    return [
        {
            "messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}],
            "concept": PRESERVATION_CONCEPT,
        }
        for r in reference
        if r["answer"].strip()
    ]


def preservation_pool(engine: evaluate.AnyEngine, *, progress: bool = False) -> list[Example]:
    """preservation_examples as training examples: the pool every sample is drawn from."""
    return examples_from_records(preservation_examples(engine, progress=progress), PRESERVATION_CONCEPT)


def base_pool(base: model_store.ModelEntry, *, progress: bool = False) -> list[Example]:
    """The pool for a base, with an engine opened for it and closed after (a first version has no engine open);
    llama.cpp generates only the first time, later calls read the cache."""
    engine = Engine(base)
    try:
        return preservation_pool(engine, progress=progress)
    finally:
        engine.close()


def sample(
    pool: list[Example], n_new: int, settings: PreservationSettings, rng: random.Random, scale: float = 1.0
) -> list[Example]:
    """`settings.ratio` preservation examples per new example (times `scale`), at most the whole pool, drawn
    with `rng`."""
    wanted = round(settings.ratio * n_new * scale)
    return rng.sample(pool, min(len(pool), wanted))


def training_overrides(settings: PreservationSettings, keep: list[str] | tuple[str, ...] = ()) -> dict:
    """The training_config fields that make training learn the preservation examples as `settings` says; the
    concepts in `keep` stay distilled."""
    others = [c for c in keep if c != PRESERVATION_CONCEPT]
    return {
        "distill_concepts": others + ([PRESERVATION_CONCEPT] if settings.loss == "distill" else []),
        "distill_weight": settings.weight,
    }


@dataclass
class Preserved:
    """A first version's training with base preservation (with_preservation)."""

    config: TrainConfig  # learns the preservation examples as the settings say
    examples: list[Example]  # the version's own examples and the preservation sample, in one seeded order
    record: dict  # the manifest's "preservation"


def with_preservation(
    config: TrainConfig, examples: list[Example], pool: list[Example], settings: PreservationSettings
) -> Preserved:
    """Mix a seeded sample of the pool into a first version's examples, as an update mixes it into its new ones."""
    rng = random.Random(f"{config.training_config.seed}-{PRESERVATION_CONCEPT}")
    preserve = sample(pool, len(examples), settings, rng)
    mixed = examples + preserve
    rng.shuffle(mixed)
    dumped = config.model_dump(mode="json")
    overrides = training_overrides(settings, config.training_config.distill_concepts)
    return Preserved(
        parse_config({**dumped, "training_config": {**dumped["training_config"], **overrides}}),
        mixed,
        record(settings, len(preserve), len(pool)),
    )


def record(settings: PreservationSettings | None, examples: int = 0, pool: int = 0) -> dict:
    """The manifest's "preservation": whether it was on, and how many of the base's answers were mixed in."""
    if settings is None:
        return {"enabled": False, "examples": 0}
    return {"enabled": True, "examples": examples, "pool": pool, **settings.model_dump()}


def described(preservation: dict | None) -> str | None:
    """A manifest's "preservation" in words, for the report."""
    if not preservation:
        return None
    if not preservation.get("enabled"):
        return "off (trained with --no-preservation)"
    how = (
        f"learned by distillation toward the base's next-token distribution (weight {preservation.get('weight'):g})"
        if preservation.get("loss") == "distill"
        else "learned as answers"
    )
    return f"{preservation.get('examples')} of the base's own answers to general prompts mixed in, {how}"
