"""Render chat messages with a base's own template: training and serving both call this, so they see one text."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.errors import ScalpelError


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # The same environment settings transformers and llama-cpp-python use for chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: list[dict] | None = None,
) -> str:
    """`tools` (OpenAI's function list) is handed to templates that render tools; others ignore it."""
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            **({"tools": tools} if tools else {}),
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ScalpelError(
            f"the chat template rejected these messages: {exc}", param="messages", code="chat_template_error"
        ) from exc


def needs_bos(text: str, *, add_bos: bool, bos_token: str | None) -> bool:
    """Add BOS when the model wants one and the template has not already written it."""
    return add_bos and not (bos_token and text.startswith(bos_token))


def segments(
    template: str, messages: list[dict], *, bos_token: str | None = None, eos_token: str | None = None
) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_assistant_answer) pieces.

    Each assistant answer is what the template adds after the generation prompt, so training
    sees exactly the prompt text that serving will send, and takes the loss on the answer only.
    """
    kw: dict = dict(bos_token=bos_token, eos_token=eos_token)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(template, messages[:i], add_generation_prompt=True, **kw)
        upto = render(template, messages[: i + 1], add_generation_prompt=False, **kw)
        if not prompt.startswith(done) or not upto.startswith(prompt):
            raise ScalpelError(
                "this chat template does not render a conversation as a prefix of its "
                "continuation, so answer tokens cannot be separated from the prompt",
                param="chat_template",
                code="chat_template_not_prefix_stable",
            )
        pieces.append((prompt[len(done) :], False))
        pieces.append((upto[len(prompt) :], True))
        done = upto
    if not any(is_answer for _, is_answer in pieces):
        raise ScalpelError("a training conversation needs at least one assistant message", param="messages")
    return [(text, is_answer) for text, is_answer in pieces if text]
