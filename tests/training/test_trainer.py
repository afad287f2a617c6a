"""Trainer helpers: balanced sampling across concepts, packed batches, the validation split."""

from __future__ import annotations

from training.trainer import balance_by_concept


def test_balanced_sampling_evens_out_concepts():
    rows = [{"concept": "big", "i": i} for i in range(7)] + [{"concept": "small", "i": i} for i in range(3)]
    balanced = balance_by_concept(rows, seed=0)
    counts = {c: sum(r["concept"] == c for r in balanced) for c in ("big", "small")}
    assert counts == {"big": 7, "small": 7}
    small = [r["i"] for r in balanced if r["concept"] == "small"]
    assert all(small.count(i) >= 2 for i in range(3))  # whole copies before the sampled remainder
    assert balance_by_concept(rows, seed=0) == balanced


def test_packed_batches_give_the_padded_loss_and_never_mix_examples(tiny_llama):
    """Packing lays examples end to end; the block-diagonal mask must keep them apart, so the loss on a fixed
    batch equals the padded batch's, and changing one example leaves another's logits untouched."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.trainer import IGNORE_INDEX, PadCollator, pack_collator

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    model.config.use_cache = False  # as train() sets it: with a cache, transformers ignores packed positions
    rows = []
    for n in (9, 23, 5, 17):
        ids = torch.randint(3, 300, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    padded, packed = PadCollator(0)(rows), pack_collator()(rows)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    with torch.no_grad():
        padded_loss = model(**padded).loss
        packed_loss = model(**{k: v for k, v in packed.items() if k in ("input_ids", "labels", "position_ids")}).loss
        torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)

        changed = [dict(rows[0], input_ids=[7] * 9)] + rows[1:]
        again = pack_collator()(changed)
        first = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0, 9:]
        second = model(input_ids=again["input_ids"], position_ids=again["position_ids"]).logits[0, 9:]
        torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)


def test_validation_split_holds_out_a_seeded_share():
    from training.dataset import Example, split_validation
    examples = [Example([{"role": "user", "content": str(i)}], "c", f"f[{i}]") for i in range(20)]
    train, held = split_validation(examples, 0.2, seed=1)
    assert len(held) == 4 and len(train) == 16
    assert {e.where for e in train}.isdisjoint({e.where for e in held})
    assert split_validation(examples, 0.2, seed=1)[1] == held
    assert len(split_validation(examples[:2], 0.01, seed=1)[1]) == 1


def test_answer_only_logits_give_the_models_own_loss(tiny_llama, tmp_path):
    """AnswerLogitsTrainer projects only answer positions onto the vocabulary; the loss must not change."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from training.trainer import IGNORE_INDEX, AnswerLogitsTrainer, PadCollator

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.config.use_cache = False
    rows = []
    for n, prompt in ((12, 8), (20, 5), (7, 6)):
        ids = torch.randint(3, 300, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    batch = PadCollator(0)(rows)
    trainer = AnswerLogitsTrainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True))
    with torch.no_grad():
        expected = model(**batch).loss
        ours, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert outputs.logits.shape[1] < batch["input_ids"].shape[1], "prompt positions were not projected"
