"""The app factory: an engine, the routers to serve, and the lifespans of whatever else runs beside them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import APIRouter, FastAPI

from serving import adapter_routes, embedding_routes, openai_routes, ops_routes, responses_api, token_routes
from serving.context import ServingContext
from serving.engine import Engine
from serving.engine_process import EngineProcess
from serving.metrics import Metrics
from serving.middleware import Guard, install_error_handlers
from serving.openapi import install_openapi
from serving.settings import AppSettings

# What a bare app serves: OpenAI's routes (chat, completions, embeddings, responses), llama-server's
# /tokenize and /detokenize, the plan's adapter routes, /health and /metrics. The top layer adds the job
# routes where jobs are served.
DEFAULT_ROUTERS: tuple[APIRouter, ...] = (
    ops_routes.router,
    openai_routes.router,
    embedding_routes.router,
    responses_api.router,
    token_routes.router,
    adapter_routes.router,
)
Lifespan = Callable[[], AbstractAsyncContextManager[None]]


def create_app(
    engine: Engine | EngineProcess,
    settings: AppSettings | None = None,
    *,
    routers: Sequence[APIRouter] = DEFAULT_ROUTERS,
    lifespans: Sequence[Lifespan] = (),
    **overrides: Any,
) -> FastAPI:
    """`overrides` are AppSettings fields (`api_keys=...`, `host=...`), for callers without a settings object."""
    settings = AppSettings.model_validate({**(settings or AppSettings()).model_dump(), **overrides})

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for enter in lifespans:
                await stack.enter_async_context(enter())
            yield

    app = FastAPI(title="scalpel", version="0.1.0", lifespan=lifespan)
    metrics = Metrics(engine)
    app.state.serving = ServingContext(engine=engine, metrics=metrics, settings=settings)
    install_error_handlers(app)
    app.add_middleware(Guard, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    for router in routers:
        app.include_router(router)
    install_openapi(app, routers)
    return app
