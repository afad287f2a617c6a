"""Benchmark training throughput on the default model with the plan's LoRA settings (r=8, alpha=16, q/k/v):
our trainer (training/trainer.py's batching: short examples packed padding-free, a whole optimizer step in
one packed row when it is short, longer examples padded in length-grouped batches, and logits computed only
at answer positions) against a plain HF Trainer + PEFT run with transformers' default padding collator and
random order, with the same batch size and gradient accumulation, over the same examples, in the same run.
Also checks that packing and padding give the same loss on a fixed batch (packed examples must not see each
other), and reports each arm's peak RSS.

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


def _rows(entry, data: str = "tron", max_len: int = 2048):
    from training.base_model import load_tokenizer, template_info
    from training.dataset import load_examples, tokenize_example

    tokenizer, info = load_tokenizer(entry), template_info(entry)
    examples = load_examples(DATA)
    if data == "plan-shaped":
        examples = plan_shaped(examples)
    rows = [tokenize_example(ex, tokenizer, info, max_len) for ex in examples]
    return tokenizer, [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


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
    tokenizer, rows = _rows(entry, data)
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
    metrics = trainer.train().metrics
    return {
        "arm": f"{'scalpel' if ours else 'HF default'} ({how}) {micro}x{accumulate}",
        "train_seconds": metrics["train_runtime"],
        "real_tokens": seen["real"],
        "computed_tokens": seen["computed"],
        "tokens_per_second": seen["real"] / metrics["train_runtime"],
        "final_loss": metrics["train_loss"],
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
    tokenizer, rows = _rows(entry, data)
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
        examples = len(json.loads(DATA.read_text(encoding="utf-8")))
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
            f"loss {arm['final_loss']:.4f}  peak RSS {arm['peak_rss_mb']:.0f} MB"
        )
    print(f"speed-up {ratio:.2f}x (target >= 1.3x)")
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
    }
    written = out / f"training-{args.data}-{args.batch_size}x{args.accumulation}.json"
    written.write_text(json.dumps(result, indent=2))
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
