"""Is bf16 worth it for training on this CPU? One LoRA training step (forward, backward, AdamW) of a model shaped
like the default base (SmolLM2-135M: 30 layers, 576 wide), in fp32 and under bf16 autocast, in the same run.

    .venv/bin/python bench/precision.py [--out bench/results] [--rounds 3] [--steps 3] [--threads 2] [--packed]

The model's weights are random (no download), so only the speed means anything. The two precisions alternate
round by round, so a noisy neighbour slows both alike; the figure that counts is the ratio of the best rounds.
A whole update measures more than this step (data collation, the distillation's teacher pass, the per-concept
loss): on the 2-core AMX machine the step is 1.27x faster in bf16, 1.14x with --packed (rows as training packs
them), and an update's training is not faster (272 s against 254 s, README "Benchmarks").
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="training steps per precision per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96, help="tokens per example")
    parser.add_argument(
        "--packed",
        action="store_true",
        help="as training feeds it: one packed row a step, 200-400 tokens long (a seeded draw), the loss on "
        "the second half only",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"])
    model = get_peft_model(LlamaForCausalLM(SHAPE), lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = torch.randint(0, SHAPE.vocab_size, (args.batch, args.tokens))
    lengths = random.Random(0).choices(range(200, 401), k=args.steps)  # --packed: every round the same draw
    drawn: Iterator[int] = iter(())

    def step(bf16: bool) -> None:
        nonlocal drawn
        if not args.packed:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=batch, labels=batch).loss
        else:
            n = next(drawn, None) or lengths[0]
            row = torch.randint(0, SHAPE.vocab_size, (1, n))
            keep = torch.arange(n // 2, n - 1)  # the answer tokens: logits only there, as AnswerLogitsTrainer
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=row, logits_to_keep=keep).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], row[0, keep + 1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for name in seconds:  # warm-up: oneDNN picks its kernels on the first call
        step(name == "bf16")
    for _ in range(args.rounds):
        for name in seconds:
            drawn = iter(lengths)
            started = time.perf_counter()
            for _ in range(args.steps):
                step(name == "bf16")
            seconds[name].append((time.perf_counter() - started) / args.steps)
    result = {
        "seconds_per_step": {k: [round(v, 4) for v in vs] for k, vs in seconds.items()},
        "bf16_speedup": round(min(seconds["fp32"]) / min(seconds["bf16"]), 3),
        "threads": args.threads,
        "batch": "packed rows of " + ", ".join(map(str, lengths)) + " tokens"
        if args.packed
        else [args.batch, args.tokens],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
