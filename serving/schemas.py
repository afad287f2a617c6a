"""Request bodies of the OpenAI-compatible and admin routes, validated by pydantic."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = ""

    def as_template_message(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class AdapterChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object"]


class SamplingFields(BaseModel):
    """Fields /v1/chat/completions and /v1/completions share."""

    # Unknown OpenAI fields (user, metadata, store...) are accepted and ignored, as OpenAI-compatible
    # servers commonly do; fields that change the answer and that we cannot honour are refused.
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    adapters: list[AdapterChoice] | None = Field(None, max_length=8)

    @property
    def stops(self) -> list[str] | None:
        """`stop` as validated: always a list (a single string is wrapped)."""
        return [self.stop] if isinstance(self.stop, str) else self.stop

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

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value):
        if value != 1:
            raise ValueError("only n=1 is supported: one llama.cpp context serves requests one at a time")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

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
