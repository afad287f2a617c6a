"""The public training config: the plan's surgical_collaborative_intelligence_config.json, validated field by field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.atomic import read_json
from core.errors import ScalpelError

# Modules a GGUF LoRA adapter can express for Llama-family bases (llama.cpp applies LoRA to these).
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(Strict):
    r: int = Field(8, ge=1, le=1024)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"], min_length=1)
    bias: Literal["none"] = "none"  # llama.cpp adapters carry no bias deltas
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    use_rslora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in LINEAR_MODULES]
        if unknown:
            raise ValueError(f"{unknown} cannot be served as a GGUF LoRA; choose from {list(LINEAR_MODULES)}")
        if len(set(value)) != len(value):
            raise ValueError("lists a module twice")
        return value


class TrainingSettings(Strict):
    num_epochs: float = Field(3, gt=0)
    batch_size: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0, lt=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)
    max_seq_length: int = Field(2048, ge=16)
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(250, ge=1)
    eval_steps: int = Field(250, ge=1)
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 42
    # Not in the plan's file; defaults keep its behaviour. "auto": bf16 on CUDA GPUs that have it, fp16 on
    # other CUDA GPUs, fp32 on Apple MPS and on the CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    balance_concepts: bool = False  # oversample smaller concepts so each is seen as often as the largest
    packing: bool = True  # padding-free packed rows for short examples (bench/training.py measures the gain)
    group_by_length: bool = True  # padded batches are formed from examples of similar length
    validation_split: float = Field(0.0, ge=0, lt=0.5)  # hold out this share of the data for eval_steps
    # Examples of these concepts are learned by distillation: on their answers the adapted model is pulled
    # toward the bare base's whole next-token distribution (KL divergence, adapter switched off), not toward
    # the answer's tokens. The evening update marks its base-preservation examples so.
    distill_concepts: list[str] = Field(default_factory=list)
    distill_weight: float = Field(1.0, gt=0)  # the KL term's weight against the answer-token loss


class TrainConfig(Strict):
    model_name: str
    lora_config: LoraSettings = Field(default_factory=LoraSettings)
    training_config: TrainingSettings = Field(default_factory=TrainingSettings)
    output_dir: str
    description: str = ""


def _where(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def parse_config(data: object, source: str = "config") -> TrainConfig:
    """Validate a config dict; the error names every bad field by its dotted path."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_where(e['loc'])}: {e['msg']}" for e in exc.errors()]
        first = exc.errors()[0]
        raise ScalpelError(
            f"invalid training config {source}: " + "; ".join(problems),
            param=_where(first["loc"]),
            code="invalid_config",
        ) from exc


def load_config(path: Path) -> TrainConfig:
    return parse_config(read_json(path, "config file"), str(path))
