"""The plan's config file is accepted unchanged, every field reaches the Trainer, and bad fields are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import ScalpelError
from training.config import load_config, parse_config
from training.trainer import lora_config, training_arguments

PLAN_CONFIG = (
    Path(__file__).resolve().parents[3] / "shared" / "seed" / "surgical_collaborative_intelligence_config.json"
)


@pytest.fixture()
def plan_config_path() -> Path:
    """The plan's own file where shared/ sits beside the clone (CI), else the byte-identical copy in examples/."""
    if PLAN_CONFIG.is_file():
        return PLAN_CONFIG
    return Path(__file__).resolve().parents[2] / "examples" / "plan_config.json"


def test_plan_config_is_accepted_unchanged_and_every_field_is_honoured(plan_config_path, tmp_path):
    raw = json.loads(plan_config_path.read_text())
    config = load_config(plan_config_path)
    assert config.model_name == "codellama-7b-instruct"
    assert config.output_dir == "./adapters/tron_collaborative_intelligence_v1"

    lora = lora_config(config)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias) == (8, 16, 0.05, "none")
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj"}
    assert str(lora.task_type.value if hasattr(lora.task_type, "value") else lora.task_type) == "CAUSAL_LM"

    args = training_arguments(config, tmp_path, has_eval=True)
    tc = raw["training_config"]
    assert args.num_train_epochs == tc["num_epochs"]
    assert args.per_device_train_batch_size == tc["batch_size"]
    assert args.learning_rate == tc["learning_rate"]
    assert args.gradient_accumulation_steps == tc["gradient_accumulation_steps"]
    assert args.warmup_steps == tc["warmup_steps"]
    assert args.logging_steps == tc["logging_steps"]
    assert args.save_steps == tc["save_steps"]
    assert args.eval_steps == tc["eval_steps"]
    assert str(args.lr_scheduler_type.value) == tc["lr_scheduler_type"]
    assert args.weight_decay == tc["weight_decay"]
    assert config.training_config.max_seq_length == tc["max_seq_length"]


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"lora_config": {"r": 0}}, "lora_config.r"),
        ({"lora_config": {"target_modules": ["embed_tokens"]}}, "lora_config.target_modules"),
        ({"training_config": {"lr_scheduler_type": "triangle"}}, "training_config.lr_scheduler_type"),
        ({"training_config": {"learning_rate": -1}}, "training_config.learning_rate"),
        ({"training_config": {"epochs": 3}}, "training_config.epochs"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_invalid_fields_are_named(patch, field):
    data = {"model_name": "m", "output_dir": "adapters/x"}
    for key, value in patch.items():
        data[key] = value
    with pytest.raises(ScalpelError) as err:
        parse_config(data)
    assert err.value.param == field
    assert field in err.value.message


def test_malformed_json_names_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{\n  "model_name": "m",\n  "output_dir": \n}\n')
    with pytest.raises(ScalpelError) as err:
        load_config(bad)
    assert f"{bad}:4" in err.value.message


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the CPU path: on a GPU both precisions train there"
)
def test_bf16_trains_on_the_cpu_and_fp16_is_refused_by_name(plan_config_path, tmp_path):
    raw = json.loads(plan_config_path.read_text())
    bf16 = parse_config({**raw, "training_config": {**raw["training_config"], "precision": "bf16"}})
    args = training_arguments(bf16, tmp_path, has_eval=False)  # the Trainer refuses bf16 on a CPU unless use_cpu
    assert args.bf16 and args.use_cpu
    fp16 = parse_config({**raw, "training_config": {**raw["training_config"], "precision": "fp16"}})
    with pytest.raises(ScalpelError) as err:
        training_arguments(fp16, tmp_path, has_eval=False)
    assert err.value.param == "training_config.precision" and "needs a GPU" in str(err.value)
