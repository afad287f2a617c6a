"""What a request's `model` names: the base, an adapter, a version or a fine-tune, and the list /v1/models shows.

The names, in the order they are tried:
- `<base>`: the base; with attach_on_load, the adapter attached to it by POST /api/adapters/{name}/load;
- `<base>@base`: always the bare base, attached adapter or not;
- `ft:<base>:<suffix>:<job id>`: a fine-tuning job's adapter, and `...:ckpt-step-<N>` one of its checkpoints
  (core.checkpoints), until the job is deleted;
- `<adapter>`: the adapter's live version, and `<adapter>@v<N>` a pinned version.
"""

from __future__ import annotations

import contextlib

from core import adapter_store, checkpoints
from core.errors import ConflictError, NotFoundError, ScalpelError
from serving.context import ServingContext
from serving.engine import AdapterSet
from serving.schemas import AdapterChoice

BARE = "@base"  # `<base>@base`: no adapter name can hold an '@', and no version is called "base"


def bare_name(ctx: ServingContext) -> str:
    """The name that always selects the bare base."""
    return f"{ctx.engine.base.name}{BARE}"


def fine_tuned(model: str) -> adapter_store.AdapterVersion:
    """`ft:<base>:<suffix>:<job id>`, the id a finished fine-tuning job reports, names that job's adapter;
    `ft:...:<job id>:ckpt-step-<N>`, as checkpoints.list reports it, one of the job's kept checkpoints."""
    if checkpoints.is_checkpoint_id(model):
        return checkpoints.resolve(model)
    version = adapter_store.resolve(model.rsplit(":", 1)[-1])
    if version.manifest.fine_tuned_model != model:
        raise NotFoundError(f"no fine-tuned model {model!r}", param="model", code="model_not_found")
    return version


def attached(ctx: ServingContext) -> adapter_store.AdapterVersion | None:
    """The version the base's name applies now (attach_on_load), or None for the bare base."""
    if ctx.attached is None:
        return None
    try:
        return adapter_store.resolve(ctx.attached)
    except NotFoundError as exc:
        raise ConflictError(
            f"{ctx.engine.base.name!r} serves the attached adapter {ctx.attached!r}, which is gone "
            f"({exc.message}): load another adapter or unload it; {bare_name(ctx)!r} is the bare base",
            param="model",
            code="attached_adapter_unavailable",
        ) from exc


def adapter_set(ctx: ServingContext, model: str, extra: list[AdapterChoice] | None) -> AdapterSet:
    """The request's `model` (base, base@base, adapter, adapter@vN or ft:...) plus any stacked `adapters`."""
    engine = ctx.engine
    chosen: list[tuple[str, float]] = []
    version: adapter_store.AdapterVersion | None = None
    if model == engine.base.name:
        version = attached(ctx)
    elif model != bare_name(ctx):
        try:
            version = fine_tuned(model) if model.startswith("ft:") else adapter_store.resolve(model)
        except NotFoundError as exc:
            raise NotFoundError(
                f"the model {model!r} does not exist ({exc.message}): use {engine.base.name!r}, "
                f"{bare_name(ctx)!r} or one of the adapters {adapter_store.list_adapters()}",
                param="model",
                code="model_not_found",
            ) from exc
    if version is not None:
        chosen.append((engine.load(version), ctx.default_scales.get(version.name, 1.0)))
    for choice in extra or []:
        chosen.append((engine.load(adapter_store.resolve(choice.name)), choice.scale))
    return tuple(chosen)


def model_card(ctx: ServingContext, model_id: str, owned_by: str, adapter: str | None = None) -> dict:
    """`adapter`: the version the name applies (NAME@vN), None for the bare base."""
    return {"id": model_id, "object": "model", "created": ctx.started, "owned_by": owned_by, "adapter": adapter}


def all_models(ctx: ServingContext) -> list[dict]:
    base = ctx.engine.base.name
    on_base = None
    with contextlib.suppress(ScalpelError, OSError, ValueError):
        on_base = version.ref if (version := attached(ctx)) else None
    cards = [model_card(ctx, base, "scalpel", on_base), model_card(ctx, bare_name(ctx), "scalpel")]
    for name in adapter_store.list_adapters():
        root = adapter_store.root_for_name(name)
        live = ft_id = None
        with contextlib.suppress(ScalpelError, OSError, ValueError):  # damaged since list_adapters looked
            version = adapter_store.resolve(name)
            live, ft_id = version.ref, version.manifest.fine_tuned_model
        cards.append(model_card(ctx, name, "scalpel-adapter", live))
        if ft_id:
            cards.append(model_card(ctx, ft_id, "scalpel-fine-tune", live))
        cards.extend(
            model_card(ctx, f"{name}@{v}", "scalpel-adapter", f"{name}@{v}") for v in adapter_store.versions(root)
        )
    cards.extend(model_card(ctx, model_id, "scalpel-checkpoint", ref) for model_id, ref in checkpoints.listed())
    return cards
