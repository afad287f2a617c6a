"""Train a surgical LoRA with the HF Trainer and PEFT, from a validated config, on a registered base."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from core.errors import ScalpelError
from core.model_store import ModelEntry
from training import distributed, dropout
from training import precision as precisions
from training.base_model import load_model, load_tokenizer, template_info
from training.config import TrainConfig
from training.dataset import IGNORE_INDEX, Example, tokenize_example

log = logging.getLogger("scalpel.training")
# transformers calls its own deprecated is_gradient_checkpointing while it sets up and runs training; the
# warning names nothing a user can change. Only that message is hidden.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# PEFT looks for the base's config.json whenever it saves (checkpoints too) to see whether the vocabulary
# changed; a GGUF base has none, and the vocabulary never changes here.
warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)
CHECKPOINTS = "checkpoints"  # below the work folder: the Trainer's checkpoint-<step> folders


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        item = {"input_ids": row["input_ids"], "labels": row["labels"]}
        if "distill" in row:
            item["distill"] = row["distill"]
        return item


Collate = Callable[[list[dict]], dict[str, torch.Tensor]]


def pad_collator(tokenizer) -> Collate:
    """Right-padded batches (transformers' DataCollatorForSeq2Seq): padding is masked out of attention
    (attention_mask) and of the loss (-100 labels). Rows keep other keys (concept, n_tokens...): only the
    tokens and labels are handed on."""
    tokenizer.padding_side = "right"  # the answers' labels line up with their tokens from position 0
    pad = transformers.DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
    )

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        return dict(pad([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]))

    return collate


def pack_collator() -> transformers.DataCollatorWithFlattening:
    """Padding-free batches: the examples are laid end to end in one row, positions restart at every example,
    and transformers turns those positions into a block-diagonal causal mask, so no example attends to
    another. No compute is spent on padding; the loss is the same token-weighted mean."""
    return transformers.DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


@dataclass
class DistillMask:
    """Wraps a collator: adds `distill`, True on every token of the examples learned by distillation, laid
    out as the wrapped collator lays out the tokens (one packed row, or one padded row per example)."""

    collate: Callable[[list[dict]], dict[str, torch.Tensor]]

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = self.collate([{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch])
        flags = [torch.full((len(b["input_ids"]),), bool(b.get("distill")), dtype=torch.bool) for b in batch]
        if out["input_ids"].shape[0] == 1:  # packed end to end (or a single example)
            out["distill"] = torch.cat(flags)[None]
        else:
            out["distill"] = torch.nn.utils.rnn.pad_sequence(flags, batch_first=True, padding_value=False)
        return out


# The longest packed row worth forming. A packed row's attention is computed densely under its block-diagonal
# mask, so its cost grows with the square of the row; on a CPU, beyond a few hundred tokens that outweighs
# what fewer, larger matrix products gain (bench/training.py: 0.82x for rows of four ~260-token examples).
PACKED_ROW_TOKENS = 512


@dataclass
class Batching:
    """How examples become forward passes: `micro` examples per pass, `accumulate` passes per optimizer step,
    either packed end to end in one row or padded (and then grouped by length, so little is padded)."""

    micro: int
    accumulate: int
    packed: bool


def micro_batching(tc, longest: int) -> Batching:
    """The batching for a TrainingSettings whose longest tokenized example has `longest` tokens.

    Short examples are packed, and a whole optimizer step (batch_size x gradient_accumulation_steps
    examples) goes through the model as one packed row when that row stays short even if every example
    were the longest: the update is the same (the Trainer weighs accumulated losses by token count, as one
    batch does), it just comes from fewer, larger matrix products. Longer examples are padded in batches
    of similar length (`group_by_length`), which wastes little and keeps attention per example.
    """
    row_limit = min(PACKED_ROW_TOKENS, tc.max_seq_length)
    step = tc.batch_size * tc.gradient_accumulation_steps
    if tc.packing and tc.gradient_accumulation_steps > 1 and step * longest <= row_limit:
        return Batching(step, 1, packed=True)
    packed = tc.packing and tc.batch_size * longest <= row_limit
    return Batching(tc.batch_size, tc.gradient_accumulation_steps, packed)


class SeededLengthGroups(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from a generator seeded per epoch (the Trainer calls
    set_epoch), so a run resumed from a checkpoint sees exactly the batches an uninterrupted one would.

    Under DDP every rank draws the same order (same seed) and accelerate hands rank r the batches r, r + N,
    r + 2N...: the groups are a whole optimizer step across all ranks, so N ranks together see what one
    process with N times the batch would."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


class AnswerLogitsTrainer(transformers.Trainer):
    """The HF Trainer, but the vocabulary projection is computed only where a token is learned.

    Loss is taken on answer tokens only, so the logits of prompt positions are never used. On a small
    model the projection onto a 49k vocabulary is a fifth of the forward pass, so skipping it for the
    prompt (transformers' `logits_to_keep`) saves real time. The loss is the same token-weighted mean.

    Tokens flagged `distill` (see DistillMask) are scored by KL divergence to the bare base instead of by
    their labels, and `group_by_length` makes padded batches from examples of similar length.
    """

    distill_weight: float = 1.0
    group_by_length: bool = False

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        assert isinstance(dataset, TokenizedDataset)  # the only dataset this trainer is given
        if not self.group_by_length or self.args.per_device_train_batch_size == 1:
            return super()._get_train_sampler(train_dataset)
        return SeededLengthGroups(
            self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size,
            [len(row["input_ids"]) for row in dataset.rows],
            # the data seed, never the seed: under DDP the seed differs per rank (training_arguments)
            self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        distill = inputs.get("distill")
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "distill")}
        targets = labels[:, 1:]  # position t predicts token t + 1
        learned = targets != IGNORE_INDEX
        keep = learned.any(dim=0).nonzero().squeeze(-1)
        outputs = model(**model_inputs, logits_to_keep=keep)
        logits = outputs.logits
        targets = targets[:, keep]
        distilled = (distill[:, 1:][:, keep] & (targets != IGNORE_INDEX)) if distill is not None else None
        if distilled is not None:
            targets = targets.masked_fill(distilled, IGNORE_INDEX)
        total = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        if distilled is not None and (distilled.any() or self.is_fsdp_enabled):
            kl = self._kl_to_base(model, model_inputs, distill, keep, logits, distilled)
            total = total + self.distill_weight * kl
        # Over the whole accumulated step when the Trainer counted it (then it is not rescaled), else this batch.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        loss = total / (num_items_in_batch if num_items_in_batch is not None else learned.sum().clamp(min=1))
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # The count is every rank's tokens (the Trainer gathers it), and DDP averages the ranks' gradients:
            # times the ranks, the update is the gradient of one token-weighted mean over the whole global step,
            # as in one process. The Trainer's own compute_loss does the same.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _kl_to_base(self, model, model_inputs, distill, keep, logits, distilled) -> torch.Tensor:
        """Sum over the distilled positions of KL(base || adapted): the bare base's prediction is the target.

        The base runs on the distilled examples alone (an example is distilled whole or not at all), not on the
        whole batch: the other examples' base predictions would be thrown away.
        """
        bare = self.accelerator.unwrap_model(model)
        if not distilled.any():
            # FSDP alone calls this without distilled examples: its sharded weights run only through the wrapper,
            # and every forward gathers them from all ranks, so every rank takes one teacher pass a step, even
            # one of a single token, or the ranks would wait on each other. (Not exercised by the tests: on CPUs
            # accelerate runs an FSDP config as plain data parallel.)
            with torch.no_grad(), bare.disable_adapter():
                model(**{k: v[:1, :1] for k, v in model_inputs.items()}, logits_to_keep=1)
            return logits.new_zeros(())
        if distill.shape[0] == 1:  # one packed row: the distilled examples' tokens, still end to end
            tokens = distill[0]
            inputs = {k: v[:, tokens] for k, v in model_inputs.items()}
            at = (tokens.cumsum(0) - 1)[keep[distilled[0]]]  # the predictions' places in that shorter row
            select = torch.ones((1, len(at)), dtype=torch.bool, device=at.device)
        else:  # padded rows: the distilled examples' rows
            rows = distilled.any(-1)
            inputs = {k: v[rows] for k, v in model_inputs.items()}
            at, select = keep, distilled[rows]
        # Under DDP the pass runs on the bare module: a rank whose batch holds no distilled example skips it, and
        # through the wrapper every forward is a collective (DDP broadcasts the buffers), which the other ranks
        # would not join. Under FSDP it runs through the wrapper, on every rank (above).
        teacher = model if self.is_fsdp_enabled else bare
        with torch.no_grad(), bare.disable_adapter():
            base_logits = teacher(**inputs, logits_to_keep=at).logits[select]
        base = base_logits.float().log_softmax(-1)
        adapted = logits[distilled].float().log_softmax(-1)
        return torch.nn.functional.kl_div(adapted, base, log_target=True, reduction="sum")


class LossProgress(ProgressCallback):
    """The Trainer's tqdm bar (steps, rate, ETA) with the latest loss and learning rate on it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs:
            return
        shown = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss", "learning_rate") if k in logs}
        if shown:
            self.training_bar.set_postfix(shown, refresh=True)


def balance_by_concept(rows: list[dict], seed: int) -> list[dict]:
    """Repeat the examples of smaller concepts (whole copies first, then a seeded sample of the rest)
    until every concept has as many rows as the largest."""
    by_concept: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_concept[row["concept"]].append(row)
    target = max(len(group) for group in by_concept.values())
    rng = random.Random(seed)
    balanced = []
    for concept in sorted(by_concept):
        group = by_concept[concept]
        copies, rest = divmod(target, len(group))
        balanced.extend(group * copies + rng.sample(group, rest))
    return balanced


def concept_losses(
    model, rows: list[dict], collate: Collate, *, batch_size: int = 8, progress: bool = False
) -> dict[str, float]:
    """Mean loss on answer tokens per concept (token-weighted).

    Rows of similar length are scored together (sorted by length, so little padding is computed), and each
    token's loss is summed into its own row's concept: padding is masked out of attention and of the sums. A row
    repeated in the training set (an update's new examples, `new_repeats` times) is scored once: the loss of
    a concept is the mean over the tokens of its distinct rows.
    """
    device = next(model.parameters()).device
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    unique = {(r["concept"], tuple(r["input_ids"]), tuple(r["labels"])): r for r in rows}
    ordered = sorted(unique.values(), key=lambda r: len(r["input_ids"]))
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for group in tqdm(batches, desc="loss per concept", unit="batch", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in collate(group).items()}
            labels = batch.pop("labels")[:, 1:]  # the model predicts token t+1 at position t
            # As in AnswerLogitsTrainer: project onto the vocabulary only where some row has an answer token.
            keep = (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
            with precisions.autocast(model):
                logits = model(**batch, logits_to_keep=keep).logits.float()
            labels = labels[:, keep]
            token_loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
            )
            counted = labels != IGNORE_INDEX
            for row, loss, mask in zip(group, token_loss, counted, strict=True):
                sums[row["concept"]] += float(loss[mask].sum())
                counts[row["concept"]] += int(mask.sum())
    model.train(was_training)
    return {c: sums[c] / counts[c] for c in sorted(sums) if counts[c]}


class LearningRateEveryStep(TrainerCallback):
    """The learning rate of every optimizer step (the log history has it only every logging_steps, which puts
    a warm-up peak in the wrong place on the plot)."""

    def __init__(self) -> None:
        self.rates: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if lr_scheduler is not None:
            self.rates.append((state.global_step, float(lr_scheduler.get_last_lr()[0])))


class ConceptLossOnEval(TrainerCallback):
    """At every evaluation (eval_steps), add the eval loss per concept to the Trainer's log history."""

    def __init__(self, rows: list[dict], collate: Collate):
        self.rows, self.collate = rows, collate

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # Only rank 0's history is kept; under FSDP every rank takes part in the (sharded) forward passes.
        if not state.is_world_process_zero and not distributed.fsdp_requested():
            return
        state.log_history.append(
            {"step": state.global_step, "eval_concept_loss": concept_losses(model, self.rows, self.collate)}
        )


@dataclass
class TrainResult:
    adapter_dir: Path
    log_history: list[dict]
    metrics: dict
    n_examples: int
    n_tokens: int
    n_truncated: int
    seconds: float  # the whole call: loading, training, the per-concept pass, saving
    train_seconds: float = 0.0  # the Trainer's own train_runtime: the optimizer steps alone
    tokens_trained: int = 0  # tokens the optimizer steps went through (a --max-steps cap counts)
    learning_rates: list[tuple[int, float]] = field(default_factory=list)  # (step, lr) at every step
    concepts: dict[str, int] = field(default_factory=dict)
    concept_loss: dict[str, float] = field(default_factory=dict)  # after training, on eval data if given

    def to_json(self) -> dict:
        """As rank 0 of a distributed run hands it to the launching process."""
        return {**dataclasses.asdict(self), "adapter_dir": str(self.adapter_dir)}

    @classmethod
    def from_json(cls, data: dict) -> TrainResult:
        return cls(
            **{
                **data,
                "adapter_dir": Path(data["adapter_dir"]),
                "learning_rates": [(int(s), float(r)) for s, r in data.get("learning_rates", [])],
            }
        )


def lora_config(config: TrainConfig) -> LoraConfig:
    lc = config.lora_config
    # PEFT annotates lora_alpha as int but scales by it as a number; the plan's config may give 16.0
    return LoraConfig(
        r=lc.r,
        lora_alpha=lc.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=lc.lora_dropout,
        target_modules=list(lc.target_modules),
        bias=lc.bias,
        task_type=lc.task_type,
        use_rslora=lc.use_rslora,
    )


def training_arguments(
    config: TrainConfig,
    work_dir: Path,
    *,
    has_eval: bool,
    max_steps: int | None = None,
    progress: bool = True,
    batching: Batching | None = None,
    precision: str | None = None,
) -> transformers.TrainingArguments:
    """Every field of the plan's training_config, mapped onto the HF Trainer's arguments.

    `batching` (from micro_batching) sets the micro-batches; without it they are the config's own. `precision` is
    the one chosen for the base (training.precision.choose_precision with its width); without it, the config's.
    """
    tc = config.training_config
    precision = precision or precisions.choose_precision(tc.precision)
    batching = batching or Batching(tc.batch_size, tc.gradient_accumulation_steps, packed=False)
    micro, accumulate = batching.micro, batching.accumulate
    return transformers.TrainingArguments(
        output_dir=str(work_dir / CHECKPOINTS),
        num_train_epochs=tc.num_epochs,
        max_steps=max_steps if max_steps else -1,
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=tc.batch_size,
        learning_rate=tc.learning_rate,
        gradient_accumulation_steps=accumulate,
        warmup_steps=tc.warmup_steps,
        logging_steps=tc.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=tc.save_steps,
        save_total_limit=2,  # enough to resume from; older checkpoints are removed as training goes
        include_num_input_tokens_seen="all" if batching.packed else "non_padding",  # a packed batch has no padding
        eval_strategy="steps" if has_eval else "no",
        eval_steps=tc.eval_steps,
        lr_scheduler_type=tc.lr_scheduler_type,
        weight_decay=tc.weight_decay,
        data_seed=tc.seed,  # the data order: one per run, shared by every rank
        report_to=[],
        disable_tqdm=not progress,
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation needs the loss; the logits kept are only the answers' anyway
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # both may say use_cpu (gloo ranks, bf16 on a CPU): one dict, so the keyword is given once
        **{**_ddp(tc.seed), **_on_cpu(precision)},
        **_checkpointing(tc.gradient_checkpointing),
    )


def _on_cpu(precision: str) -> dict:
    """Without a GPU, bf16 trains on the CPU under autocast (AMX or AVX512-BF16 kernels where the CPU has them),
    which the Trainer accepts only when told use_cpu; fp16 has no CPU path there, so it is refused by name."""
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return {}
    if precision == "fp16":
        raise ScalpelError(
            "training_config.precision: fp16 needs a GPU; on this machine use bf16 (with AMX or AVX512-BF16) or fp32",
            param="training_config.precision",
            code="precision_unsupported",
        )
    return {"use_cpu": True} if precision == "bf16" else {}


def _ddp(seed: int) -> dict:
    """Under torchrun: the backend for the device, and a seed per rank.

    The seed drives dropout and the like; ranks with one seed would draw the same dropout masks for different
    examples. Rank r gets seed + r (rank 0, like a single process, gets the config's seed). The data order
    comes from data_seed instead, the same on every rank, and the LoRA weights are drawn before the Trainer
    seeds anything (and DDP starts every rank from rank 0's weights)."""
    if distributed.world_size() <= 1:
        return {"seed": seed}
    backend = distributed.backend()
    return {
        "seed": seed + distributed.rank(),
        "ddp_backend": backend,
        "ddp_find_unused_parameters": False,  # every LoRA matrix takes part in every forward pass
        # accelerate makes CPU processes a MULTI_CPU group only when told they are on the CPU (not MPS either)
        "use_cpu": backend == "gloo",
    }


def _checkpointing(enabled: bool) -> dict:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; use whichever exists."""
    if not enabled:
        return {}
    import inspect

    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in inspect.signature(transformers.TrainingArguments).parameters
        else "gradient_checkpointing"
    )
    # PEFT freezes the embeddings, so checkpointed blocks need inputs that require grad.
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def _tokenize_all(examples: list[Example], tokenizer, entry: ModelEntry, max_length: int) -> list[dict]:
    info = template_info(entry)
    rows = []
    for ex in examples:
        try:
            row = tokenize_example(ex, tokenizer, info, max_length)
        except ScalpelError as exc:
            raise ScalpelError(f"{ex.where}: {exc.message}", param=ex.where, code=exc.code) from exc
        if not any(label != IGNORE_INDEX for label in row["labels"]):
            raise ScalpelError(
                f"{ex.where}: the prompt alone fills max_seq_length={max_length} tokens "
                f"({row['n_tokens']} in all), so nothing of the answer is left to learn",
                param=ex.where,
                code="example_too_long",
            )
        rows.append(row)
    truncated = [r for r in rows if r["truncated"]]
    if truncated:
        shown = ", ".join(
            f"{ex.where} ({r['n_tokens']} tokens)" for ex, r in zip(examples, rows, strict=True) if r["truncated"]
        )
        log.warning(
            "%d of %d examples are longer than max_seq_length=%d and were cut to it: %s",
            len(truncated),
            len(rows),
            max_length,
            shown[:2000],
        )
    return rows


def _train_on_ranks(
    launch: distributed.Launch,
    config: TrainConfig,
    entry: ModelEntry,
    examples: list[Example],
    out_dir: Path,
    work_dir: Path,
    *,
    eval_examples: list[Example] | None,
    max_steps: int | None,
    progress: bool,
    resume: bool,
    callbacks: tuple[TrainerCallback, ...],
    init_adapter: Path | None,
) -> TrainResult:
    """train() on launch.world_size processes; this process hears rank 0 and gets its result back."""
    started = time.time()
    distributed.check_devices(launch)
    spec = distributed.RankSpec(
        config=config.model_dump(mode="json"),
        entry=dataclasses.asdict(entry),
        examples=[dataclasses.asdict(e) for e in examples],
        eval_examples=[dataclasses.asdict(e) for e in eval_examples] if eval_examples else None,
        out_dir=str(Path(out_dir).resolve()),
        work_dir=str(Path(work_dir).resolve()),
        max_steps=max_steps,
        resume=resume,
        init_adapter=str(Path(init_adapter).resolve()) if init_adapter else None,
    )
    # What rank 0's events are handed to here: the caller's callbacks and the bar a single process would draw.
    relayed = (*((LossProgress(),) if progress else ()), *callbacks)
    precision = precisions.for_base(config.training_config.precision, entry.gguf)
    args = training_arguments(
        config, Path(work_dir), has_eval=bool(eval_examples), max_steps=max_steps, precision=precision
    )
    data = distributed.run_ranks(launch, spec, relayed, args)
    if data is None:
        raise distributed.NodeDone(f"node {launch.node_rank} has finished its ranks; node 0 keeps the adapter")
    result = TrainResult.from_json(data)
    result.seconds = time.time() - started  # the whole call, with the ranks' start-up
    return result


def last_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete checkpoint a killed run left in its work folder, if any.

    Complete means it has the Trainer's state, which the Trainer writes after the weights, the optimizer and
    the RNG states: a run killed while it saved (on any rank) leaves a folder without it, which is skipped."""
    complete = {}
    for found in (Path(work_dir) / CHECKPOINTS).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = found.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and (found / TRAINER_STATE_NAME).is_file():
            complete[int(step)] = found
    return complete[max(complete)] if complete else None


def train(
    config: TrainConfig,
    entry: ModelEntry,
    examples: list[Example],
    out_dir: Path,
    work_dir: Path,
    *,
    eval_examples: list[Example] | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    resume: bool = False,
    callbacks: tuple[TrainerCallback, ...] = (),
    init_adapter: Path | None = None,
    launch: distributed.Launch | None = None,
) -> TrainResult:
    """Train, then save the PEFT adapter (safetensors) and the Trainer's log into `out_dir`.

    With `resume`, a checkpoint left in `work_dir` by a killed run is continued: the step, the optimizer
    and scheduler state, the RNG state and the position in the data are all restored by the Trainer.
    With `init_adapter` (a PEFT folder, such as the live version of an adapter), training continues from
    its weights instead of a fresh LoRA; its rank and modules are kept.
    With a `launch` of several processes, torchrun runs this same function on every rank (see
    training.distributed) and `callbacks` see rank 0's events; batch_size is then per process.
    """
    if launch is not None and launch.distributed and not distributed.in_rank():
        return _train_on_ranks(
            launch,
            config,
            entry,
            examples,
            out_dir,
            work_dir,
            eval_examples=eval_examples,
            max_steps=max_steps,
            progress=progress,
            resume=resume,
            callbacks=callbacks,
            init_adapter=init_adapter,
        )
    started = time.time()
    torch.manual_seed(config.training_config.seed)
    tokenizer = load_tokenizer(entry)
    max_len = config.training_config.max_seq_length
    rows = _tokenize_all(examples, tokenizer, entry, max_len)
    distill = set(config.training_config.distill_concepts)
    if distill:
        rows = [{**row, "distill": row["concept"] in distill} for row in rows]
    if config.training_config.balance_concepts:
        rows = balance_by_concept(rows, config.training_config.seed)
    eval_rows = _tokenize_all(eval_examples, tokenizer, entry, max_len) if eval_examples else None

    # In bf16 the frozen base is kept in bf16 (training.precision): no weight is cast again at every step, and
    # under FSDP (a 70B-class base) fp32 would take twice the memory.
    precision = precisions.for_base(config.training_config.precision, entry.gguf)
    base_model = load_model(entry, dtype=precisions.base_dtype(precision))
    precisions.prepare_base(base_model, precision)
    # No KV cache while training. It is useless there, and with one transformers ignores packed positions
    # and lets packed examples attend to each other.
    base_model.config.use_cache = False
    if init_adapter is not None:
        model = PeftModel.from_pretrained(base_model, str(init_adapter), is_trainable=True)
    else:
        model = get_peft_model(base_model, lora_config(config))
    batching = micro_batching(config.training_config, max(len(r["input_ids"]) for r in rows))
    args = training_arguments(
        config,
        work_dir,
        has_eval=bool(eval_rows),
        max_steps=max_steps,
        progress=progress,
        batching=batching,
        precision=precision,
    )
    # Cheaper masks for LoRA dropout, same distribution (training/dropout.py), where the Trainer trains on a CPU:
    # the model is still on the CPU here whatever the device, so ask the arguments, as the Trainer does.
    dropout.use_on_cpu(model, args.device)
    collate = pad_collator(tokenizer)
    train_collate = pack_collator() if batching.packed else collate
    trainer = AnswerLogitsTrainer(
        model=model,
        args=args,
        train_dataset=TokenizedDataset(rows),
        eval_dataset=TokenizedDataset(eval_rows) if eval_rows else None,
        data_collator=DistillMask(train_collate) if distill else train_collate,
    )
    trainer.distill_weight = config.training_config.distill_weight
    trainer.group_by_length = config.training_config.group_by_length and not batching.packed
    if eval_rows:
        trainer.add_callback(ConceptLossOnEval(eval_rows, collate))
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgress())
    else:  # no bar, and no log dict printed per logging step: callers (the job worker) record what they need
        trainer.remove_callback(PrinterCallback)
    rates = LearningRateEveryStep()
    trainer.add_callback(rates)
    for callback in callbacks:
        trainer.add_callback(callback)
    checkpoint = last_checkpoint(work_dir) if resume else None
    if checkpoint:
        log.info("resuming from %s", checkpoint.name)
    with precisions.without_input_casts(model, precision):
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        history = trainer.state.log_history
        final_concept_loss: dict[str, float] = {}
        state_dict = None
        if trainer.is_fsdp_enabled:
            # The weights are sharded: every rank takes part in the forward passes and in gathering the full
            # weights (as the Trainer's own save_model does under FSDP); rank 0 alone writes them below.
            final_concept_loss = concept_losses(trainer.model_wrapped, eval_rows or rows, collate)
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
            state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        elif trainer.is_world_process_zero():
            # `model` is the bare PEFT model (DDP wraps a copy of the reference): no collective call here.
            final_concept_loss = concept_losses(model, eval_rows or rows, collate, progress=progress)
    if trainer.is_world_process_zero():  # the other ranks of a distributed run write nothing
        out_dir.mkdir(parents=True, exist_ok=True)
        # Only the LoRA matrices are saved: the base's embeddings are never modified (no vocabulary changes).
        model.save_pretrained(
            str(out_dir),
            safe_serialization=True,
            save_embedding_layers=False,
            **({"state_dict": state_dict} if state_dict is not None else {}),
        )
        (out_dir / "trainer_log.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    losses = [h["loss"] for h in history if "loss" in h]
    tc = config.training_config
    metrics: dict[str, object] = dict(output.metrics)
    metrics.update(
        final_loss=losses[-1] if losses else math.nan,
        global_step=trainer.state.global_step,
        device=str(args.device),
        precision=precision,
        # batch_size is per process (the HF convention): one optimizer step sees batch x accumulation x world.
        world_size=args.world_size,
        global_batch=tc.batch_size * tc.gradient_accumulation_steps * args.world_size,
        learning_rate=tc.learning_rate,  # the peak rate, as configured: never scaled with the world size
        backend=args.ddp_backend if args.world_size > 1 else None,
    )
    n_tokens = sum(len(r["input_ids"]) for r in rows)  # one epoch, as balanced
    concepts: dict[str, int] = {}
    for ex in examples:  # as given, before any balancing
        concepts[ex.concept] = concepts.get(ex.concept, 0) + 1
    return TrainResult(
        adapter_dir=out_dir,
        log_history=history,
        metrics=metrics,
        n_examples=len(examples),
        n_tokens=n_tokens,
        n_truncated=sum(r["truncated"] for r in rows),
        seconds=time.time() - started,
        train_seconds=float(output.metrics.get("train_runtime", 0.0)),
        # Epochs actually run (fractional under a step cap) times the tokens of one epoch.
        tokens_trained=round(n_tokens * float(trainer.state.epoch or 0.0)),
        learning_rates=rates.rates,
        concepts=concepts,
        concept_loss=final_concept_loss,
    )
