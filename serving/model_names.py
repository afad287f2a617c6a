"""What a request's `model` names: the base, an adapter, a version or a fine-tune, and the list /v1/models shows."""

from __future__ import annotations

import contextlib

from core import adapter_store
from core.errors import NotFoundError, ScalpelError
from serving.context import ServingContext
from serving.engine import AdapterSet
from serving.schemas import AdapterChoice


def fine_tuned(model: str) -> adapter_store.AdapterVersion:
    """`ft:<base>:<suffix>:<job id>`, the id a finished fine-tuning job reports, names that job's adapter."""
    version = adapter_store.resolve(model.rsplit(":", 1)[-1])
    if version.manifest.fine_tuned_model != model:
        raise NotFoundError(f"no fine-tuned model {model!r}", param="model", code="model_not_found")
    return version


def adapter_set(ctx: ServingContext, model: str, extra: list[AdapterChoice] | None) -> AdapterSet:
    """The request's `model` (base, adapter, adapter@vN or ft:...) plus any stacked `adapters`."""
    engine = ctx.engine
    chosen: list[tuple[str, float]] = []
    if model != engine.base.name:
        try:
            version = fine_tuned(model) if model.startswith("ft:") else adapter_store.resolve(model)
        except NotFoundError as exc:
            raise NotFoundError(
                f"the model {model!r} does not exist ({exc.message}): use "
                f"{engine.base.name!r} or one of the adapters {adapter_store.list_adapters()}",
                param="model",
                code="model_not_found",
            ) from exc
        chosen.append((engine.load(version), ctx.default_scales.get(version.name, 1.0)))
    for choice in extra or []:
        chosen.append((engine.load(adapter_store.resolve(choice.name)), choice.scale))
    return tuple(chosen)


def model_card(ctx: ServingContext, model_id: str, owned_by: str) -> dict:
    return {"id": model_id, "object": "model", "created": ctx.started, "owned_by": owned_by}


def all_models(ctx: ServingContext) -> list[dict]:
    cards = [model_card(ctx, ctx.engine.base.name, "scalpel")]
    for name in adapter_store.list_adapters():
        cards.append(model_card(ctx, name, "scalpel-adapter"))
        root = adapter_store.root_for_name(name)
        with contextlib.suppress(ScalpelError, OSError, ValueError):
            if ft_id := adapter_store.resolve(name).manifest.fine_tuned_model:
                cards.append(model_card(ctx, ft_id, "scalpel-fine-tune"))
        cards.extend(model_card(ctx, f"{name}@{v}", "scalpel-adapter") for v in adapter_store.versions(root))
    return cards
