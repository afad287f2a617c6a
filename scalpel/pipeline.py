"""The spine: train a PEFT adapter, convert it to GGUF, and publish both as one new immutable version in the store."""

from __future__ import annotations

import resource
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from conversion.architecture import BaseLayout, layout_from_gguf
from conversion.estimate import NUCLEAR, lora_size
from conversion.lora_to_gguf import BASE_FINGERPRINT_KEY, convert_lora
from scalpel import adapter_store, model_store, paths
from scalpel.atomic import sha256_file, write_json
from scalpel.errors import ScalpelError
from training.config import TrainConfig
from training.dataset import file_hash, load_examples, split_validation
from training.quality import Finding, check
from training.report import ReportInputs, write_report
from training.trainer import train


@dataclass
class PipelineResult:
    version: adapter_store.AdapterVersion
    manifest: dict
    train_seconds: float
    convert_seconds: float
    warnings: list[Finding]
    promoted: bool = True


def adapter_gguf(peft_dir: Path, base: model_store.ModelEntry, layout: BaseLayout, out: Path, outtype: str = "f32"):
    """Convert a PEFT folder against a registered base, stamping the base's fingerprint into the file."""
    return convert_lora(peft_dir, layout, out, outtype=outtype, metadata={BASE_FINGERPRINT_KEY: base.fingerprint})


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _nuclear_mb(layout: BaseLayout) -> float:
    """The plan's "nuclear" adapter (r=32 on all 7 projections) on this base, as f32 GGUF."""
    return lora_size(layout, NUCLEAR["r"], NUCLEAR["target_modules"]).size_mb["f32"]


def train_and_publish(config: TrainConfig, data: Path, *, eval_data: Path | None = None,
                      model: str | None = None, outtype: str = "f32", max_steps: int | None = None,
                      progress: bool = True, work_dir: Path | None = None, callbacks: tuple = (),
                      manifest_extra: dict | None = None, init_adapter: Path | None = None,
                      keep_files: dict[str, Path] | None = None, eval_suites: tuple[Path, ...] = (),
                      gate=None) -> PipelineResult:
    """Everything is assembled in a staging folder; the store changes only by the final rename.

    Without `work_dir`, checkpoints go to a temporary folder that is removed at the end. With one (a
    job's folder), they stay there, and a run in the same folder resumes from the newest checkpoint.

    `keep_files` ({"data/train.json": path, ...}) are copied into the version (by default the training and
    eval data), so later updates can replay them; `eval_suites` are copied into its eval/ folder, so later
    updates check that this version's knowledge is retained. `gate(staged_version)` evaluates the staged version
    before it is published and returns (eval results, promote?); a version that fails its gate is kept
    in the store but not made live.
    """
    paths.enforce_offline()
    base = model_store.get(model or config.model_name)
    examples = load_examples(data)
    quality = check(examples)
    if quality.errors:
        first = quality.errors[0]
        raise ScalpelError(f"{first.where}: {first.message} ({len(quality.errors)} errors; see `scalpel data "
                           f"check {data}`)", param=first.where, code="dataset_errors")
    eval_examples = load_examples(eval_data) if eval_data else None
    share = config.training_config.validation_split
    if eval_examples is None and share:
        examples, eval_examples = split_validation(examples, share, config.training_config.seed)
    root = adapter_store.root_for_output_dir(config.output_dir)
    parent = adapter_store.active_version(root)
    paths.state_dir().mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="train-", dir=paths.state_dir()))
    try:
        with adapter_store.new_staging(root) as stage:
            result = train(config, base, examples, stage, work, eval_examples=eval_examples,
                           max_steps=max_steps, progress=progress, resume=work_dir is not None,
                           callbacks=callbacks, init_adapter=init_adapter)
            started = datetime.now(timezone.utc)
            layout = layout_from_gguf(base.gguf_path)
            conversion = adapter_gguf(stage, base, layout, stage / adapter_store.GGUF_NAME, outtype)
            convert_seconds = (datetime.now(timezone.utc) - started).total_seconds()
            manifest = {
                "adapter": root.name,
                "base": {"name": base.name, "fingerprint": base.fingerprint, "gguf": base.gguf},
                "parent_version": parent,
                "datasets": {"train": {"path": str(Path(data).resolve()), "sha256": file_hash(data)},
                             **({"eval": {"path": str(Path(eval_data).resolve()), "sha256": file_hash(eval_data)}}
                                if eval_data else {})},
                "config": config.model_dump(mode="json"),
                "metrics": {**result.metrics, "examples": result.n_examples, "tokens": result.n_tokens,
                            "truncated_examples": result.n_truncated, "train_seconds": result.seconds,
                            "convert_seconds": convert_seconds, "concepts": result.concepts,
                            "concept_loss": result.concept_loss},
                "gguf": {"outtype": outtype, "alpha": conversion.alpha, "rank": conversion.rank,
                         "modules": conversion.n_modules, "size_bytes": conversion.path.stat().st_size},
                "data_quality": quality.as_dict(),
                "eval": None,
                **(manifest_extra or {}),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            write_report(ReportInputs(
                adapter=root.name, base=base.name, history=result.log_history, config=manifest["config"],
                dataset_sha256=manifest["datasets"]["train"]["sha256"], examples=result.n_examples,
                tokens=result.n_tokens, seconds=result.seconds, peak_rss_mb=_peak_rss_mb(),
                adapter_mb=conversion.path.stat().st_size / 1e6,
                nuclear_mb=_nuclear_mb(layout), concept_loss=result.concept_loss,
                concept_loss_on=("eval data" if eval_data else f"the {len(eval_examples)} held-out examples"
                                 if eval_examples else "training data")), stage)
            kept = keep_files if keep_files is not None else {
                f"data/train{Path(data).suffix or '.json'}": Path(data),
                **({f"data/eval{Path(eval_data).suffix or '.json'}": Path(eval_data)} if eval_data else {})}
            kept.update({f"eval/{Path(suite).name}": Path(suite) for suite in eval_suites})
            for relative, source in kept.items():
                (stage / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, stage / relative)
            promote = True
            if gate is not None:
                # Named after its own staging folder: an engine caches adapters by ref, and a second
                # candidate staged under a reused name would be scored with the first one's weights.
                staged = adapter_store.AdapterVersion(root.name, stage.name.lstrip("."), stage)
                manifest["eval"], promote = gate(staged)
            manifest["files"] = {str(p.relative_to(stage)): sha256_file(p) for p in sorted(stage.rglob("*"))
                                 if p.is_file()}
            manifest["report"] = "report.md"
            write_json(stage / adapter_store.MANIFEST_NAME, manifest)
            version = adapter_store.publish(root, stage, activate=promote)
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return PipelineResult(version, manifest, result.seconds, convert_seconds, quality.warnings, promote)
