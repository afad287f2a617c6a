"""Start the engine and the FastAPI app under uvicorn, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import logging

import uvicorn

from scalpel import adapter_store, model_store
from scalpel.job_store import JobStore
from serving.app import create_app
from serving.engine import Engine, EngineSettings
from serving.settings import ServeSettings
from training.runner import JobRunner, RunnerSettings


def build(settings: ServeSettings):
    base = model_store.get(settings.model)
    engine = Engine(base, EngineSettings(n_ctx=settings.n_ctx, n_threads=settings.threads,
                                         n_gpu_layers=settings.n_gpu_layers, use_mmap=settings.use_mmap,
                                         max_waiting=settings.max_waiting))
    for name in settings.preload:
        engine.load(adapter_store.resolve(name))
    runner = JobRunner(JobStore(), RunnerSettings(max_concurrent=settings.max_concurrent_jobs))
    return engine, create_app(engine, api_keys=settings.keys(), host=settings.host,
                              max_body_bytes=settings.max_body_bytes, runner=runner,
                              default_dataset=settings.training_data)


def serve(settings: ServeSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    engine, app = build(settings)
    logging.getLogger("scalpel.serving").info("serving %s on http://%s:%d/v1 with %d threads", engine.base.name,
                                              settings.host, settings.port, engine.threads)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    finally:
        engine.close()
