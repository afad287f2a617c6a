"""The records of OpenAI's Responses API: the request /v1/responses takes, and the response object it answers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import ScalpelError
from serving import structured
from serving.responses import Open
from serving.schemas import AdapterChoice

LOGPROBS = "message.output_text.logprobs"  # the one `include` value that is served (the others need tools)


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore")  # annotations and logprobs of an output_text fed back
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # id and status of an output message fed back
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)  # description
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # json_schema's JSON Schema
    strict: bool | None = None

    def shown(self) -> dict:
        """As the response object echoes it."""
        return self.model_dump(by_alias=True, exclude_none=True)


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: TextFormat = TextFormat()
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponseRequest(BaseModel):
    """The fields of client.responses.create. Fields that would change the answer and are not served are
    refused by `check_supported` (400 naming the field); fields that do not change it are accepted."""

    model_config = ConfigDict(extra="ignore")  # user, safety_identifier, service_tier, prompt_cache_key...
    model: str = Field(min_length=1)
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    previous_response_id: str | None = Field(None, min_length=1, max_length=200)
    store: bool = True
    metadata: dict[str, str] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    text: TextConfig | None = None
    parallel_tool_calls: bool | None = None  # without tools, harmless
    max_tool_calls: int | None = None
    stream_options: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    reasoning: dict[str, Any] | None = None
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None
    context_management: Any = None
    adapters: list[AdapterChoice] | None = Field(None, max_length=8)  # scalpel's own: stacked adapters, as in chat

    @field_validator("input", mode="before")
    @classmethod
    def _messages_only(cls, value: Any) -> Any:
        """Text or messages; any other input item (images, files, tool outputs, references) is refused."""
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be empty")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("input must be text or a non-empty list of messages")
        for i, item in enumerate(value):
            kind = item.get("type", "message") if isinstance(item, dict) else None
            if kind != "message":
                raise ValueError(f"input[{i}]: only messages are supported (role and content), not {kind!r}")
            parts = item.get("content")
            for part in parts if isinstance(parts, list) else []:
                if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
                    got = part.get("type") if isinstance(part, dict) else part
                    raise ValueError(f"input[{i}].content: only input_text parts are supported, not {got!r}")
        return value

    def check_supported(self) -> None:
        """Refuse, naming it, a field that would change the answer and that this server does not serve."""
        refused = {
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none", "auto"),
            "reasoning": bool(self.reasoning and any(v is not None for v in self.reasoning.values())),
            "conversation": self.conversation is not None,
            "prompt": self.prompt is not None,
            "background": bool(self.background),
            "context_management": bool(self.context_management),
            "truncation": self.truncation == "auto",
            "text.format.schema": bool(
                self.text and self.text.format.type == "json_schema" and self.text.format.schema_ is None
            ),
            "text.verbosity": bool(self.text and self.text.verbosity not in (None, "medium")),
            "include": any(i != LOGPROBS for i in self.include or []),
        }
        for field, refuse in refused.items():
            if refuse:
                raise ScalpelError(
                    f"{field} is not supported by this server's Responses API", param=field, code="unsupported_field"
                )

    def input_messages(self) -> list[dict]:
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [m.as_template_message() for m in self.input]

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS in (self.include or [])

    def grammar(self) -> str | None:
        """The grammar `text.format` asks the answer to fit: any JSON object, or one valid for a JSON Schema."""
        shape = self.text.format if self.text else None
        if shape is None or shape.type == "text":
            return None
        if shape.type == "json_object" or shape.schema_ is None:
            return structured.schema_grammar(structured.ANY_OBJECT, param="text.format")
        return structured.schema_grammar(shape.schema_, param="text.format.schema", strict=bool(shape.strict))


# ----- what /v1/responses answers (the routes send plain dicts; these describe them) -----


class OutputText(Open):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[dict[str, Any]]  # token, logprob, bytes, top_logprobs (with include=[LOGPROBS])


class OutputMessage(Open):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class ResponseUsage(Open):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(Open):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[OutputMessage]
    usage: ResponseUsage | None
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    instructions: str | None
    previous_response_id: str | None


class ResponseDeleted(Open):
    id: str
    object: Literal["response"]
    deleted: Literal[True]


# Server-sent events with "stream": true, each `event: <type>` with the event object as its data.
RESPONSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a Responses stream event: response.created, response.in_progress, "
            "response.output_item.added, response.content_part.added, response.output_text.delta..., "
            "response.output_text.done, response.content_part.done, response.output_item.done, then "
            "response.completed (or response.incomplete at max_output_tokens); or an error event",
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
RESPONSE_EVENTS = {"text/event-stream": {"itemSchema": RESPONSE_EVENT}}
