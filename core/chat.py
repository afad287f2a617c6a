"""Render chat messages with a base's own template: training and serving both call this, so they see one text."""

from __future__ import annotations

import json
import re
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


# For a template that does not render tools (it never mentions them), the tools go into the system prompt and
# past tool calls and results become plain text in this same format, which serving parses back into tool calls.
TOOLS_PROMPT = """You can call these functions, given as JSON schemas of their parameters:
{functions}

To call functions, answer with nothing but one JSON object per call, each on its own line:
{{"name": "<function name>", "arguments": {{<the arguments>}}}}
Otherwise, answer normally."""
_TOOLS_WORD = re.compile(r"\btools\b")


def supports_tools(template: str) -> bool:
    """Whether the template renders `tools` itself (Qwen, Hermes, Llama 3.1, Mistral templates do)."""
    return bool(_TOOLS_WORD.search(template))


def tool_call_text(function: dict) -> str:
    """One call in the fallback format: `{"name": ..., "arguments": {...}}` on one line."""
    return json.dumps({"name": function["name"], "arguments": function.get("arguments") or {}}, ensure_ascii=False)


def plain_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation for a template that knows no tools: the functions listed in the system prompt, an
    assistant's tool calls as JSON lines, and the tools' results as one user message per run of results."""
    out: list[dict] = []
    results = False  # the last message written holds tool results, so the next result joins it
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            name = message.get("name") or "the function"
            result = f"Result of {name} ({message.get('tool_call_id') or 'no id'}):\n{content}"
            if results:
                out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n\n{result}"}
            else:
                out.append({"role": "user", "content": result})
            results = True
            continue
        results = False
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(tool_call_text(call["function"]) for call in message["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        else:
            out.append({"role": role, "content": content})
    if tools:
        listed = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
        prompt = TOOLS_PROMPT.format(functions=listed)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _uses_tools(messages: list[dict]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def render(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: list[dict] | None = None,
) -> str:
    """`tools` (OpenAI's function list) is handed to templates that render tools; for the others the tools and
    any tool calls and results in the conversation are written as text (plain_messages)."""
    if not supports_tools(template) and (tools or _uses_tools(messages)):
        messages, tools = plain_messages(messages, tools), None
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
