"""Keep a fine-tuning job's checkpoint as a servable adapter: GGUF, PEFT weights and a manifest (core.checkpoints)."""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from conversion.architecture import layout_from_gguf
from core import checkpoints, model_store
from core.adapter_store import GGUF_NAME
from core.atomic import sha256_file
from core.job_store import Job
from core.manifest import MANIFEST_NAME, BaseRef, GgufInfo, Manifest, Metrics, write_manifest
from scalpel.publish import adapter_gguf

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what a Trainer checkpoint's adapter is


def keep(job: Job, step: int, checkpoint_dir: Path, train_loss: float | None = None) -> Path:
    """Convert the Trainer's checkpoint-<step> folder against the job's base, and put it in place atomically.

    The Trainer removes its older checkpoints as it goes (save_total_limit), so the kept copy is what serves
    the checkpoint's id. A resumed run that saves the same step again replaces the earlier copy.
    """
    assert job.fine_tuned_model, "only fine-tuning jobs have checkpoint ids"
    base = model_store.get(job.model)
    final = checkpoints.version(job.id, step).path
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}-", suffix=".partial", dir=final.parent))
    try:
        conversion = adapter_gguf(checkpoint_dir, base, layout_from_gguf(base.gguf_path), stage / GGUF_NAME)
        for name in PEFT_FILES:  # beside the GGUF, as every stored version keeps its PEFT weights
            shutil.copyfile(checkpoint_dir / name, stage / name)
        manifest = Manifest(
            adapter=job.adapter,
            base=BaseRef(name=base.name, fingerprint=base.fingerprint, gguf=base.gguf),
            config=job.config,
            metrics=Metrics(global_step=step, final_loss=train_loss),
            gguf=GgufInfo(
                outtype="f32",
                alpha=conversion.alpha,
                rank=conversion.rank,
                modules=conversion.n_modules,
                size_bytes=conversion.path.stat().st_size,
            ),
            job_id=job.id,
            fine_tuned_model=checkpoints.model_id(job.fine_tuned_model, step),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files={p.name: sha256_file(p) for p in sorted(stage.iterdir())},
        )
        write_manifest(stage / MANIFEST_NAME, manifest)
        if final.exists():  # the same step saved again by a resumed run: the new copy replaces it
            old = final.with_name(f".{final.name}-{os.getpid()}.old")
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        stage.rename(final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final
