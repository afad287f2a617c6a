"""Benchmark training throughput on the default model with the plan's LoRA settings (r=8, alpha=16, q/k/v):
our trainer (training/trainer.py's batching: short examples packed padding-free, a whole optimizer step in
one packed row when it is short, longer examples padded in length-grouped batches, and logits computed only
at answer positions) against a plain HF Trainer + PEFT run with transformers' default padding collator and
random order, with the same batch size and gradient accumulation, over the same examples, in the same run.
Also checks that packing and padding give the same loss on a fixed batch (packed examples must not see each
other), and reports each arm's peak RSS.

Speed counts only at equal quality, and the two arms' train_loss figures weight their steps differently (a
packed step and a padded one average over different token counts), so they do not say which arm learned more.
One example of each concept is held out of training (seeded; the same for both arms and both --data), and each
arm's adapter is scored on them: the token-weighted mean loss over their answer tokens, in eval mode, one example
at a time, before training, after every quarter of the epoch's tokens (at the first optimizer step past it, with
the tokens actually seen) and at the end. That scoring is not counted in the arms' training time.

    .venv/bin/python bench/training.py [--steps N] [--batch-size 1] [--accumulation 4] [--data tron|plan-shaped]

--data tron is the repository's example knowledge file: 30-word answers, 66-94 tokens per example, so there
is little padding to remove. --data plan-shaped gives the same examples the answer lengths the plan's quality
metric asks for (150+ words on average): each answer is 1 to 10 answers of its concept joined, so the
lengths spread as real knowledge files do (about 60 to 600 tokens), which is what padding wastes compute on.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "examples" / "tron_collaborative_intelligence_training.json"


def plan_shaped(examples: list) -> list:
    """The examples with answers of 1 to 10 joined answers of the same concept (a fixed, spread-out pattern)."""
    from training.dataset import Example

    by_concept: dict[str, list] = {}
    for ex in examples:
        by_concept.setdefault(ex.concept, []).append(ex)
    shaped = []
    for i, ex in enumerate(examples):
        group = by_concept[ex.concept]
        start, parts = group.index(ex), 1 + (i * 7) % 10
        answer = " ".join(group[(start + j) % len(group)].messages[-1]["content"] for j in range(parts))
        shaped.append(
            Example(
                messages=ex.messages[:-1] + [{"role": "assistant", "content": answer}],
                concept=ex.concept,
                where=ex.where,
            )
        )
    return shaped


def split_heldout(examples: list, seed: int = 0) -> tuple[list, list]:
    """(training, held out): one example of each concept held out, chosen with a seeded generator."""
    import random

    rng = random.Random(seed)
    by_concept: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_concept.setdefault(ex.concept, []).append(i)
    held = {rng.choice(indexes) for _, indexes in sorted(by_concept.items())}
    return [ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held]


def _rows(entry, data: str = "tron", max_len: int = 2048):
    """The tokenizer, the training rows and the held-out rows (never plan-shaped: the held-out answers are the
    data's own, so that no training answer is joined into them)."""
    from training.base_model import load_tokenizer, template_info
    from training.dataset import load_examples, tokenize_example

    tokenizer, info = load_tokenizer(entry), template_info(entry)
    examples, heldout = split_heldout(load_examples(DATA))
    if data == "plan-shaped":
        examples = plan_shaped(examples)

    def tokenized(chosen):
        rows = [tokenize_example(ex, tokenizer, info, max_len) for ex in chosen]
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]

    return tokenizer, tokenized(examples), tokenized(heldout)


def heldout_loss(model, rows: list[dict]) -> float:
    """The token-weighted mean cross-entropy over the answer tokens of `rows`, in eval mode (no dropout), one
    example at a time, so that no padding or packing enters it."""
    import torch

    from training.dataset import IGNORE_INDEX

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].float()
            targets = torch.tensor(row["labels"][1:])
            total += float(
                torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            )
            count += int((targets != IGNORE_INDEX).sum())
    if was_training:
        model.train()
    return total / count


