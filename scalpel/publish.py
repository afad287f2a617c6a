"""The spine: train a PEFT adapter, convert it to GGUF, and publish both as one new immutable version in the store.

Two steps, so that a caller can judge a version before it is published: stage_version trains and converts into a
private staging folder and hands back the staged version with its manifest in memory; publish_staged moves it
into the store, live or not. train_and_publish (`scalpel train`) does both, from files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from conversion.architecture import BaseLayout, layout_from_gguf
from conversion.estimate import NUCLEAR, lora_size
from conversion.lora_to_gguf import convert_lora
from core import adapter_store, model_store, paths
from core.atomic import sha256_file
from core.errors import ScalpelError
from core.gguf_meta import BASE_FINGERPRINT_KEY
from core.manifest import BaseRef, DatasetRef, GgufInfo, Manifest, Metrics, write_manifest
from scalpel import evaluate, preservation
from scalpel.update_settings import PreservationSettings
from training.config import TrainConfig
from training.dataset import Example, file_hash, load_examples, split_validation
from training.distributed import Launch
from training.quality import Finding, QualityReport, check
from training.report import ReportInputs, write_report
from training.trainer import train


@dataclass
class PipelineResult:
    version: adapter_store.AdapterVersion
    manifest: Manifest
    train_seconds: float
    convert_seconds: float
    warnings: list[Finding]
    promoted: bool = True


@dataclass
class TrainingData:
    """What a version is trained on, in memory, and what its manifest and its folder keep of where it came from."""

    examples: list[Example]
    quality: QualityReport  # the dataset check, run once by whoever read the examples
    datasets: dict[str, DatasetRef]  # the manifest's datasets, by role: "train", "eval"
    # Copied into the version ({"data/train.json": path, "eval/suite.json": path}), so later updates can replay
    # its data and check that its knowledge is retained.
    keep_files: dict[str, Path] = field(default_factory=dict)
    eval_examples: list[Example] | None = None  # validation examples; without them, validation_split holds some out


@dataclass
class StagedVersion:
    """A trained and converted version in its staging folder, not in the store yet; its manifest is in memory."""

    root: Path  # the adapter's folder in the store
    stage: Path
    manifest: Manifest  # complete but for files and report, which publish_staged adds
    train_seconds: float
    convert_seconds: float
    warnings: list[Finding]

    @property
    def version(self) -> adapter_store.AdapterVersion:
        """The staged version, servable as it is (to evaluate it before it is published)."""
        # Named after its own staging folder: an engine caches adapters by ref, and a second candidate staged
        # under a reused name would be scored with the first one's weights.
        return adapter_store.AdapterVersion(self.root.name, self.stage.name.lstrip("."), self.stage)


def adapter_gguf(peft_dir: Path, base: model_store.ModelEntry, layout: BaseLayout, out: Path, outtype: str = "f32"):
    """Convert a PEFT folder against a registered base, stamping the base's fingerprint into the file."""
    return convert_lora(peft_dir, layout, out, outtype=outtype, metadata={BASE_FINGERPRINT_KEY: base.fingerprint})


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _nuclear_mb(layout: BaseLayout) -> float:
    """The plan's "nuclear" adapter (r=32 on all 7 projections) on this base, as f32 GGUF."""
    return lora_size(layout, NUCLEAR["r"], NUCLEAR["target_modules"]).size_mb["f32"]


def read_training_data(
    data: Path,
    eval_data: Path | None = None,
    keep_files: dict[str, Path] | None = None,
    eval_suites: tuple[Path, ...] = (),
) -> TrainingData:
    """Load and check a training file (and a validation file); dataset errors stop here, before any training.

    `keep_files` default to the training and eval data themselves; `eval_suites` go into the version's eval/.
    """
    examples = load_examples(data)
    quality = check(examples)
    if quality.errors:
        first = quality.errors[0]
        raise ScalpelError(
            f"{first.where}: {first.message} ({len(quality.errors)} errors; see `scalpel data check {data}`)",
            param=first.where,
            code="dataset_errors",
        )
    eval_examples = load_examples(eval_data) if eval_data else None
    datasets = {"train": DatasetRef(path=str(Path(data).resolve()), sha256=file_hash(data))}
    if eval_data:
        datasets["eval"] = DatasetRef(path=str(Path(eval_data).resolve()), sha256=file_hash(eval_data))
    kept = (
        dict(keep_files)
        if keep_files is not None
        else {
            f"data/train{Path(data).suffix or '.json'}": Path(data),
            **({f"data/eval{Path(eval_data).suffix or '.json'}": Path(eval_data)} if eval_data else {}),
        }
    )
    kept.update({f"eval/{Path(suite).name}": Path(suite) for suite in eval_suites})
    return TrainingData(examples, quality, datasets, kept, eval_examples)


@contextlib.contextmanager
def stage_version(
    config: TrainConfig,
    data: TrainingData,
    *,
    model: str | None = None,
    outtype: str = "f32",
    max_steps: int | None = None,
    progress: bool = True,
    work_dir: Path | None = None,
    callbacks: tuple = (),
    manifest_extra: dict | None = None,
    init_adapter: Path | None = None,
    launch: Launch | None = None,
) -> Iterator[StagedVersion]:
    """Train and convert a version in a staging folder, and yield it; the folder is gone after the block unless
    publish_staged moved it into the store, so the store changes only by that final rename.

    Without `work_dir`, checkpoints go to a temporary folder that is removed after training. With one (a
    job's folder), they stay there, and a run in the same folder resumes from the newest checkpoint.
    With `init_adapter` (a PEFT folder), training continues from its weights. With a `launch` of several
    processes, torchrun trains on them (training.distributed); only its rank 0 writes into the staging folder.
    """
    paths.enforce_offline()
    base = model_store.get(model or config.model_name)
    examples, eval_examples = data.examples, data.eval_examples
    share = config.training_config.validation_split
    if eval_examples is None and share:
        examples, eval_examples = split_validation(examples, share, config.training_config.seed)
    root = adapter_store.root_for_output_dir(config.output_dir)
    parent = adapter_store.active_version(root)
    paths.state_dir().mkdir(parents=True, exist_ok=True)
    with adapter_store.new_staging(root) as stage:
        work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="train-", dir=paths.state_dir()))
        try:
            result = train(
                config,
                base,
                examples,
                stage,
                work,
                eval_examples=eval_examples,
                max_steps=max_steps,
                progress=progress,
                resume=work_dir is not None,
                callbacks=callbacks,
                init_adapter=init_adapter,
                launch=launch,
            )
        finally:
            if work_dir is None:
                shutil.rmtree(work, ignore_errors=True)
        started = datetime.now(timezone.utc)
        layout = layout_from_gguf(base.gguf_path)
        conversion = adapter_gguf(stage, base, layout, stage / adapter_store.GGUF_NAME, outtype)
        convert_seconds = (datetime.now(timezone.utc) - started).total_seconds()
        metrics = {
            **result.metrics,
            "examples": result.n_examples,
            "tokens": result.n_tokens,
            "truncated_examples": result.n_truncated,
            "tokens_trained": result.tokens_trained,
            "train_seconds": result.seconds,
            "convert_seconds": convert_seconds,
            "concepts": result.concepts,
            "concept_loss": result.concept_loss,
        }
        manifest = Manifest(
            adapter=root.name,
            base=BaseRef(name=base.name, fingerprint=base.fingerprint, gguf=base.gguf),
            parent_version=parent,
            datasets=data.datasets,
            config=config.model_dump(mode="json"),
            metrics=Metrics.model_validate(metrics),
            gguf=GgufInfo(
                outtype=outtype,
                alpha=conversion.alpha,
                rank=conversion.rank,
                modules=conversion.n_modules,
                size_bytes=conversion.path.stat().st_size,
            ),
            data_quality=data.quality.as_dict(),
            eval=None,  # written as null: a caller that evaluates the staged version fills it in before publishing
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # update, job_id, fine_tuned_model: validated into their fields
            **(manifest_extra or {}),
        )
        write_report(
            ReportInputs(
                adapter=root.name,
                base=base.name,
                history=result.log_history,
                config=manifest.config,
                dataset_sha256=data.datasets["train"].sha256,
                examples=result.n_examples,
                tokens=result.n_tokens,
                seconds=result.seconds,
                train_seconds=result.train_seconds,
                tokens_trained=result.tokens_trained,
                learning_rates=result.learning_rates,
                peak_rss_mb=_peak_rss_mb(),
                adapter_mb=conversion.path.stat().st_size / 1e6,
                nuclear_mb=_nuclear_mb(layout),
                concept_loss=result.concept_loss,
                concept_loss_on=(
                    "eval data"
                    if data.eval_examples is not None
                    else f"the {len(eval_examples)} held-out examples"
                    if eval_examples
                    else "training data"
                ),
            ),
            stage,
        )
        for relative, source in data.keep_files.items():
            (stage / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, stage / relative)
        yield StagedVersion(root, stage, manifest, result.seconds, convert_seconds, data.quality.warnings)


def publish_staged(staged: StagedVersion, *, activate: bool = True) -> adapter_store.AdapterVersion:
    """Seal the staged version's manifest (with every file's hash) and move it into the store as the next vN;
    with `activate`, it becomes the live version."""
    manifest = staged.manifest
    manifest.files = {
        str(p.relative_to(staged.stage)): sha256_file(p) for p in sorted(staged.stage.rglob("*")) if p.is_file()
    }
    manifest.report = "report.md"
    write_manifest(staged.stage / adapter_store.MANIFEST_NAME, manifest)
    return adapter_store.publish(staged.root, staged.stage, activate=activate)


def train_and_publish(
    config: TrainConfig,
    data: Path,
    *,
    eval_data: Path | None = None,
    model: str | None = None,
    outtype: str = "f32",
    max_steps: int | None = None,
    progress: bool = True,
    work_dir: Path | None = None,
    callbacks: tuple = (),
    manifest_extra: dict | None = None,
    init_adapter: Path | None = None,
    keep_files: dict[str, Path] | None = None,
    eval_suites: tuple[Path, ...] = (),
    on_warnings: Callable[[list[Finding]], None] | None = None,
    launch: Launch | None = None,
    preserve: PreservationSettings | None = PreservationSettings(),
) -> PipelineResult:
    """Train on a file and publish the result as the new live version (`scalpel train`, training jobs).

    `keep_files` ({"data/train.json": path, ...}) are copied into the version (by default the training and
    eval data), so later updates can replay them; `eval_suites` are copied into its eval/ folder, so later
    updates check that this version's knowledge is retained. Without any, a suite derived from the training
    data is kept instead (scalpel.evaluate.derive_suite). With `preserve` (None: off), the base's own answers
    to general prompts are mixed into training, as in every update (scalpel.preservation). Before it is
    published, the version is evaluated through llama.cpp on its suites, the general questions and base
    regression: its manifest's "eval" and its report say how it does.
    """
    paths.enforce_offline()
    base = model_store.get(model or config.model_name)  # an unknown base is reported before the data is read
    training_data = read_training_data(data, eval_data, keep_files, eval_suites)
    if on_warnings is not None and training_data.quality.warnings:
        on_warnings(training_data.quality.warnings)  # before the work they are about, not after it
    suites, derived = evaluate.version_suites(eval_suites, training_data.examples, Path(data))
    kept = preservation.record(None)
    if preserve is not None:
        pool = preservation.base_pool(base, progress=progress)
        mixed = preservation.with_preservation(config, training_data.examples, pool, preserve)
        config, kept = mixed.config, mixed.record
        training_data = dataclasses.replace(training_data, examples=mixed.examples)
    manifest_extra = {"preservation": kept, **(manifest_extra or {})}
    with stage_version(
        config,
        training_data,
        model=model,
        outtype=outtype,
        max_steps=max_steps,
        progress=progress,
        work_dir=work_dir,
        callbacks=callbacks,
        manifest_extra=manifest_extra,
        init_adapter=init_adapter,
        launch=launch,
    ) as staged:
        if derived is not None:
            evaluate.write_suite(staged.stage / "eval" / f"{derived}.json", suites[derived])
        judged = evaluate.judge_staged(
            base, staged.version, suites, progress=progress, preservation=preservation.described(kept)
        )
        # Live at once, with no gate to pass: "promoted" as readers of an update's evaluation expect it, and
        # "first_version" to say why no gate was applied (nor any retention: there is nothing earlier).
        staged.manifest.eval = {**judged.as_dict(), "promoted": True, "reasons": [], "first_version": True}
        version = publish_staged(staged)
    return PipelineResult(version, staged.manifest, staged.train_seconds, staged.convert_seconds, staged.warnings)
