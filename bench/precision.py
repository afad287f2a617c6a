"""Is bf16 worth it for training on this CPU? One LoRA training step (forward, backward, AdamW) of a model shaped
like the default base (SmolLM2-135M: 30 layers, 576 wide), in three set-ups, in the same run:

  fp32      the base and the LoRA in fp32
  autocast  fp32 weights under bf16 autocast (what `precision: bf16` did before training.precision): every
            weight is cast to bf16 again at every step, and PEFT casts each LoRA input to fp32 and back
  bf16      as training runs now (training.precision): the frozen base held in bf16, the LoRA weights and AdamW
            in fp32, bf16 autocast without PEFT's input casts, and attention in fp32 on a CPU

    .venv/bin/python bench/precision.py [--out bench/results] [--rounds 3] [--steps 4] [--threads 2]

The model's weights are random (no download), so only the speed means anything. The batches are shaped as an
update's are: four examples a step, padded to the longest, 50 to 90 tokens with a few of 260 (the 150-word
explanations), the loss on the answer half only, and LoRA dropout 0.05 as in the plan's config. The set-ups
alternate round by round, so a noisy neighbour slows all alike; the figures that count are the ratios of the best
rounds. On the 2-core AMX machine: bf16 1.7-2.0x fp32, autocast 1.2-1.3x (README "Benchmarks").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = LlamaConfig(  # SmolLM2-135M-Instruct's shape
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)
SETUPS = ("fp32", "autocast", "bf16")


def build(setup: str, state: dict, stack: contextlib.ExitStack):
    """The PEFT model for a set-up, from the same random weights, with its optimizer and its per-step context."""
    from training import precision

    base = LlamaForCausalLM(SHAPE)
    base.load_state_dict(state)
    if setup == "bf16":
        base = base.to(precision.base_dtype("bf16"))
        precision.prepare_base(base, "bf16")
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"])
    model = get_peft_model(base, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if setup == "bf16":  # as train() runs it: no input casts for the whole run, autocast around each step
        stack.enter_context(precision.without_input_casts(model, "bf16"))
        return model, optimizer, lambda: precision.autocast(model)
    if setup == "autocast":
        return model, optimizer, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return model, optimizer, contextlib.nullcontext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="training steps per set-up per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    state = LlamaForCausalLM(SHAPE).state_dict()
    rng = random.Random(0)
    lengths = [260 if i % 4 == 3 else rng.randint(50, 90) for i in range(args.steps)]  # every round the same
    batches = [torch.randint(0, SHAPE.vocab_size, (4, n)) for n in lengths]
    stack = contextlib.ExitStack()
    arms = {setup: build(setup, state, stack) for setup in SETUPS}

    def step(setup: str, batch: torch.Tensor) -> None:
        model, optimizer, context = arms[setup]
        n = batch.shape[1]
        keep = torch.arange(n // 2, n - 1)  # the answer tokens: logits only there, as AnswerLogitsTrainer
        with context():
            logits = model(input_ids=batch, logits_to_keep=keep).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, keep + 1].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for setup in SETUPS:  # warm-up: oneDNN picks its kernels on the first calls
        step(setup, batches[0])
    seconds: dict[str, list[float]] = {setup: [] for setup in SETUPS}
    for _ in range(args.rounds):
        for setup in SETUPS:
            started = time.perf_counter()
            for batch in batches:
                step(setup, batch)
            seconds[setup].append((time.perf_counter() - started) / args.steps)
    best = {setup: min(values) for setup, values in seconds.items()}
    result = {
        "seconds_per_step": {k: [round(v, 4) for v in vs] for k, vs in seconds.items()},
        "speedup_over_fp32": {k: round(best["fp32"] / v, 3) for k, v in best.items()},
        "threads": args.threads,
        "batches": [[4, n] for n in lengths],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
