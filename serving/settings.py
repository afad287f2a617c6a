"""Server settings from flags, SCALPEL_* environment variables or a .env file (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from scalpel.model_store import DEFAULT_MODEL


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCALPEL_", env_file=".env", extra="ignore")

    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    api_key_file: Path | None = None
    n_ctx: int = Field(4096, ge=128)
    threads: int | None = Field(None, ge=1)  # SCALPEL_THREADS; None: every usable physical core
    n_gpu_layers: int = -1
    use_mmap: bool = True
    preload: list[str] = Field(default_factory=list)
    max_waiting: int = Field(16, ge=0)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # /api/training/start without a dataset trains on this file (a path below SCALPEL_HOME or a file id)
    training_data: str | None = None
    max_concurrent_jobs: int = Field(1, ge=1)

    def keys(self) -> set[str]:
        keys = set(self.api_keys)
        if self.api_key_file:
            keys |= {line.strip() for line in self.api_key_file.read_text().splitlines() if line.strip()}
        return keys
