"""The dashboard at /ui: a static page (ours, no CDN) and the read-only JSON it draws from.

The page itself (index.html, app.js, style.css) holds no data and is served to anyone, as a browser cannot
send a Bearer header when it opens a URL. Everything it shows comes from /ui/api/..., behind the client-key
rule of the inference routes (serving.auth.client_key): the page sends the key the user typed in (kept in
sessionStorage). Promote and rollback are not here: the page calls the adapter routes
(POST /api/adapters/{name}/promote, /rollback) with that key, the same API and auth as the CLI.

Plots and reports are served by adapter name, version and a fixed file name only, from the store.
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources
from typing import Any

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response

from core import adapter_store, model_store, paths
from core.errors import NotFoundError, ScalpelError
from core.job_store import JobStore
from scalpel.jobs.responses import DashboardState
from scalpel.jobs.routes import plan_job_view
from serving.auth import client_key
from serving.context import ServingContext, context
from serving.model_names import all_models

STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
PLOTS = ("loss.png", "lr.png", "concepts.png", "eval.png")
UPDATE_LOG_LINES = 200
JOBS_SHOWN = 20


def _static(name: str) -> FileResponse:
    path = resources.files("scalpel.ui") / "static" / name
    return FileResponse(str(path), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


def _version(name: str, version: str) -> adapter_store.AdapterVersion:
    """A stored version by name and vN only: check_name and the version pattern keep paths out."""
    root = adapter_store.root_for_name(name)
    if not adapter_store.VERSION_PATTERN.match(version) or version not in adapter_store.versions(root):
        raise NotFoundError(f"adapter {name!r} has no version {version!r}", param="version", code="version_not_found")
    return adapter_store.AdapterVersion(name, version, root / version)


def _eval_view(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gate's evaluation without the answers: scores, retention, base agreement and the decision."""
    if not raw:
        return None
    base = raw.get("base_regression") or None
    return {
        "suites": {
            suite: {"accuracy": s.get("accuracy"), "per_concept": s.get("per_concept") or {}}
            for suite, s in (raw.get("suites") or {}).items()
        },
        "retention": raw.get("retention") or {},
        "base_regression": {k: base.get(k) for k in ("agreement", "perplexity_change", "perplexity")} if base else None,
        "promoted": raw.get("promoted"),
        "reasons": raw.get("reasons") or [],
        "live_before": raw.get("live_before"),
        # The general questions with known answers, as counts (their answers stay out, as the suites' do).
        "general": {k: (raw.get("general") or {}).get(k) for k in ("passed", "base_passed", "total")}
        if raw.get("general")
        else None,
        "first_version": bool(raw.get("first_version")),  # published live with nothing earlier to gate against
    }


def _version_view(version: adapter_store.AdapterVersion) -> dict[str, Any]:
    view: dict[str, Any] = {"version": version.version, "problems": adapter_store.version_problems(version)}
    try:
        m = version.manifest
    except ScalpelError as exc:
        return {**view, "problems": [exc.message]}
    return {
        **view,
        "parent_version": m.parent_version,
        "created_at": m.created_at,
        "base": m.base.name if m.base else None,
        "final_loss": m.metrics.final_loss,
        "steps": m.metrics.global_step,
        "examples": m.metrics.examples,
        "job_id": m.job_id,
        "update_from": m.update.from_ if m.update else None,
        "eval": _eval_view(m.eval),
        "plots": [p for p in PLOTS if (version.path / p).is_file()],
        "report": bool(m.report) and (version.path / "report.md").is_file(),
    }


def _adapter_view(name: str) -> dict[str, Any]:
    root = adapter_store.root_for_name(name)
    live: str | None = None
    history: list[dict] = []
    with contextlib.suppress(adapter_store.StoreDamage):
        live = adapter_store.active_version(root)
        history = adapter_store.activation_history(root)
    found = adapter_store.problems(name)
    return {
        "name": name,
        "live": live,
        "available": not found,
        "problem": "; ".join(p for p in found if p != adapter_store.NO_LIVE_VERSION) or None,
        "history": history,
        "versions": [
            _version_view(adapter_store.AdapterVersion(name, v, root / v)) for v in adapter_store.versions(root)
        ],
    }


def _updates() -> list[dict]:
    """The evening update log (.scalpel/updates.jsonl), newest first; a damaged line is skipped."""
    log = paths.state_dir() / "updates.jsonl"
    if not log.is_file():
        return []
    out = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines()[-UPDATE_LOG_LINES:]:
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                out.append(entry)
    return out[::-1]


def _jobs(store: JobStore | None) -> list[dict]:
    if store is None:
        return []
    views = []
    for job in store.list(limit=JOBS_SHOWN):
        view = plan_job_view(store, job, history=job.status == "running")
        view.pop("config", None)
        views.append(view)
    return views


def state(ctx: ServingContext, store: JobStore | None) -> dict[str, Any]:
    serving = ctx.engine.base.name
    return {
        "serving": serving,
        "bases": [
            {
                "name": b.name,
                "format": b.format,
                "architecture": b.architecture,
                "fingerprint": b.fingerprint[:12],
                "created_at": b.created_at,
                "serving": b.name == serving,
            }
            for b in model_store.list_models()
        ],
        "adapters": [_adapter_view(name) for name in adapter_store.entries()],
        "updates": _updates(),
        "jobs": _jobs(store),
        "jobs_served": store is not None,
        "models": [card["id"] for card in all_models(ctx)],
        "loaded": ctx.engine.loaded(),
    }


def ui_router(store: JobStore | None = None) -> APIRouter:
    """The page and its API. `store` is the job store the server runs (scalpel serve); None: no jobs shown."""
    router = APIRouter(include_in_schema=False)
    client = [Depends(client_key)]

    @router.get("/ui", response_class=HTMLResponse)
    @router.get("/ui/", response_class=HTMLResponse)
    def index():
        return _static("index.html")

    @router.get("/ui/static/{file}")
    def static(file: str):
        if file not in STATIC:
            raise NotFoundError(f"no file {file!r}", param="file", code="not_found")
        return _static(file)

    @router.get("/ui/api/state", dependencies=client, responses={200: {"model": DashboardState}})
    async def get_state(ctx: ServingContext = Depends(context)):
        return await anyio.to_thread.run_sync(state, ctx, store)

    @router.get(
        "/ui/api/adapters/{name}/{version}/plots/{plot}",
        dependencies=client,
        response_class=Response,
        responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}},
    )
    def plot(name: str, version: str, plot: str):
        if plot not in PLOTS:
            raise NotFoundError(f"no plot {plot!r}: one of {', '.join(PLOTS)}", param="plot", code="not_found")
        path = _version(name, version).path / plot
        if not path.is_file():
            raise NotFoundError(f"{name}@{version} has no {plot}", param="plot", code="not_found")
        return Response(path.read_bytes(), media_type="image/png")

    @router.get("/ui/api/adapters/{name}/{version}/report", dependencies=client, response_class=PlainTextResponse)
    def report(name: str, version: str):
        path = _version(name, version).path / "report.md"
        if not path.is_file():
            raise NotFoundError(f"{name}@{version} has no report", param="version", code="not_found")
        return PlainTextResponse(path.read_text(encoding="utf-8", errors="replace"))

    return router
