"""The operator's routes: /health for load balancers and /metrics for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from serving.auth import client_key
from serving.context import ServingContext, context
from serving.responses import Health

router = APIRouter()


@router.get("/health", responses={200: {"model": Health}, 503: {"model": Health}})
def health(ctx: ServingContext = Depends(context)):
    """200 while the engine answers; 503 (same body) while it restarts after a crash, or if it failed."""
    state = ctx.engine.state
    body = {
        "status": "ok" if state == "ready" else "unavailable",
        "engine": state,
        "model": ctx.engine.base.name,
        "loaded_adapters": ctx.engine.loaded(),
        "queue_depth": ctx.engine.queue.depth,
    }
    return JSONResponse(body, status_code=200 if state == "ready" else 503)


@router.get("/metrics", dependencies=[Depends(client_key)], response_class=PlainTextResponse)
def prometheus(ctx: ServingContext = Depends(context)):
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")