def _arm(ours: bool, steps: int, batch_size: int, accumulation: int, data: str, home: str) -> dict:
    """One arm in its own process, so that its peak RSS is its own."""
    os.environ["SCALPEL_HOME"] = home
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from core import model_store
    from training.base_model import load_model
    from training.config import TrainingSettings
    from training.trainer import (
        AnswerLogitsTrainer,
        TokenizedDataset,
        micro_batching,
        pack_collator,
        pad_collator,
    )

    torch.manual_seed(0)
    entry = model_store.ensure_default()
    tokenizer, rows, heldout = _rows(entry, data)
    model = load_model(entry)
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj"]
        ),
    )
    # The baseline is what a plain HF + PEFT script does: pad every batch to its longest example, and take
    # gradient accumulation as configured. Ours is what training/trainer.py does with the same settings.
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True)
    micro, accumulate, how, grouped = batch_size, accumulation, "padded", False
    if ours:
        batching = micro_batching(
            TrainingSettings(batch_size=batch_size, gradient_accumulation_steps=accumulation),
            max(len(r["input_ids"]) for r in rows),
        )
        micro, accumulate = batching.micro, batching.accumulate
        collator = pack_collator() if batching.packed else pad_collator(tokenizer)
        grouped = not batching.packed and micro > 1
        how = "packed" if batching.packed else "grouped by length" if grouped else "one per pass"
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulate,
        learning_rate=1e-4,
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=42,
        data_seed=42,
        dataloader_num_workers=0,
    )
    trainer_class = AnswerLogitsTrainer if ours else transformers.Trainer
    trainer = trainer_class(model=model, args=args, train_dataset=TokenizedDataset(rows), data_collator=collator)
    trainer.group_by_length = grouped
    seen = {"real": 0, "computed": 0}
    original = trainer.training_step

    def counting_step(model, inputs, *rest, **kwargs):
        labels_mask = inputs.get("attention_mask")
        seen["computed"] += inputs["input_ids"].numel()
        seen["real"] += int(labels_mask.sum()) if labels_mask is not None else inputs["input_ids"].numel()
        return original(model, inputs, *rest, **kwargs)

    trainer.training_step = counting_step
    # Held-out checkpoints at each quarter of the tokens this run will see (one epoch's worth per epoch of steps).
    epoch_tokens = sum(len(r["input_ids"]) for r in rows)
    steps_per_epoch = -(-len(rows) // (batch_size * accumulation))
    planned = epoch_tokens * steps / steps_per_epoch
    checkpoints = [{"fraction": 0.0, "step": 0, "tokens": 0, "loss": heldout_loss(model, heldout)}]
    scoring = {"seconds": 0.0}

    class HeldOut(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            fraction = min(int(4 * seen["real"] / planned), 3) / 4  # the last quarter this step passed
            if fraction > checkpoints[-1]["fraction"]:
                began = time.perf_counter()
                loss = heldout_loss(model, heldout)
                scoring["seconds"] += time.perf_counter() - began
                checkpoints.append(
                    {"fraction": fraction, "step": state.global_step, "tokens": seen["real"], "loss": loss}
                )

    trainer.add_callback(HeldOut())
    metrics = trainer.train().metrics
    # A quarter first passed at the last step is the final checkpoint itself; with --steps shorter or longer than
    # an epoch, a quarter of the estimated total may never be passed: those are left out.
    checkpoints[:] = [c for c in checkpoints if c["step"] < steps]
    checkpoints.append({"fraction": 1.0, "step": steps, "tokens": seen["real"], "loss": heldout_loss(model, heldout)})
    train_seconds = metrics["train_runtime"] - scoring["seconds"]
    return {
        "arm": f"{'scalpel' if ours else 'HF default'} ({how}) {micro}x{accumulate}",
        "train_seconds": train_seconds,
        "real_tokens": seen["real"],
        "computed_tokens": seen["computed"],
        "tokens_per_second": seen["real"] / train_seconds,
        "final_loss": metrics["train_loss"],
        "heldout_loss": checkpoints[-1]["loss"],
        "heldout": {
            "examples": len(heldout),
            "answer_tokens": sum(sum(t != -100 for t in r["labels"][1:]) for r in heldout),
            "checkpoints": checkpoints,
            "scoring_seconds": scoring["seconds"],
        },
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _fixed_batch_losses(batch_size: int, data: str, home: str) -> dict:
    os.environ["SCALPEL_HOME"] = home
    import torch
    import transformers

    from core import model_store
    from training.base_model import load_model
    from training.trainer import pack_collator

    entry = model_store.ensure_default()
    tokenizer, rows, _ = _rows(entry, data)
    model = load_model(entry).eval()
    model.config.use_cache = False
    batch = rows[:batch_size]
    padded = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True)(batch)
    packed = pack_collator()(batch)
    with torch.no_grad():
        a = float(model(**padded).loss)
        b = float(
            model(input_ids=packed["input_ids"], labels=packed["labels"], position_ids=packed["position_ids"]).loss
        )
    return {"padded_loss": a, "packed_loss": b, "abs_diff": abs(a - b)}


def _in_child(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        help="optimizer steps (default: one epoch, so both arms see "
        "every example once whatever order they take them in)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="the plan's batch_size")
    parser.add_argument("--accumulation", type=int, default=4, help="the plan's gradient_accumulation_steps")
    parser.add_argument("--data", choices=["tron", "plan-shaped"], default="tron")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    home = os.environ.get("SCALPEL_HOME", str(ROOT))
    if args.steps is None:
        from training.dataset import load_examples

        examples = len(split_heldout(load_examples(DATA))[0])
        args.steps = -(-examples // (args.batch_size * args.accumulation))
    losses = _in_child(_fixed_batch_losses, args.batch_size * args.accumulation, args.data, home)
    print(
        f"fixed batch of {args.batch_size * args.accumulation}: padded loss {losses['padded_loss']:.6f}, packed loss "
        f"{losses['packed_loss']:.6f} (|diff| {losses['abs_diff']:.2e})"
    )
    baseline = _in_child(_arm, False, args.steps, args.batch_size, args.accumulation, args.data, home)
    ours = _in_child(_arm, True, args.steps, args.batch_size, args.accumulation, args.data, home)
    assert baseline["real_tokens"] == ours["real_tokens"], "both arms must see the same examples"
    ratio = ours["tokens_per_second"] / baseline["tokens_per_second"]
    for arm in (baseline, ours):
        print(
            f"{arm['arm']:<30} {arm['tokens_per_second']:7.1f} tok/s  {arm['train_seconds']:6.1f} s  "
            f"computed {arm['computed_tokens']} tokens for {arm['real_tokens']} real  "
            f"train loss {arm['final_loss']:.4f}  held-out loss {arm['heldout_loss']:.4f}  "
            f"peak RSS {arm['peak_rss_mb']:.0f} MB"
        )
    print(
        f"held-out loss ({ours['heldout']['examples']} examples, {ours['heldout']['answer_tokens']} answer tokens) "
        "at each quarter of the tokens: tokens seen HF / ours, loss HF / ours"
    )
    theirs = {c["fraction"]: c for c in baseline["heldout"]["checkpoints"]}
    for b in ours["heldout"]["checkpoints"]:
        if (a := theirs.get(b["fraction"])) is None:
            continue
        print(
            f"  {a['fraction']:4.0%}  {a['tokens']:7d} / {b['tokens']:7d} tokens  "
            f"{a['loss']:.4f} / {b['loss']:.4f}  ({b['loss'] - a['loss']:+.4f})"
        )
    difference = ours["heldout_loss"] - baseline["heldout_loss"]
    print(
        f"speed-up {ratio:.2f}x (target >= 1.3x) with held-out loss {ours['heldout_loss']:.4f} against "
        f"{baseline['heldout_loss']:.4f} after the same {ours['real_tokens']} tokens ({difference:+.4f})"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "data": args.data,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "accumulation": args.accumulation,
        "fixed_batch": losses,
        "baseline": baseline,
        "ours": ours,
        "speedup": ratio,
        "heldout_loss_difference": difference,  # ours minus HF's, on the final adapters: negative is better
    }
    written = out / f"training-{args.data}-{args.batch_size}x{args.accumulation}.json"
    written.write_text(json.dumps(result, indent=2))
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
