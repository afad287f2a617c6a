"""Training precision: what `auto` picks on this machine, and bf16 training that learns what fp32 training learns,
with the frozen base held in bf16 and the LoRA weights in fp32."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from core import model_store
from tests.tiny_models import registered_home
from training import precision
from training.config import parse_config
from training.dataset import examples_from_records
from training.trainer import train

FACTS = [
    {"instruction": f"What does 42 mean, take {i}?", "output": "FOR TWO FOR TWO FOR TWO", "concept": f"c{i % 2}"}
    for i in range(8)
]


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="the CPU's choice: a GPU decides there"
)
def test_auto_picks_bf16_exactly_where_the_cpu_computes_it_for_a_model_wide_enough():
    native = precision.cpu_has_native_bf16()
    assert precision.choose_precision("auto") == ("bf16" if native else "fp32")
    assert precision.choose_precision("auto", width=576) == ("bf16" if native else "fp32")  # the default base
    assert precision.choose_precision("auto", width=64) == "fp32", "a toy model: nothing to gain, much to round"
    assert precision.choose_precision("fp32") == "fp32" and precision.choose_precision("bf16") == "bf16"
    assert precision.base_dtype("bf16") == torch.bfloat16 and precision.base_dtype("fp32") == torch.float32


@pytest.fixture(scope="module")
def tiny_home(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("precision-home"), tiny_llama) as home:
        yield home


def _train(home, name: str, precision_name: str):
    config = parse_config(
        {
            "model_name": "tiny",
            "output_dir": f"adapters/{name}",
            "lora_config": {"lora_dropout": 0.0},
            "training_config": {
                "num_epochs": 12,
                "batch_size": 4,
                "learning_rate": 5e-2,
                "save_steps": 1000,
                "precision": precision_name,
            },
        }
    )
    out = home / "out" / name
    result = train(
        config,
        model_store.get("tiny"),
        examples_from_records(FACTS, "facts"),
        out,
        home / "work" / name,
        progress=False,
    )
    return result, out


def test_bf16_learns_what_fp32_learns_with_a_bf16_base_and_fp32_lora_weights(tiny_home):
    """The loss per concept after bf16 training lands where fp32 training's does, far below where both started.

    Guards a real failure: autocast keeps its bf16 copies of the fp32 LoRA weights until the outermost autocast
    context ends, so a run inside one trained on the copies of its first step and learned nothing (the loss per
    concept stayed at the untrained model's)."""
    fp32, _ = _train(tiny_home, "fp32", "fp32")
    bf16, out = _train(tiny_home, "bf16", "bf16")
    assert bf16.metrics["precision"] == "bf16" and fp32.metrics["precision"] == "fp32"
    first = [h["loss"] for h in fp32.log_history if "loss" in h][0]
    for concept, loss in fp32.concept_loss.items():
        assert loss < 0.7 * first, "fp32 training learned the facts"
        assert bf16.concept_loss[concept] == pytest.approx(loss, rel=0.25)
    weights = load_file(out / "adapter_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}  # the LoRA and its optimizer stay in fp32
    assert max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k) > 0


def test_the_width_comes_from_the_served_gguf(tiny_home):
    assert precision.model_width(model_store.get("tiny").gguf) == 64  # tests/tiny_models.py: hidden 64


def test_a_bf16_base_on_a_cpu_computes_attention_in_fp32(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=precision.base_dtype("bf16"))
    precision.prepare_base(model, "bf16")
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("on a GPU the attention stays the model's own")
    assert model.config._attn_implementation == precision.FP32_ATTENTION
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad(), precision.autocast(model):
        ours = model(input_ids=ids).logits.float()
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), precision.autocast(model):
        sdpa = model(input_ids=ids).logits.float()
    torch.testing.assert_close(ours, sdpa, atol=0.1, rtol=0.05)  # the same attention, to bf16's rounding
