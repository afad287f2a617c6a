"""What the serving routes answer on success, for the OpenAPI schema (serving.openapi documents the errors).

The routes return plain dicts; these models only describe them (`responses={200: {"model": ...}}`), they never
filter an answer. Each lists the keys its route always sends and allows more (`extra="allow"`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# ----- OpenAI's chat and completions -----


class CalledFunction(Open):
    name: str
    arguments: str  # JSON text: valid for the function's parameters when the call was forced (tool_choice)


class ToolCall(Open):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(Open):
    role: Literal["assistant"]
    content: str | None  # None when the answer is only tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Open):
    index: int
    message: ChatMessage
    logprobs: dict[str, Any] | None  # {"content": [...]} when asked for
    finish_reason: str  # stop, length, or tool_calls


class ChatCompletion(Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: dict[str, Any]  # prompt_tokens, completion_tokens, total_tokens


class CompletionChoice(Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None  # tokens, token_logprobs, top_logprobs, text_offset when asked for
    finish_reason: str


class Completion(Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: dict[str, Any]


# ----- the plan's adapter routes -----


class AdapterInfo(Open):
    name: str
    active_version: str | None
    versions: list[str]
    loaded_versions: list[str]
    scale: float
    available: bool
    problem: str | None


class AdapterDetail(AdapterInfo):
    manifest: dict[str, Any]  # the JSON keys of manifest.json


class AdapterSwitched(AdapterInfo):
    """After a promote or a rollback: the adapter, and the version that was live before."""

    previous_version: str | None


class AdapterList(Open):
    object: Literal["list"]
    data: list[AdapterInfo]


class AdapterLoaded(Open):
    name: str
    version: str
    ref: str
    loaded: Literal[True]
    scale: float
    size_bytes: int


class AdapterUnloaded(Open):
    name: str
    unloaded: list[str]


class VersionDeleted(Open):
    name: str
    version: str
    deleted: Literal[True]


class AdapterDiff(Open):
    """Each change is {"from": ..., "to": ...}, keyed by its flattened field name."""

    adapter: str
    a: str
    b: str
    lineage: dict[str, str | None]
    base_changed: bool
    config: dict[str, Any]
    datasets: dict[str, Any]
    metrics: dict[str, Any]
    eval: dict[str, Any]
    size_bytes: dict[str, int | None]
    weights: dict[str, Any]  # comparable, and the relative change per module or the keys only one side has


# ----- the operator's routes -----


class Health(Open):
    status: Literal["ok", "unavailable"]
    engine: Literal["ready", "starting", "restarting", "failed", "stopped"]
    model: str
    loaded_adapters: list[str]
    queue_depth: int


TEXT = {"schema": {"type": "string"}}
# Server-sent events, with "stream": true, ending in `data: [DONE]`. OpenAPI 3.1 cannot describe a whole
# stream: each event is described with OpenAPI 3.2's `itemSchema`, which schemathesis checks every event against.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a chat.completion.chunk or text_completion chunk, an error object; or [DONE]",
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
EVENT_STREAM = {"text/event-stream": {"itemSchema": SSE_EVENT}}
