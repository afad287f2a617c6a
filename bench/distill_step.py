"""What base preservation costs a training step: the distillation's teacher pass on the distilled examples alone
(as training/trainer.py runs it) against the bare base run over the whole packed row (as it ran before).

    .venv/bin/python bench/distill_step.py [--out bench/results] [--rounds 10] [--threads 2]

A step as an evening update takes it: one packed row of four examples (70-90 tokens each), the loss on the
answer half; in every other step one of the four is a preservation example, learned by KL to the bare base.
The model is shaped like the default base (bench/precision.py's SHAPE, random weights: only speed means
anything). The two arms alternate in a seeded shuffled order, round by round, so a noisy neighbour slows both
alike; the figure that counts is the ratio of the median rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.precision import SHAPE  # noqa: E402
from training.trainer import IGNORE_INDEX, AnswerLogitsTrainer, DistillMask, pack_collator  # noqa: E402

LENGTHS = (70, 90, 80, 80)


def rows(distilled: bool) -> list[dict]:
    """Four examples, their second halves learned; the third is a preservation example when `distilled`."""
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(100, SHAPE.vocab_size, (n,)).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        out.append({"input_ids": ids, "labels": labels, "distill": distilled and i == 2})
    return out


def whole_row_loss(model, inputs: dict) -> torch.Tensor:
    """The loss as it was computed before: the same terms, with the teacher pass over the whole packed row."""
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "distill")}
    targets = inputs["labels"][:, 1:]
    learned = targets != IGNORE_INDEX
    keep = learned.any(dim=0).nonzero().squeeze(-1)
    logits = model(**model_inputs, logits_to_keep=keep).logits
    targets = targets[:, keep]
    distilled = inputs["distill"][:, 1:][:, keep] & (targets != IGNORE_INDEX)
    answers = ~distilled & (targets != IGNORE_INDEX)
    total = torch.nn.functional.cross_entropy(logits.float()[answers], targets[answers], reduction="sum")
    if distilled.any():
        with torch.no_grad(), model.disable_adapter():
            base = model(**model_inputs, logits_to_keep=keep).logits[distilled].float().log_softmax(-1)
        adapted = logits[distilled].float().log_softmax(-1)
        total = total + torch.nn.functional.kl_div(adapted, base, log_target=True, reduction="sum")
    return total / learned.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4, help="training steps per arm per round (half distilled)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.05)
    model = get_peft_model(LlamaForCausalLM(SHAPE), lora).train()
    with tempfile.TemporaryDirectory() as tmp:
        training = transformers.TrainingArguments(output_dir=tmp, report_to=[], use_cpu=True)
        trainer = AnswerLogitsTrainer(model=model, args=training)
    collate = DistillMask(pack_collator())
    batches = [collate(rows(distilled=i % 2 == 0)) for i in range(args.steps)]
    arms = {
        "teacher on the distilled examples (now)": lambda inputs: trainer.compute_loss(model, inputs),
        "teacher on the whole row (before)": lambda inputs: whole_row_loss(model, inputs),
    }
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    order = random.Random(0)
    for round_ in range(args.rounds + 1):  # round 0 warms up: oneDNN picks its kernels on the first calls
        names = list(arms)
        order.shuffle(names)
        for name in names:
            started = time.perf_counter()
            for inputs in batches:
                arms[name](inputs).backward()
                model.zero_grad(set_to_none=True)
            if round_:
                seconds[name].append((time.perf_counter() - started) / len(batches))
    now, before = (statistics.median(seconds[name]) for name in arms)
    result = {
        "ms_per_step": {name: round(statistics.median(v) * 1000) for name, v in seconds.items()},
        "before_over_now": round(before / now, 3),
        "threads": args.threads,
        "rows": f"packed rows of {'+'.join(map(str, LENGTHS))} tokens, one preservation example every other step",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_step.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
