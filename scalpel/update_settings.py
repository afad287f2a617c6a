"""The settings of base preservation and of the evening update, and their defaults, written once (the CLI's help
texts read them from here).

Kept apart from scalpel/update.py and scalpel/preservation.py, which import torch and llama.cpp, so that
`scalpel --help` stays fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

INBOX_ATTEMPTS = 3  # runs a file of the inbox is tried on before it moves to not-promoted/


class PreservationSettings(BaseModel):
    """Base preservation: how many of the base's own answers to general prompts are mixed into training, and how
    they are learned. The first version and every update use it (see scalpel/preservation.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ratio: float = Field(0.5, ge=0)  # base-model answers per new example (at most the whole pool of prompts)
    # "distill": on those answers the adapted model is pulled toward the base's whole next-token distribution
    # (KL, training_config.distill_concepts); "answers": they are learned as ordinary answers.
    loss: Literal["distill", "answers"] = "distill"
    weight: float = Field(4.0, gt=0)  # the distillation term's weight (training_config.distill_weight)


_PRESERVE = PreservationSettings()


class UpdateSettings(BaseModel):
    """How an update trains and which gates it must pass (the defaults are the plan's)."""

    model_config = ConfigDict(extra="forbid")
    replay_ratio: float = Field(1.0, ge=0)  # earlier examples per new example, spread over earlier concepts
    replay_per_concept: int = Field(3, ge=0)  # ...but never fewer than this many from each earlier concept
    # At most this many replayed examples, whatever the number of concepts learned, spent on the concepts at risk
    # first (scalpel.replay_budget); None: no cap, and the replay grows with every concept.
    replay_budget: int | None = Field(48, ge=0)
    risk_margin: float = Field(2.0, ge=0)  # a concept whose thinnest kept margin (logits) is below this is at risk
    replay_per_risky: int = Field(5, ge=1)  # examples replayed for each concept at risk: one per fact, up to this
    # "forced": an earlier suite's questions are checked by teacher-forcing the live version's right answers
    # (scalpel.retention_check), generating only where that cannot decide; "generate": every answer generated.
    retention_check: Literal["forced", "generate"] = "forced"
    preservation_ratio: float = Field(_PRESERVE.ratio, ge=0)  # PreservationSettings.ratio
    preservation_loss: Literal["distill", "answers"] = _PRESERVE.loss  # PreservationSettings.loss
    preservation_weight: float = Field(_PRESERVE.weight, gt=0)  # PreservationSettings.weight
    num_epochs: float | None = Field(None, gt=0)  # default: the live version's config
    # Each new example this many times per epoch (a retry after under-learning adds one more). With fewer epochs,
    # new knowledge gets its passes while the replay and the preservation examples are not repeated as often:
    # the same learning for fewer trained tokens.
    new_repeats: int = Field(1, ge=1)
    # Polish: after a candidate is trained, the new concepts whose training loss is still above polish_loss get
    # polish_epochs more of their own examples (with replay and preservation in proportion), continuing from the
    # candidate, before it is evaluated: a fraction of a retry's cost for what the training loss already shows
    # under-learned. 0: off.
    polish_epochs: float = Field(0.0, ge=0)
    polish_loss: float = Field(0.1, gt=0)
    # Paraphrases (scalpel.paraphrase): up to this many rewrites of each new answer's question, written by the
    # base and kept only where the answer stays about as likely after them; the new examples' repeats are then
    # asked in those words (each new example at least twice per epoch). 0: off.
    paraphrases: int = Field(0, ge=0)
    # Repair: a candidate that fails on knowledge alone (new concepts answered wrong, or earlier answers lost; the
    # base intact) is trained repair_epochs more, from its own weights, on the new concepts it answered wrong and
    # every example of the earlier concepts it lost (with as many of the other new concepts' examples, and replay
    # and preservation in proportion), at repair_rate_scale times the update's learning rate, and evaluated
    # again: a fraction of a retry from the live version. 0: off.
    repair_epochs: float = Field(0.0, ge=0)
    repair_rounds: int = Field(2, ge=1)  # repairs of one candidate, each on what the one before still got wrong
    repair_rate_scale: float = Field(1 / 3, gt=0, le=1)
    # Default: the first version's learning rate times learning_rate_scale. An update continues an adapter
    # that already knows things; at the full rate the new concept overwrote old answers' openings.
    learning_rate: float | None = Field(None, gt=0, lt=1)
    learning_rate_scale: float = Field(1 / 3, gt=0, le=1)
    min_new_knowledge: float = Field(0.95, ge=0, le=1)
    min_retention: float = Field(0.95, ge=0, le=1)  # share of what the live version knew
    # Base regression is judged against the bare base: agreement with its own picks and perplexity on general
    # text, whatever the live version reaches.
    min_base_agreement: float = Field(0.95, ge=0, le=1)
    max_perplexity_increase: float = Field(0.10, ge=0)
    # Only when asked (`--relative-base-gate`): a live version already below those targets lowers the bar to
    # its own level, less base_tolerance. Off, an adapter that lost the base's skills cannot drift further.
    relative_base_gate: bool = False
    base_tolerance: float = Field(0.02, ge=0)  # with relative_base_gate: how much worse than the live version
    gates: bool = True  # False: promote whatever comes out (the naive baseline of bench/evenings.py)
    # A candidate that fails its gates is kept, and another is trained from the live version with more
    # weight on what failed (see Emphasis), while the estimate of its time fits in max_update_seconds.
    max_candidates: int = Field(3, ge=1)
    # A concept some update had to replay in full (a candidate forgot it) stays fragile: the next updates'
    # first candidates replay it in full too, from the live version's manifest (see first_emphasis).
    keep_full_replay: bool = True
    max_update_seconds: float = Field(600.0, gt=0)
    seed: int = 0

    def preservation(self) -> PreservationSettings:
        """The update's base preservation, as the first version's is given."""
        return PreservationSettings(
            ratio=self.preservation_ratio, loss=self.preservation_loss, weight=self.preservation_weight
        )
