"""Benchmark training throughput on the default model with the plan's LoRA settings (r=8, alpha=16, q/k/v):
our trainer (padding-free packed batches, a whole optimizer step in one packed row when it fits, and
logits computed only at answer positions) against a
plain HF Trainer + PEFT run with transformers' default padding collator and the plan's batch_size=1 with
gradient_accumulation_steps=4, on the same examples in the same order, in the same run. Also checks that both give the same
loss on a fixed batch (packing must not let examples see each other), and reports each arm's peak RSS.

    .venv/bin/python bench/training.py [--steps 16] [--batch-size 1] [--accumulation 4] [--out bench/results]
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


def _rows(entry, max_len: int = 2048):
    from training.base_model import load_tokenizer, template_info
    from training.dataset import load_examples, tokenize_example
    tokenizer, info = load_tokenizer(entry), template_info(entry)
    rows = [tokenize_example(ex, tokenizer, info, max_len) for ex in load_examples(DATA)]
    return tokenizer, [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


def _arm(packed: bool, steps: int, batch_size: int, accumulation: int, home: str) -> dict:
    """One arm in its own process, so that its peak RSS is its own."""
    os.environ["SCALPEL_HOME"] = home
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from scalpel import model_store
    from training.base_model import load_model
    from training.config import TrainingSettings
    from training.trainer import (
        AnswerLogitsTrainer,
        TokenizedDataset,
        micro_batching,
        pack_collator,
    )

    torch.manual_seed(0)
    entry = model_store.ensure_default()
    tokenizer, rows = _rows(entry)
    model = load_model(entry)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj"]))
    # The baseline is what a plain HF + PEFT script does: pad every batch to its longest example, and take
    # gradient accumulation as configured. Ours is what training/trainer.py does with the same settings.
    collator = pack_collator() if packed else transformers.DataCollatorForSeq2Seq(tokenizer, padding=True)
    micro, accumulate = batch_size, accumulation
    if packed:
        micro, accumulate = micro_batching(TrainingSettings(batch_size=batch_size, gradient_accumulation_steps=accumulation),
                                           max(len(r["input_ids"]) for r in rows))
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulate,
        learning_rate=1e-4, logging_steps=steps, save_strategy="no", report_to=[], disable_tqdm=True,
        remove_unused_columns=False, seed=42, data_seed=42, dataloader_num_workers=0)
    trainer_class = AnswerLogitsTrainer if packed else transformers.Trainer
    trainer = trainer_class(model=model, args=args, train_dataset=TokenizedDataset(rows), data_collator=collator)
    seen = {"real": 0, "computed": 0}
    original = trainer.training_step

    def counting_step(model, inputs, *rest, **kwargs):
        labels_mask = inputs.get("attention_mask")
        seen["computed"] += inputs["input_ids"].numel()
        seen["real"] += int(labels_mask.sum()) if labels_mask is not None else inputs["input_ids"].numel()
        return original(model, inputs, *rest, **kwargs)

    trainer.training_step = counting_step
    metrics = trainer.train().metrics
    return {"arm": f"{'scalpel (packed)' if packed else 'HF default (padded)'} {micro}x{accumulate}",
            "train_seconds": metrics["train_runtime"], "real_tokens": seen["real"],
            "computed_tokens": seen["computed"], "tokens_per_second": seen["real"] / metrics["train_runtime"],
            "final_loss": metrics["train_loss"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _fixed_batch_losses(batch_size: int, home: str) -> dict:
    os.environ["SCALPEL_HOME"] = home
    import torch
    import transformers

    from scalpel import model_store
    from training.base_model import load_model
    from training.trainer import pack_collator

    entry = model_store.ensure_default()
    tokenizer, rows = _rows(entry)
    model = load_model(entry).eval()
    model.config.use_cache = False
    batch = rows[:batch_size]
    padded = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True)(batch)
    packed = pack_collator()(batch)
    with torch.no_grad():
        a = float(model(**padded).loss)
        b = float(model(input_ids=packed["input_ids"], labels=packed["labels"],
                        position_ids=packed["position_ids"]).loss)
    return {"padded_loss": a, "packed_loss": b, "abs_diff": abs(a - b)}


def _in_child(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1, help="the plan's batch_size")
    parser.add_argument("--accumulation", type=int, default=4, help="the plan's gradient_accumulation_steps")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    home = os.environ.get("SCALPEL_HOME", str(ROOT))
    losses = _in_child(_fixed_batch_losses, args.batch_size * args.accumulation, home)
    print(f"fixed batch of {args.batch_size * args.accumulation}: padded loss {losses['padded_loss']:.6f}, packed loss "
          f"{losses['packed_loss']:.6f} (|diff| {losses['abs_diff']:.2e})")
    baseline = _in_child(_arm, False, args.steps, args.batch_size, args.accumulation, home)
    ours = _in_child(_arm, True, args.steps, args.batch_size, args.accumulation, home)
    assert baseline["real_tokens"] == ours["real_tokens"], "both arms must see the same examples"
    ratio = ours["tokens_per_second"] / baseline["tokens_per_second"]
    for arm in (baseline, ours):
        print(f"{arm['arm']:<30} {arm['tokens_per_second']:7.1f} tok/s  {arm['train_seconds']:6.1f} s  "
              f"computed {arm['computed_tokens']} tokens for {arm['real_tokens']} real  "
              f"loss {arm['final_loss']:.4f}  peak RSS {arm['peak_rss_mb']:.0f} MB")
    print(f"speed-up {ratio:.2f}x (target >= 1.3x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"steps": args.steps, "batch_size": args.batch_size, "accumulation": args.accumulation,
              "fixed_batch": losses, "baseline": baseline,
              "packed": ours, "speedup": ratio}
    (out / "training.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'training.json'}")


if __name__ == "__main__":
    main()
