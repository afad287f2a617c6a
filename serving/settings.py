"""The serving stage's settings, each default written once: the engine's, and the HTTP app's."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineSettings(BaseModel):
    """How the llama.cpp engine runs the base."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    n_ctx: int = Field(4096, ge=128)
    threads: int | None = Field(None, ge=1)  # None: SCALPEL_THREADS, else every usable physical core
    n_gpu_layers: int = -1  # all layers on Metal/CUDA builds; ignored by a CPU build
    use_mmap: bool = True
    max_waiting: int = Field(16, ge=0)  # requests that may wait for their turn; more get 429


class AppSettings(BaseModel):
    """Who may call the HTTP app, and how much they may send."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    host: str = "127.0.0.1"  # where the server listens: beyond loopback, admin routes always need an admin key
    api_keys: frozenset[str] = frozenset()  # client keys: inference and the model list
    admin_keys: frozenset[str] = frozenset()  # admin keys: also adapters, training, fine-tuning, files, actions
    max_queued_jobs_per_key: int = Field(4, ge=1)  # jobs queued or running per key; more get 429
    max_upload_bytes_per_key: int = Field(256 * 1024 * 1024, ge=1024)  # stored /v1/files bytes per key
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
