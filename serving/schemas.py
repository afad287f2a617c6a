"""Request bodies of the OpenAI-compatible and admin routes, validated by pydantic."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import ScalpelError

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    """A call an earlier assistant message made."""

    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = ""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this is the result of

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])

    def as_template_message(self, names: dict[str, str] | None = None) -> dict:
        """The message as chat templates take it (transformers' convention): tool calls' arguments as objects
        where they parse, and a tool result named after its function (`names`: call id -> function name)."""
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)},
                }
                for call in self.tool_calls
            ]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
            if name := (names or {}).get(self.tool_call_id or ""):
                message["name"] = name
        return message


def _arguments(text: str) -> dict | str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    names = {call.id: call.function.name for m in messages for call in m.tool_calls or []}
    return [m.as_template_message(names) for m in messages]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object; none: no parameters
    strict: bool | None = None  # refuse schema keywords the grammar cannot enforce (serving.structured)


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class AllowedTools(BaseModel):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(min_length=1)


class AllowedToolChoice(BaseModel):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class AdapterChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # none: any JSON object
    strict: bool | None = None  # refuse schema keywords the grammar cannot enforce (serving.structured)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with, and only with, type json_schema")
        return self


# OpenAI fields (and other servers' sampling fields) that would change the answer and that scalpel does not
# honour: refused by name rather than ignored. The value that asks for nothing is accepted.
REFUSED: dict[str, str] = {
    "audio": "audio output is not supported",
    "modalities": "only the text modality is supported",
    "functions": "functions is deprecated and not supported: use tools",
    "function_call": "function_call is deprecated and not supported: use tool_choice",
    "reasoning_effort": "these models do not reason: reasoning_effort is not supported",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "moderation": "moderation is not supported",
    **{
        name: f"{name} is not supported (OpenAI's sampling fields are)"
        for name in (
            "top_k",
            "min_p",
            "typical_p",
            "tfs_z",
            "repeat_penalty",
            "repetition_penalty",
            "mirostat",
            "mirostat_mode",
            "mirostat_tau",
            "mirostat_eta",
            "min_tokens",
            "ignore_eos",
            "grammar",
            "json_schema",
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "use_beam_search",
        )
    },
}


class SamplingFields(BaseModel):
    """Fields /v1/chat/completions and /v1/completions share."""

    # Fields that do not change the answer (user, metadata, store, service_tier, prediction...) and unknown
    # ones are accepted and ignored, as OpenAI-compatible servers commonly do; the fields in REFUSED, which
    # would change it, are refused by name.
    model_config = ConfigDict(extra="ignore")
    refused: ClassVar[dict[str, str]] = REFUSED
    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)  # token id -> bias in [-100, 100]
    n: int = Field(1, ge=1, le=16)  # choices, generated side by side
    stream: bool = False
    stream_options: StreamOptions | None = None
    adapters: list[AdapterChoice] | None = Field(None, max_length=8)

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data):
        if isinstance(data, dict):
            for name, why in cls.refused.items():
                value = data.get(name)
                if value is None or value is False or (name == "modalities" and value == ["text"]):
                    continue
                raise ScalpelError(why, param=name, code="unsupported_parameter")
        return data

    @property
    def stops(self) -> list[str] | None:
        """`stop` as validated: always a list (a single string is wrapped)."""
        return [self.stop] if isinstance(self.stop, str) else self.stop

    @property
    def biases(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as the engine takes it: (token id, bias) pairs."""
        return tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is not None and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        if value is not None and any(not s for s in value):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_map(cls, value):
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids (as strings), not {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} is {bias}: biases lie in [-100, 100]")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def tool_dicts(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    @property
    def tool_choice_value(self) -> str | dict | None:
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, BaseModel) else choice


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)  # accepted when it equals n: n samples, every one returned

    @property
    def prompt_text(self) -> str:
        """`prompt` as validated: one string (a one-element list is unwrapped)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt (a string); batches of prompts are not supported")
            value = value[0]
        if not value:
            raise ValueError("the prompt must not be empty")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_n(cls, value, info):
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("only best_of equal to n is supported: no choices are ranked and dropped")
        return value

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = None
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class VersionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(pattern=r"^v[1-9][0-9]*$")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(None, pattern=r"^v[1-9][0-9]*$")
