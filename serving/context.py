"""What every route of one app shares (the engine, its metrics, the access settings), kept on app.state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from serving.engine import Engine
from serving.engine_process import EngineProcess
from serving.metrics import Metrics
from serving.settings import AppSettings


@dataclass
class ServingContext:
    engine: Engine | EngineProcess  # in this process, or in its own (scalpel serve)
    metrics: Metrics
    settings: AppSettings
    started: int = field(default_factory=lambda: int(time.time()))
    default_scales: dict[str, float] = field(default_factory=dict)  # adapter name -> scale set by .../load
    attached: str | None = None  # with attach_on_load: the adapter (NAME or NAME@vN) the base's name applies


def context(request: Request) -> ServingContext:
    """The dependency that hands a route its app's context."""
    return request.app.state.serving
