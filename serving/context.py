"""What every route of one app shares (the engine, its metrics, the access settings), kept on app.state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from serving.engine import Engine
from serving.metrics import Metrics
from serving.settings import AppSettings


@dataclass
class ServingContext:
    engine: Engine
    metrics: Metrics
    settings: AppSettings
    started: int = field(default_factory=lambda: int(time.time()))
    default_scales: dict[str, float] = field(default_factory=dict)  # adapter name -> scale set by .../load


def context(request: Request) -> ServingContext:
    """The dependency that hands a route its app's context."""
    return request.app.state.serving
