"""One training job in its own process (`python -m scalpel.jobs.worker JOB_ID`), so a crash spares the server."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from transformers.trainer_callback import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from core import paths
from core.errors import ScalpelError
from core.job_store import Job, JobStore, job_dir
from scalpel.jobs.checkpoints import keep as keep_checkpoint
from scalpel.jobs.submit import preservation_on, split_launch
from scalpel.publish import train_and_publish
from scalpel.update_settings import PreservationSettings
from training.config import parse_config
from training.trainer import last_checkpoint


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class JobEvents(TrainerCallback):
    """Writes the Trainer's progress into the job's events: step and total, epoch, loss, lr, tokens/s, ETA,
    peak memory, and one event per checkpoint."""

    def __init__(self, store: JobStore, job_id: str, keep_checkpoints: Job | None = None):
        """With `keep_checkpoints` (a fine-tuning job), every checkpoint is also kept as a servable adapter."""
        self.store, self.job_id, self.keep_checkpoints = store, job_id, keep_checkpoints
        self.begun, self.first_step, self.first_tokens = time.time(), 0, 0
        self.parent = os.getppid()

    def on_train_begin(self, args, state, control, **kwargs):
        # On a resumed run these are the checkpoint's values: rates are measured over this attempt only.
        self.begun, self.first_step, self.first_tokens = time.time(), state.global_step, state.num_input_tokens_seen
        self.store.add_event(
            self.job_id, f"Training {state.max_steps} steps", type="metrics", data=self._progress(state)
        )

    def _progress(self, state, logs: dict | None = None) -> dict:
        elapsed = max(time.time() - self.begun, 1e-6)
        steps = state.global_step - self.first_step
        remaining = state.max_steps - state.global_step
        data = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": state.epoch or 0.0,
            "tokens_per_second": (state.num_input_tokens_seen - self.first_tokens) / elapsed,
            "eta_seconds": remaining * elapsed / steps if steps else None,
            "peak_memory_mb": peak_memory_mb(),
        }
        for key in ("loss", "learning_rate", "eval_loss", "grad_norm"):
            if logs and key in logs:
                data[key] = logs[key]
        return data

    def on_log(self, args, state, control, logs=None, **kwargs):
        data = self._progress(state, logs)
        if logs and "train_loss" in logs:  # the closing summary (train_runtime is in every log)
            self.store.add_event(
                self.job_id,
                f"Training finished: {state.global_step} steps in "
                f"{logs['train_runtime']:.1f} s, mean loss {logs.get('train_loss', float('nan')):.4f}",
                type="metrics",
                data={**data, "train_loss": logs.get("train_loss")},
            )
            return
        shown = ", ".join(f"{k}={data[k]:.4g}" for k in ("loss", "eval_loss", "learning_rate") if k in data)
        self.store.add_event(
            self.job_id, f"Step {state.global_step}/{state.max_steps}: {shown}", type="metrics", data=data
        )

    def on_save(self, args, state, control, **kwargs):
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        if self.keep_checkpoints is not None:  # kept before the event: every listed checkpoint id serves
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            try:
                keep_checkpoint(self.keep_checkpoints, state.global_step, folder, losses[-1] if losses else None)
            except (ScalpelError, OSError) as exc:
                message = paths.scrub(exc.message if isinstance(exc, ScalpelError) else f"{type(exc).__name__}: {exc}")
                self.store.add_event(
                    self.job_id, f"Checkpoint {state.global_step} cannot be served: {message}", level="warn"
                )
        self.store.add_event(
            self.job_id,
            f"Checkpoint saved at step {state.global_step}",
            type="checkpoint",
            data={"step": state.global_step, "epoch": state.epoch, "train_loss": losses[-1] if losses else None},
        )

    def on_step_end(self, args, state, control, **kwargs):
        if os.getppid() != self.parent:  # the runner is gone: stop, and resume when a runner claims us again
            raise SystemExit(75)
        # Every step's progress, so a watcher's bar moves at every step; a logging step's comes from on_log,
        # with the loss.
        if not (args.logging_steps and state.global_step % args.logging_steps == 0):
            self.store.add_event(
                self.job_id, f"Step {state.global_step}/{state.max_steps}", type="metrics", data=self._progress(state)
            )


class EventLog(logging.Handler):
    """Warnings from training (truncated examples, say) become job events, where the user looks."""

    def __init__(self, store: JobStore, job_id: str):
        super().__init__(level=logging.WARNING)
        self.store, self.job_id = store, job_id

    def emit(self, record: logging.LogRecord) -> None:
        self.store.add_event(self.job_id, record.getMessage(), level="warn")


def run_update_job(store: JobStore, job) -> int:
    """An evening update: its outcome (promoted or kept back by a gate) is the job's result."""
    from scalpel.update import UpdateSettings, run_update

    store.add_event(job.id, f"Update of {job.adapter} started (worker pid {os.getpid()})")
    try:
        result = run_update(
            job.adapter,
            Path(job.training_file),
            eval_suite=Path(job.validation_file) if job.validation_file else None,
            settings=UpdateSettings.model_validate(job.config),
            progress=False,
            log=lambda message: store.add_event(job.id, message),
        )
    except ScalpelError as exc:
        store.finish(
            job.id,
            "failed",
            message=f"Update failed: {exc.message}",
            level="error",
            error={"message": exc.message, "code": exc.code or "update_failed", "param": exc.param},
        )
        return 1
    store.finish(
        job.id,
        "succeeded",
        version=result.version.version,
        message=f"{result.version.ref} "
        + ("is live" if result.promoted else "was kept back: " + "; ".join(result.reasons)),
        result={
            "version": result.version.version,
            "ref": result.version.ref,
            "promoted": result.promoted,
            "reasons": result.reasons,
            "seconds": result.seconds,
            "candidates": result.candidates,
            "suites": {k: v["accuracy"] for k, v in result.eval["suites"].items()},
            "base_regression": result.eval.get("base_regression"),
        },
    )
    return 0


