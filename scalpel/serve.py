"""`scalpel serve`: the engine, the app with the job routes mounted, and uvicorn, bound to 127.0.0.1 unless told."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core import adapter_store, model_store
from core.errors import ScalpelError
from core.job_store import JobStore
from scalpel.jobs.routes import served_jobs
from scalpel.jobs.runner import JobRunner, RunnerSettings
from scalpel.ui.routes import ui_router
from serving.app import DEFAULT_ROUTERS, create_app
from serving.engine import Engine
from serving.engine_process import EngineProcess
from serving.settings import AppSettings, EngineSettings


class ServeSettings(BaseSettings, EngineSettings, AppSettings):
    """Flags, SCALPEL_* environment variables or a .env file in the working directory (pydantic-settings).

    The engine's and the app's fields, with their defaults, come from serving.settings; the fields here
    are the server's own.
    """

    model_config = SettingsConfigDict(env_prefix="SCALPEL_", env_file=".env", extra="ignore", frozen=False)

    model: str = model_store.DEFAULT_MODEL
    port: int = Field(8000, ge=0, le=65535)
    api_key_file: Path | None = None
    preload: list[str] = Field(default_factory=list)
    # /api/training/start without a dataset trains on this file (a path below SCALPEL_HOME or a file id)
    training_data: str | None = None
    max_concurrent_jobs: int = Field(RunnerSettings.max_concurrent, ge=1)
    engine_process: bool = True  # the engine in its own process: a crash there is a 503 and a restart, not an outage

    def keys(self, role: str = "client") -> frozenset[str]:
        """The keys of one role: from the flags/env (api_keys, admin_keys) and the key file, where a line is
        `admin:KEY`, `client:KEY` or a bare KEY (a client key); blank lines and `#` comments are skipped."""
        keys = set(self.api_keys if role == "client" else self.admin_keys)
        if self.api_key_file:
            try:
                lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ScalpelError(
                    f"{self.api_key_file}: cannot read the key file ({type(exc).__name__})", param="api_key_file"
                ) from exc
            for line in (raw.strip() for raw in lines):
                if not line or line.startswith("#"):
                    continue
                marked, _, key = line.partition(":")
                if marked in ("admin", "client") and key.strip():
                    if marked == role:
                        keys.add(key.strip())
                elif role == "client":
                    keys.add(line)
        return frozenset(keys)

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(**{name: getattr(self, name) for name in EngineSettings.model_fields})

    def app_settings(self) -> AppSettings:
        fields = {name: getattr(self, name) for name in AppSettings.model_fields}
        return AppSettings(**{**fields, "api_keys": self.keys("client"), "admin_keys": self.keys("admin")})


def build(settings: ServeSettings) -> tuple[Engine | EngineProcess, FastAPI]:
    kind = EngineProcess if settings.engine_process else Engine
    engine = kind(model_store.get(settings.model), settings.engine_settings())
    for name in settings.preload:
        engine.load(adapter_store.resolve(name))
    runner = JobRunner(JobStore(), RunnerSettings(max_concurrent=settings.max_concurrent_jobs))
    jobs_router, jobs_lifespan = served_jobs(runner, default_dataset=settings.training_data)
    routers = (*DEFAULT_ROUTERS, jobs_router, ui_router(runner.store))  # ui: the dashboard at /ui
    app = create_app(engine, settings.app_settings(), routers=routers, lifespans=(jobs_lifespan,))
    return engine, app


def serve(settings: ServeSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    engine, app = build(settings)
    logging.getLogger("scalpel.serving").info(
        "serving %s on http://%s:%d/v1 with %d threads", engine.base.name, settings.host, settings.port, engine.threads
    )
    try:
        # access_log off: the middleware writes the one access line per request, as JSON (with its status)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    finally:
        engine.close()
