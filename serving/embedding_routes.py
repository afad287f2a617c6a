"""OpenAI's /v1/embeddings: the base's (or an adapter's) pooled, unit-length vectors, as floats or base64."""

from __future__ import annotations

import base64
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from core.errors import ScalpelError
from serving.auth import client_key
from serving.context import ServingContext, context
from serving.embeddings import Embedder
from serving.model_names import adapter_set
from serving.responses import Open
from serving.schemas import AdapterChoice

MAX_INPUTS = 2048  # OpenAI's own limit on the inputs of one request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `user` and other fields that do not change a vector
    model: str = Field(min_length=1)
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    adapters: list[AdapterChoice] | None = Field(None, max_length=8)

    @field_validator("input", mode="before")
    @classmethod
    def _one_shape(cls, value: Any) -> Any:
        """One clear message (param `input`) for any shape but a string, strings, token ids or lists of them."""
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value and all(type(v) is int for v in value):
            return value  # one input as token ids (its length is checked against the context)
        if (
            isinstance(value, list)
            and 0 < len(value) <= MAX_INPUTS
            and (
                all(isinstance(v, str) and v for v in value)
                or all(isinstance(v, list) and all(type(t) is int for t in v) for v in value)
            )
        ):
            return value
        raise ValueError(
            f"input must be a non-empty string, a list of 1..{MAX_INPUTS} of them, a list of token ids, "
            "or a list of lists of token ids"
        )

    @property
    def items(self) -> list[str | list[int]]:
        """`input` as a list of inputs: a string or a token-id list each."""
        value = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]  # a string, or one list of token ids
        return list(value)  # type: ignore[arg-type]


class Embedding(Open):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # floats, or base64 of their little-endian float32 bytes


class EmbeddingUsage(Open):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Open):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


_building = threading.Lock()


def embedder_for(app: FastAPI) -> Embedder:
    """The app's embedding context, built on first use (a second copy of the base's weights in memory)."""
    with _building:
        found = getattr(app.state, "embedder", None)
        if found is None:
            found = app.state.embedder = Embedder(app.state.serving.engine)
        return found


def embedding_turns(app: FastAPI) -> anyio.CapacityLimiter:
    """One worker thread for the app's embeddings: requests waiting for the context wait here, not in the
    shared thread pool that tokenizing and the other routes use. Called on the event loop."""
    found = getattr(app.state, "embedding_turns", None)
    if found is None:
        found = app.state.embedding_turns = anyio.CapacityLimiter(1)
    return found


@contextlib.asynccontextmanager
async def close_embedder(app: FastAPI) -> AsyncIterator[None]:
    yield
    if (embedder := getattr(app.state, "embedder", None)) is not None:
        app.state.embedder = None
        await anyio.to_thread.run_sync(embedder.close)


router = APIRouter(dependencies=[Depends(client_key)], lifespan=close_embedder)


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")  # as OpenAI sends it
    return vector.tolist()


@router.post("/v1/embeddings", responses={200: {"model": EmbeddingList}})
async def embeddings(request: Request, body: EmbeddingRequest, ctx: ServingContext = Depends(context)):
    adapters = await anyio.to_thread.run_sync(adapter_set, ctx, body.model, body.adapters)
    embedder = await anyio.to_thread.run_sync(embedder_for, request.app)
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise ScalpelError(
            f"dimensions={body.dimensions} is not supported: this model's embeddings have {embedder.dimensions}",
            param="dimensions",
            code="invalid_value",
        )

    def tokens() -> list[list[int]]:
        engine = ctx.engine
        return [item if isinstance(item, list) else engine.tokenize(item) for item in body.items]

    inputs = await anyio.to_thread.run_sync(tokens)
    vectors = await anyio.to_thread.run_sync(embedder.embed, inputs, adapters, limiter=embedding_turns(request.app))
    n_tokens = sum(len(t) for t in inputs)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": body.model,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }
