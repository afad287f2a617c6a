"""Bring an adapter trained elsewhere into the store: a PEFT folder (converted here) or a GGUF LoRA, checked
against the base and published as a new version, with a manifest that says where it came from.

What is accepted, by content rather than by name:
- a PEFT LoRA folder with adapter_config.json and adapter_model.safetensors (safetensors only: a pickled
  adapter_model.bin is refused). It is converted with the same conversion as a trained version
  (scalpel.publish.adapter_gguf: every module is checked against the base's tensor shapes, and the base's
  fingerprint is stamped into the GGUF), and the PEFT files are kept beside the GGUF;
- a GGUF LoRA adapter file (llama.cpp's convert_lora_to_gguf.py, `scalpel convert lora`, Ollama's ADAPTER):
  checked as `scalpel inspect FILE --base BASE` checks it (conversion.inspect_gguf.check_adapter) and
  stored byte for byte;
- a .zip holding one PEFT folder (its two files, at the top or in one folder), which is how an HTTP upload
  carries a folder.

With `verify`, a PEFT adapter's logits are also compared between PyTorch (transformers + PEFT) and
llama.cpp (conversion.verify), as `scalpel convert lora --verify` does; that loads the base in PyTorch.

The version is assembled in a staging folder and published with publish_staged, like a trained one: a
failed import leaves the store as it was.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from conversion.architecture import BaseLayout, layout_from_gguf
from conversion.inspect_gguf import check_adapter
from core import adapter_store, model_store, paths
from core.atomic import sha256_file
from core.errors import NotFoundError, ScalpelError
from core.gguf_meta import read_gguf
from core.manifest import BaseRef, GgufInfo, ImportSource, Manifest
from scalpel.publish import StagedVersion, adapter_gguf, publish_staged

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
GGUF_MAGIC, ZIP_MAGIC = b"GGUF", b"PK\x03\x04"
MAX_UNZIPPED_BYTES = 8 * 2**30  # a zip's two PEFT files together; more is not an adapter but a zip bomb


@dataclass
class Imported:
    version: adapter_store.AdapterVersion
    manifest: Manifest
    live: bool  # whether it became the live version


def detect(path: Path) -> str:
    """'peft', 'gguf' or 'zip', from what the path holds; anything else is refused with what is accepted."""
    path = Path(path)
    if path.is_dir():
        return "peft"
    if not path.is_file():
        raise NotFoundError(f"{paths.shown(path)} does not exist", param="path", code="file_not_found")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return "gguf"
    if magic == ZIP_MAGIC:
        return "zip"
    raise ScalpelError(
        f"{paths.shown(path)} is neither a GGUF LoRA adapter, nor a PEFT folder, nor a zip of a PEFT folder",
        param="path",
        code="unsupported_adapter",
    )


def import_adapter(
    name: str,
    path: Path,
    *,
    base: str,
    source: str | None = None,
    verify: bool = False,
    promote: bool = True,
) -> Imported:
    """Import `path` as the next version of adapter `name` for the registered base `base`.

    `source` is what the manifest records as the origin (default: the path); the new version becomes live
    with `promote`, and always when the adapter has no live version yet."""
    paths.check_name(name, "adapter")
    kind = detect(path)
    try:
        entry = model_store.get(base)
    except NotFoundError as exc:
        raise NotFoundError(exc.message, param="base", code="model_not_found") from exc
    shown_source = source or str(path)
    if kind == "zip":
        with _unzipped(Path(path)) as folder:
            return _import_peft(name, folder, entry, shown_source, verify, promote)
    if kind == "peft":
        return _import_peft(name, Path(path), entry, shown_source, verify, promote)
    if verify:
        raise ScalpelError(
            "verify compares PyTorch with llama.cpp and needs the PEFT weights; a GGUF adapter is checked "
            "against the base's tensors instead",
            param="verify",
        )
    return _import_gguf(name, Path(path), entry, shown_source, promote)


def _check_peft_folder(folder: Path) -> dict:
    if not (folder / PEFT_WEIGHTS).is_file():
        pickled = " (adapter_model.bin is refused: pickles can run code; save with safe_serialization)"
        raise ScalpelError(
            f"{paths.shown(folder)} has no {PEFT_WEIGHTS}: only safetensors PEFT adapters can be imported"
            + (pickled if (folder / "adapter_model.bin").exists() else ""),
            param="path",
            code="unsupported_adapter",
        )
    if not (folder / PEFT_CONFIG).is_file():
        raise ScalpelError(f"{paths.shown(folder)} has no {PEFT_CONFIG}: not a PEFT adapter", param="path")
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScalpelError(
            f"{paths.shown(folder / PEFT_CONFIG)} is not valid JSON", param="path", code="invalid_adapter"
        ) from exc
    if not isinstance(config, dict):
        raise ScalpelError(f"{paths.shown(folder / PEFT_CONFIG)} must be a JSON object", param="path")
    return config


def _import_peft(
    name: str, folder: Path, entry: model_store.ModelEntry, source: str, verify: bool, promote: bool
) -> Imported:
    config = _check_peft_folder(folder)
    layout = layout_from_gguf(entry.gguf_path)
    with _staging(name) as (root, stage):
        gguf_file = stage / adapter_store.GGUF_NAME
        begun = datetime.now(timezone.utc)
        conversion = adapter_gguf(folder, entry, layout, gguf_file)  # refuses a module the base does not fit
        convert_seconds = (datetime.now(timezone.utc) - begun).total_seconds()
        _require_fit(gguf_file, layout, entry)
        for file_name in (PEFT_CONFIG, PEFT_WEIGHTS):
            shutil.copyfile(folder / file_name, stage / file_name)
        report = _verify(entry, stage, gguf_file) if verify else None
        base_model = config.get("base_model_name_or_path")
        origin = ImportSource(
            format="peft",
            source=source,
            sha256=sha256_file(folder / PEFT_WEIGHTS),
            base_model=base_model if isinstance(base_model, str) else None,
            verify=report,
        )
        info = GgufInfo(
            outtype="f32",
            alpha=conversion.alpha,
            rank=conversion.rank,
            modules=conversion.n_modules,
            size_bytes=gguf_file.stat().st_size,
        )
        return _publish(root, stage, entry, origin, info, convert_seconds, promote)


def _import_gguf(name: str, path: Path, entry: model_store.ModelEntry, source: str, promote: bool) -> Imported:
    layout = layout_from_gguf(entry.gguf_path)
    info = _require_fit(path, layout, entry)
    pairs = [t for n, t in info.tensors.items() if n.endswith(".lora_a")]
    rank = pairs[0].ne[1]
    alpha = float(info.metadata.get("adapter.lora.alpha", rank))
    types = sorted({t.type.lower() for t in info.tensors.values()})
    with _staging(name) as (root, stage):
        shutil.copyfile(path, stage / adapter_store.GGUF_NAME)
        origin = ImportSource(format="gguf", source=source, sha256=sha256_file(path))
        gguf_info = GgufInfo(
            outtype="+".join(types),
            alpha=alpha,
            rank=rank,
            modules=len(pairs),
            size_bytes=path.stat().st_size,
        )
        return _publish(root, stage, entry, origin, gguf_info, 0.0, promote)


def _require_fit(gguf_file: Path, layout: BaseLayout, entry: model_store.ModelEntry):
    """What `scalpel inspect FILE --base BASE` checks: a LoRA, of the base's architecture, whose every pair fits."""
    info = read_gguf(gguf_file, with_tokens=False)
    fit = check_adapter(info, layout, entry.fingerprint)
    if not fit.compatible:
        raise ScalpelError(
            f"the adapter does not fit the base {entry.name!r}: {'; '.join(fit.problems[:5])}"
            + (f" (and {len(fit.problems) - 5} more)" if len(fit.problems) > 5 else ""),
            param="base",
            code="base_mismatch",
        )
    return info


def _verify(entry: model_store.ModelEntry, stage: Path, gguf_file: Path) -> dict:
    """PyTorch with PEFT against llama.cpp with the converted GGUF, on the same prompts (conversion.verify)."""
    from conversion.verify import verify
    from training.base_model import load_model, load_tokenizer

    report = verify(load_model(entry), load_tokenizer(entry), entry.gguf_path, peft_dir=stage, adapter_gguf=gguf_file)
    if not report.passed:
        raise ScalpelError(
            f"verification failed: {report.criterion} not met (max abs {report.max_abs:.3g}, top-1 agreement "
            f"{report.top1:.1%}): the converted adapter does not reproduce the PEFT one on this base",
            param="verify",
            code="verify_failed",
        )
    return report.as_dict()


@contextlib.contextmanager
def _staging(name: str) -> Iterator[tuple[Path, Path]]:
    """The adapter's folder and a staging folder in it; a failure removes both if the folder is new."""
    root = adapter_store.root_for_name(name)
    new_root = not root.exists()
    try:
        with adapter_store.new_staging(root) as stage:
            yield root, stage
    except BaseException:
        if new_root:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if empty: another process may have published into it meanwhile
        raise


def _publish(
    root: Path,
    stage: Path,
    entry: model_store.ModelEntry,
    origin: ImportSource,
    gguf: GgufInfo,
    convert_seconds: float,
    promote: bool,
) -> Imported:
    parent = adapter_store.active_version(root)
    manifest = Manifest(
        adapter=root.name,
        base=BaseRef(name=entry.name, fingerprint=entry.fingerprint, gguf=entry.gguf),
        parent_version=parent,
        gguf=gguf,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        imported_from=origin,
    )
    (stage / "report.md").write_text(_report(root.name, entry, origin, gguf), encoding="utf-8")
    staged = StagedVersion(root, stage, manifest, 0.0, convert_seconds, [])
    live = promote or parent is None
    version = publish_staged(staged, activate=live)
    return Imported(version, manifest, live)


def _report(name: str, entry: model_store.ModelEntry, origin: ImportSource, gguf: GgufInfo) -> str:
    lines = [
        f"# {name}: imported adapter",
        "",
        f"- source: {origin.source} ({origin.format}, sha256 {origin.sha256})",
        f"- base: {entry.name} (fingerprint {entry.fingerprint[:12]})"
        + (f"; the PEFT config names {origin.base_model}" if origin.base_model else ""),
        f"- adapter: rank {gguf.rank}, alpha {gguf.alpha:g}, {gguf.modules} modules, {gguf.size_bytes / 1e6:.2f} MB",
        "- checks: every LoRA pair fits a tensor of the base (shapes, architecture, fingerprint)",
    ]
    if origin.verify:
        v = origin.verify
        lines.append(
            f"- verify: {v['criterion']}: max abs {v['max_abs']:.3g}, top-1 agreement {v['top1']:.1%} (passed)"
        )
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _unzipped(archive: Path) -> Iterator[Path]:
    """The PEFT folder in a zip, extracted to a private folder: only its two files, whatever else it holds.

    Hand-rolled rather than ZipFile.extractall, which would write every member (and any path in it)."""
    try:
        with zipfile.ZipFile(archive) as z:
            members = {Path(i.filename).name: i for i in z.infolist() if not i.is_dir()}
            wanted = [members.get(n) for n in (PEFT_CONFIG, PEFT_WEIGHTS)]
            folders = {str(Path(i.filename).parent) for i in wanted if i is not None}
            if None in wanted or len(folders) != 1:
                raise ScalpelError(
                    f"the zip must hold one PEFT folder: {PEFT_CONFIG} and {PEFT_WEIGHTS}, side by side",
                    param="file_id",
                    code="unsupported_adapter",
                )
            if sum(i.file_size for i in wanted if i is not None) > MAX_UNZIPPED_BYTES:
                raise ScalpelError("the zip's PEFT files are too large", param="file_id", code="unsupported_adapter")
            paths.state_dir().mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="import-", dir=paths.state_dir()) as tmp:
                for info in wanted:
                    assert info is not None
                    with z.open(info) as src, (Path(tmp) / Path(info.filename).name).open("wb") as out:
                        shutil.copyfileobj(src, out)
                yield Path(tmp)
    except zipfile.BadZipFile as exc:
        raise ScalpelError(
            f"{paths.shown(archive)} is not a readable zip ({exc})", param="file_id", code="invalid_adapter"
        ) from exc
