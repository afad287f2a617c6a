"""The evening update's settings and their defaults, written once (the CLI's help texts read them from here).

Kept apart from scalpel/update.py, which imports torch and llama.cpp, so that `scalpel --help` stays fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

INBOX_ATTEMPTS = 3  # runs a file of the inbox is tried on before it moves to not-promoted/


class UpdateSettings(BaseModel):
    """How an update trains and which gates it must pass (the defaults are the plan's)."""

    model_config = ConfigDict(extra="forbid")
    replay_ratio: float = Field(1.0, ge=0)  # earlier examples per new example, spread over earlier concepts
    replay_per_concept: int = Field(3, ge=0)  # ...but never fewer than this many from each earlier concept
    preservation_ratio: float = Field(0.5, ge=0)  # base-model answers per new example
    # "distill": on those answers the adapted model is pulled toward the base's whole next-token distribution
    # (KL, training_config.distill_concepts); "answers": they are learned as ordinary answers.
    preservation_loss: Literal["distill", "answers"] = "distill"
    preservation_weight: float = Field(4.0, gt=0)  # the distillation term's weight (training_config.distill_weight)
    num_epochs: float | None = Field(None, gt=0)  # default: the live version's config
    # Default: the first version's learning rate times learning_rate_scale. An update continues an adapter
    # that already knows things; at the full rate the new concept overwrote old answers' openings.
    learning_rate: float | None = Field(None, gt=0, lt=1)
    learning_rate_scale: float = Field(1 / 3, gt=0, le=1)
    min_new_knowledge: float = Field(0.95, ge=0, le=1)
    min_retention: float = Field(0.95, ge=0, le=1)  # share of what the live version knew
    min_base_agreement: float = Field(0.95, ge=0, le=1)
    max_perplexity_increase: float = Field(0.10, ge=0)
    base_tolerance: float = Field(0.02, ge=0)  # how much worse than an already-below-target live version
    gates: bool = True  # False: promote whatever comes out (the naive baseline of bench/evenings.py)
    # A candidate that fails its gates is kept, and another is trained from the live version with more
    # weight on what failed (see Emphasis), while the estimate of its time fits in max_update_seconds.
    max_candidates: int = Field(3, ge=1)
    # A concept some update had to replay in full (a candidate forgot it) stays fragile: the next updates'
    # first candidates replay it in full too, from the live version's manifest (see first_emphasis).
    keep_full_replay: bool = True
    max_update_seconds: float = Field(600.0, gt=0)
    seed: int = 0
