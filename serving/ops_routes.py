"""The operator's routes: /health for load balancers and /metrics for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse, Response

from serving.auth import client_key
from serving.context import ServingContext, context
from serving.responses import Health

router = APIRouter()


@router.get("/health", responses={200: {"model": Health}})
def health(ctx: ServingContext = Depends(context)):
    return {
        "status": "ok",
        "model": ctx.engine.base.name,
        "loaded_adapters": ctx.engine.loaded(),
        "queue_depth": ctx.engine.queue.depth,
    }


@router.get("/metrics", dependencies=[Depends(client_key)], response_class=PlainTextResponse)
def prometheus(ctx: ServingContext = Depends(context)):
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")
