"""The serving stage's settings, each default written once: the engine's, and the HTTP app's."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineSettings(BaseModel):
    """How the llama.cpp engine runs the base."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    n_ctx: int = Field(4096, ge=128)  # tokens per KV slot (prompt plus answer)
    slots: int = Field(4, ge=1, le=64)  # KV slots: requests decoded together, and prefixes cached per adapter set
    prompt_block: int = Field(32, ge=1, le=512)  # prompts are evaluated (and their cache reused) in aligned blocks
    deterministic: bool = False  # never batch requests together: a greedy answer never depends on its neighbours
    threads: int | None = Field(None, ge=1)  # None: SCALPEL_THREADS, else every usable physical core
    n_gpu_layers: int = -1  # all layers on Metal/CUDA builds; ignored by a CPU build
    use_mmap: bool = True
    max_waiting: int = Field(16, ge=0)  # requests that may wait for a free slot; more get 429


class AppSettings(BaseModel):
    """Who may call the HTTP app, and how much they may send."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    host: str = "127.0.0.1"  # where the server listens: beyond loopback, admin routes always need an admin key
    api_keys: frozenset[str] = frozenset()  # client keys: inference and the model list
    admin_keys: frozenset[str] = frozenset()  # admin keys: also adapters, training, fine-tuning, files, actions
    max_queued_jobs_per_key: int = Field(4, ge=1)  # jobs queued or running per key; more get 429
    max_upload_bytes_per_key: int = Field(256 * 1024 * 1024, ge=1024)  # stored /v1/files bytes per key
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # The plan's flow: POST /api/adapters/{name}/load also attaches the adapter to the base's name, so
    # `"model": "<base>"` gets it until it is unloaded; `<base>@base` always names the bare base.
    attach_on_load: bool = False
