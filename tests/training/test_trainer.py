"""Trainer helpers: balanced sampling across concepts, packed batches, the validation split."""

from __future__ import annotations

import pytest

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.trainer import IGNORE_INDEX, pack_collator, pad_collator

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    model.config.use_cache = False  # as train() sets it: with a cache, transformers ignores packed positions
    rows = []
    for n in (9, 23, 5, 17):
        ids = torch.randint(3, 300, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    padded, packed = pad_collator(AutoTokenizer.from_pretrained(tiny_llama))(rows), pack_collator()(rows)
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.trainer import IGNORE_INDEX, AnswerLogitsTrainer, pad_collator

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.config.use_cache = False
    rows = []
    for n, prompt in ((12, 8), (20, 5), (7, 6)):
        ids = torch.randint(3, 300, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    batch = pad_collator(AutoTokenizer.from_pretrained(tiny_llama))(rows)
    trainer = AnswerLogitsTrainer(
        model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    )
    with torch.no_grad():
        expected = model(**batch).loss
        ours, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert outputs.logits.shape[1] < batch["input_ids"].shape[1], "prompt positions were not projected"


def test_batching_packs_short_examples_and_groups_long_ones():
    from training.config import TrainingSettings
    from training.trainer import PACKED_ROW_TOKENS, micro_batching

    plan = TrainingSettings(batch_size=1, gradient_accumulation_steps=4)
    short = micro_batching(plan, longest=90)
    assert (short.micro, short.accumulate, short.packed) == (4, 1, True)  # the whole step in one short row
    long = micro_batching(plan, longest=PACKED_ROW_TOKENS // 2)
    assert (long.micro, long.accumulate) == (1, 4)  # four long examples would make a slow row
    batch4 = micro_batching(TrainingSettings(batch_size=4), longest=400)
    assert (batch4.micro, batch4.packed) == (4, False)  # padded, in length-grouped batches
    off = micro_batching(plan.model_copy(update={"packing": False}), longest=90)
    assert (off.micro, off.accumulate, off.packed) == (1, 4, False)


def test_length_groups_are_similar_in_length_and_repeat_per_epoch():
    from training.trainer import SeededLengthGroups

    lengths = [((i * 37) % 100) + 10 for i in range(96)]
    sampler = SeededLengthGroups(4, lengths, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(96))
    spread = [
        max(lengths[i] for i in first[k : k + 4]) - min(lengths[i] for i in first[k : k + 4]) for k in range(0, 96, 4)
    ]
    assert sum(spread) / len(spread) < 15  # random batches of 4 spread ~50 tokens here
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    again = SeededLengthGroups(4, lengths, seed=3)  # a resumed run builds a new sampler
    again.set_epoch(1)
    assert list(again) == second


def test_distilled_examples_pull_toward_the_base_distribution(tiny_llama, tmp_path):
    """Distilled tokens are scored by KL to the bare base (adapter off), not by their labels: a fresh adapter
    (which leaves the base unchanged) scores zero on them whatever the labels say, while ordinary tokens keep
    their cross-entropy; and once the adapter differs, the distilled term is positive."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.trainer import IGNORE_INDEX, AnswerLogitsTrainer, DistillMask, pack_collator

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base.config.use_cache = False
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ).eval()
    rows = []
    for n, distill in ((12, False), (15, True), (9, True)):
        ids = torch.randint(3, 300, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 4 + ids[4:], "distill": distill})
    batch = DistillMask(pack_collator())(rows)
    assert batch["distill"].shape == batch["input_ids"].shape
    assert batch["distill"][0].tolist() == [False] * 12 + [True] * 24
    trainer = AnswerLogitsTrainer(
        model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    )
    with torch.no_grad():
        ordinary = DistillMask(pack_collator())(rows[:1])
        ce_sum = trainer.compute_loss(model, ordinary) * 8  # the first example's 8 learned tokens
        mixed = trainer.compute_loss(model, batch) * (8 + 11 + 5)
        torch.testing.assert_close(mixed, ce_sum, atol=1e-4, rtol=1e-4)  # the distilled part adds exactly 0
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
        distilled_only = DistillMask(pack_collator())(rows[1:])
        assert float(trainer.compute_loss(model, distilled_only)) > 1e-3


def test_loss_per_concept_in_batches_equals_one_example_at_a_time(tiny_llama):
    """The per-concept pass batches rows of similar length; padding must change no concept's loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.trainer import IGNORE_INDEX, concept_losses, pad_collator

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    rows = []
    for i, (n, prompt) in enumerate(((12, 8), (20, 5), (7, 6), (30, 10), (9, 2))):
        ids = torch.randint(3, 300, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "concept": f"c{i % 2}"})
    collate = pad_collator(AutoTokenizer.from_pretrained(tiny_llama))
    batched = concept_losses(model, rows, collate, batch_size=4)
    alone = concept_losses(model, rows, collate, batch_size=1)
    assert batched.keys() == alone.keys() == {"c0", "c1"}
    for concept in batched:
        assert abs(batched[concept] - alone[concept]) < 1e-4
    repeated = concept_losses(model, rows + [dict(r) for r in rows[:3]], collate, batch_size=4)  # a row twice
    assert repeated == pytest.approx(batched, abs=1e-6), "repeated rows are scored once"


@pytest.mark.parametrize("packed", [True, False])
def test_the_base_runs_on_the_distilled_examples_alone_with_the_same_kl(tiny_llama, tmp_path, packed):
    """The KL term computed from the base's predictions on the distilled examples alone equals the one from the
    base run on the whole batch, packed or padded."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.trainer import IGNORE_INDEX, AnswerLogitsTrainer, DistillMask, pack_collator, pad_collator

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.eval()
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0, 0.5)
    rows = []
    for n, distill in ((12, False), (15, True), (7, False), (9, True)):
        ids = torch.randint(3, 300, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:], "distill": distill})

    collate = pack_collator() if packed else pad_collator(AutoTokenizer.from_pretrained(tiny_llama))
    inputs = DistillMask(collate)(rows)
    trainer = AnswerLogitsTrainer(
        model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    )
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "distill")}
    targets = inputs["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    learned = targets[:, keep] != IGNORE_INDEX
    distilled = inputs["distill"][:, 1:][:, keep] & learned
    with torch.no_grad():
        logits = model(**model_inputs, logits_to_keep=keep).logits
        with model.disable_adapter():
            whole = model(**model_inputs, logits_to_keep=keep).logits  # the base on the whole batch
        kl = torch.nn.functional.kl_div(
            logits[distilled].log_softmax(-1), whole[distilled].log_softmax(-1), log_target=True, reduction="sum"
        )
        answers = learned & ~distilled
        ce = torch.nn.functional.cross_entropy(logits[answers], targets[:, keep][answers], reduction="sum")
        got = trainer.compute_loss(model, inputs) * learned.sum()
    assert float(kl) > 1e-3
    torch.testing.assert_close(got, ce + kl, atol=1e-3, rtol=1e-4)
