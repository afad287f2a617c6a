"""The plan's adapter routes (/api/adapters/...): list, load, promote, roll back, diff, delete and unload.

With the server setting attach_on_load, load also attaches the adapter to the base's name (the plan's flow:
load, then chat with `"model": "<base>"`), and unload detaches it; serving.model_names reads the attachment.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends

from core import adapter_store, version_diff
from core.errors import NotFoundError
from serving.auth import admin_key
from serving.context import ServingContext, context
from serving.model_names import bare_name
from serving.responses import (
    AdapterDetail,
    AdapterDiff,
    AdapterList,
    AdapterLoaded,
    AdapterSwitched,
    AdapterUnloaded,
    VersionDeleted,
)
from serving.schemas import LoadAdapterRequest, RollbackRequest, VersionRequest

router = APIRouter(prefix="/api/adapters", dependencies=[Depends(admin_key)])


def adapter_info(ctx: ServingContext, name: str, problems: list[str] | None = None) -> dict:
    """One adapter as listed; a damaged one is listed too, unavailable, with what is wrong."""
    root = adapter_store.root_for_name(name)
    problems = adapter_store.problems(name) if problems is None else problems
    if problems == [adapter_store.NO_LIVE_VERSION] or not root.is_dir():
        raise NotFoundError(f"adapter {name!r} is not in the store", param="name", code="adapter_not_found")
    loaded = set(ctx.engine.loaded())
    try:
        live = adapter_store.active_version(root)
    except adapter_store.StoreDamage:
        live = None
    return {
        "name": name,
        "active_version": live,
        "versions": adapter_store.versions(root),
        "loaded_versions": sorted(r.split("@")[1] for r in loaded if r.split("@")[0] == name),
        "scale": ctx.default_scales.get(name, 1.0),
        "available": not problems,
        "problem": "; ".join(problems) or None,
        "attached_to": ctx.engine.base.name if _attached_name(ctx) == name else None,
    }


def _attached_name(ctx: ServingContext) -> str | None:
    return ctx.attached.partition("@")[0] if ctx.attached else None


def _listed() -> list[tuple[str, list[str]]]:
    """Every adapter with a live version or a damaged pointer, and what is wrong with it."""
    listed = [(name, adapter_store.problems(name)) for name in adapter_store.entries()]
    return [(name, found) for name, found in listed if found != [adapter_store.NO_LIVE_VERSION]]


@router.get("", responses={200: {"model": AdapterList}})
def list_adapters(ctx: ServingContext = Depends(context)):
    return {"object": "list", "data": [adapter_info(ctx, name, found) for name, found in _listed()]}


@router.get("/{name}", responses={200: {"model": AdapterDetail}})
def get_adapter(name: str, ctx: ServingContext = Depends(context)):
    info = adapter_info(ctx, name)
    info["manifest"] = adapter_store.resolve(name).manifest.to_json()  # the JSON keys of manifest.json
    return info


@router.post("/{name}/load", responses={200: {"model": AdapterLoaded}})
async def load_adapter(name: str, body: LoadAdapterRequest | None = None, ctx: ServingContext = Depends(context)):
    body = body or LoadAdapterRequest()
    version = adapter_store.resolve(name if not body.version else f"{name}@{body.version}")
    loaded_ref = await anyio.to_thread.run_sync(ctx.engine.load, version)
    ctx.default_scales[name] = body.scale
    if ctx.settings.attach_on_load:
        # The base's name follows the adapter's live version, or keeps the version the load pinned.
        ctx.attached = f"{name}@{body.version}" if body.version else name
    return {
        "name": name,
        "version": version.version,
        "ref": loaded_ref,
        "loaded": True,
        "scale": body.scale,
        "size_bytes": version.gguf.stat().st_size,
        "attached_to": ctx.engine.base.name if ctx.settings.attach_on_load else None,
        "bare_base": bare_name(ctx),
    }


@router.post("/{name}/promote", responses={200: {"model": AdapterSwitched}})
async def promote_adapter(name: str, body: VersionRequest, ctx: ServingContext = Depends(context)):
    previous = await anyio.to_thread.run_sync(adapter_store.promote, name, body.version)
    return {**adapter_info(ctx, name), "previous_version": previous}


@router.post("/{name}/rollback", responses={200: {"model": AdapterSwitched}})
async def rollback_adapter(name: str, body: RollbackRequest | None = None, ctx: ServingContext = Depends(context)):
    before, _ = await anyio.to_thread.run_sync(adapter_store.rollback, name, body.to if body else None)
    return {**adapter_info(ctx, name), "previous_version": before}


@router.get("/{name}/diff", responses={200: {"model": AdapterDiff}})
async def diff_adapter(name: str, a: str, b: str):
    return await anyio.to_thread.run_sync(version_diff.diff, name, a, b)


@router.delete("/{name}/versions/{version}", responses={200: {"model": VersionDeleted}})
async def delete_adapter_version(name: str, version: str, ctx: ServingContext = Depends(context)):
    await anyio.to_thread.run_sync(adapter_store.delete_version, name, version)
    for ref in [r for r in ctx.engine.loaded() if r == f"{name}@{version}"]:
        await anyio.to_thread.run_sync(ctx.engine.unload, ref)
    if ctx.attached == f"{name}@{version}":
        ctx.attached = None
    return {"name": name, "version": version, "deleted": True}


@router.post("/{name}/unload", responses={200: {"model": AdapterUnloaded}})
async def unload_adapter(name: str, body: LoadAdapterRequest | None = None, ctx: ServingContext = Depends(context)):
    version = body.version if body else None
    refs = [r for r in ctx.engine.loaded() if r.split("@")[0] == name and (not version or r.endswith(f"@{version}"))]
    # Detached when it is this adapter, unless the attachment pins another version than the one unloaded.
    detach = _attached_name(ctx) == name and (not version or ctx.attached in (name, f"{name}@{version}"))
    if not refs and not detach:
        raise NotFoundError(f"adapter {name!r} is not loaded", param="name", code="adapter_not_loaded")
    for ref in refs:
        await anyio.to_thread.run_sync(ctx.engine.unload, ref)
    if detach:
        ctx.attached = None
    return {"name": name, "unloaded": refs, "detached_from": ctx.engine.base.name if detach else None}