def run(job_id: str, store: JobStore | None = None) -> int:
    store = store or JobStore()
    job = store.get(job_id)
    if job.kind == "update":
        return run_update_job(store, job)
    work = job_dir(job_id)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = last_checkpoint(work)
    store.add_event(
        job_id,
        f"Resuming from {checkpoint.name} (attempt {job.attempts})"
        if checkpoint
        else f"Training started (worker pid {os.getpid()})",
    )
    handler = EventLog(store, job_id)
    logging.getLogger("scalpel").addHandler(handler)
    extra = {"job_id": job_id, **({"fine_tuned_model": job.fine_tuned_model} if job.fine_tuned_model else {})}
    config, launch = split_launch(job.config)  # launch: how many processes train it (torchrun), if set
    try:
        result = train_and_publish(
            parse_config(config, f"job {job_id}"),
            Path(job.training_file),
            eval_data=Path(job.validation_file) if job.validation_file else None,
            model=job.model,
            max_steps=job.max_steps,
            progress=False,
            work_dir=work,
            callbacks=(JobEvents(store, job_id, keep_checkpoints=job if job.fine_tuned_model else None),),
            manifest_extra=extra,
            launch=launch,
            preserve=PreservationSettings() if preservation_on(job) else None,
        )
    except ScalpelError as exc:
        store.finish(
            job_id,
            "failed",
            message=f"Job failed: {exc.message}",
            level="error",
            error={"message": exc.message, "code": exc.code or "training_failed", "param": exc.param},
        )
        shutil.rmtree(work, ignore_errors=True)
        return 1
    except Exception as exc:  # a bug or a broken environment: the user sees its type, the log has the trace
        (work / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        store.finish(
            job_id,
            "failed",
            message=f"Job failed: {type(exc).__name__}: {exc}",
            level="error",
            error={"message": f"{type(exc).__name__}: {exc}", "code": "training_failed", "param": None},
        )
        return 1
    finally:
        logging.getLogger("scalpel").removeHandler(handler)
    manifest = result.version.manifest  # the typed manifest, as published
    metrics = manifest.metrics
    final_loss = metrics.final_loss if metrics.final_loss is not None else float("nan")
    adapter_bytes = manifest.gguf.size_bytes if manifest.gguf else result.version.gguf.stat().st_size
    store.finish(
        job_id,
        "succeeded",
        message=f"Published {result.version.ref} ({adapter_bytes / 1e6:.2f} MB); final loss {final_loss:.4f}",
        version=result.version.version,
        trained_tokens=int(metrics.tokens or 0),
        result={
            "version": result.version.version,
            "ref": result.version.ref,
            "train_seconds": result.train_seconds,
            "convert_seconds": result.convert_seconds,
            "final_loss": metrics.final_loss,
            "global_step": metrics.global_step,
            "adapter_bytes": adapter_bytes,
        },
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m scalpel.jobs.worker JOB_ID", file=sys.stderr)
        return 2
    # SIGTERM (a cancel) unwinds normally, so the staging folder is removed and the store stays as it was.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    paths.enforce_offline()
    return run(args[0])


if __name__ == "__main__":
    sys.exit(main())
