"""LoRA dropout with cheaper masks: the distribution of nn.Dropout, swapped into PEFT's LoRA modules on a CPU."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from training.dropout import QuarterDrawDropout, use_on_cpu


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_it_drops_a_share_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(64, 70, 576)
    out = QuarterDrawDropout(p).train()(x)
    dropped = float((out == 0).float().mean())
    assert dropped == pytest.approx(p, abs=0.003)  # 2.6M elements: the standard error is below 3e-4
    assert float(out.mean()) == pytest.approx(1.0, abs=0.01)  # the kept ones scaled by 1 / (1 - p)
    values = out.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p))


def test_masks_differ_between_calls_follow_the_seed_and_vanish_in_eval():
    layer = QuarterDrawDropout(0.05).train()
    x = torch.randn(8, 576, dtype=torch.bfloat16)
    torch.manual_seed(1)
    first, second = layer(x), layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), first) and not torch.equal(first, second)
    assert layer(x).dtype == torch.bfloat16
    assert layer.eval()(x) is x


def test_peft_lora_modules_get_it_on_a_cpu(tiny_llama):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"]),
    )
    layers = model.base_model.model.config.num_hidden_layers
    assert use_on_cpu(model, torch.device("cuda")) == 0, "on a GPU, PEFT's own dropout is kept"
    assert use_on_cpu(model, torch.device("cpu")) == 3 * layers
    kinds = {type(m).__name__ for m in model.modules() if "Dropout" in type(m).__name__}
    assert kinds == {"QuarterDrawDropout"}
    model.train()
    ids = torch.randint(3, 300, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()  # trains through it
    without = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"]),
    )
    assert use_on_cpu(without, torch.device("cpu")) == 0, "no dropout asked for: nothing to swap"
