"""Tool calling: what tools and tool_choice ask for, the grammar that forces a call, and calls read back from text.

The format a model calls in is the fallback prompt's (core.chat.TOOLS_PROMPT): one JSON object per call,
`{"name": ..., "arguments": {...}}`, each on its own line. A template that renders tools in Hermes' and Qwen's
way (it mentions `<tool_call>`) gets each call wrapped in `<tool_call>...</tool_call>`. Read back are also
Llama 3.1's `"parameters"` and Mistral's `[TOOL_CALLS] [...]`.

The tool-call parsing is written here rather than taken from a library: llama-cpp-python's chat handlers
parse per model family and only whole answers, and transformers' parser lives in its CLI (and needs torch).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from core import chat
from core.errors import ScalpelError
from serving.structured import Grammar, literal

MAX_PARALLEL_CALLS = 8  # a forced answer holds at most this many calls
OPEN, CLOSE = "<tool_call>", "</tool_call>"
MARKERS = (OPEN, "[TOOL_CALLS]")  # where a call may start after some text
# A forced call up to its arguments, matched once their `{` is there (so the arguments start exactly at it)
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*(?=\{)')
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools, tool_choice and parallel_tool_calls mean for its answer."""

    offered: tuple[dict, ...] = ()  # the tools the prompt lists (OpenAI's {"type": "function", "function": ...})
    names: tuple[str, ...] = ()  # the functions a call may name; () when no call is possible
    forced: bool = False  # a call is required: the grammar allows nothing else
    parallel: bool = True  # several calls in one answer
    tagged: bool = False  # the template's own format: each call inside <tool_call>...</tool_call>

    @property
    def template_tools(self) -> list[dict] | None:
        return list(self.offered) or None


def plan(tools: list[dict] | None, tool_choice: Any, parallel: bool, template: str) -> ToolPlan:
    """`tools` in OpenAI's chat shape; `tool_choice` "none", "auto", "required", {"type": "function", ...} or
    {"type": "allowed_tools", ...}, as validated by serving.schemas."""
    tools = tools or []
    by_name = {t["function"]["name"]: t for t in tools}
    if len(by_name) != len(tools):
        raise ScalpelError("two tools have the same function name", param="tools", code="invalid_value")
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        allowed = tool_choice["allowed_tools"]
        wanted, mode = [t["function"]["name"] for t in allowed["tools"]], allowed["mode"]
    elif isinstance(tool_choice, dict):
        wanted, mode = [tool_choice["function"]["name"]], "named"
    else:
        wanted, mode = list(by_name), tool_choice or "auto"
    if mode == "none" or not tools:
        if mode in ("required", "named"):
            raise ScalpelError("tool_choice asks for a call but no tools are given", param="tool_choice")
        return ToolPlan()
    if missing := [n for n in wanted if n not in by_name]:
        raise ScalpelError(f"tool_choice names functions that are not in tools: {missing}", param="tool_choice")
    return ToolPlan(
        offered=tuple(by_name[n] for n in wanted),
        names=tuple(wanted),
        forced=mode in ("required", "named"),
        parallel=parallel and mode != "named",
        tagged=chat.supports_tools(template) and OPEN in template,
    )


def grammar(
    plan: ToolPlan, answer: dict | None = None, *, strict: bool = False, answer_param: str = "response_format"
) -> str | None:
    """The choice's GBNF: the calls alone when one is forced; else the response format's schema (`answer`,
    None for free text), or that or a call when tools are offered. `strict` refuses what the grammar cannot
    enforce in `answer` (serving.structured.UNENFORCED)."""
    if not plan.forced and answer is None:
        return None
    g = Grammar()
    calls = _calls_rule(g, plan) if plan.names else None
    if plan.forced:
        assert calls is not None
        g.rule("root", calls)
    elif calls is None:
        assert answer is not None
        g.schema(answer, name="", param=answer_param, strict=strict)
    else:
        g.rule("root", f"{g.schema(answer, name='answer', param=answer_param, strict=strict)} | {calls}")
    return g.text()


def _calls_rule(g: Grammar, plan: ToolPlan) -> str:
    for i, tool in enumerate(plan.offered):
        function = tool["function"]
        param = f"tools.{i}.function.parameters"
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        if schema.get("type", "object" if not schema or "properties" in schema else None) != "object":
            raise ScalpelError(f"{param} must describe an object", param=param, code="invalid_schema")
        args = g.schema(schema, name=f"call{i}-args", param=param, strict=bool(function.get("strict")))
        head = literal(f'{{"name": "{function["name"]}", "arguments": ')
        g.rule(f"tool-call-{i}", f'{head} {args} "}}"')
    one = " | ".join(f"tool-call-{i}" for i in range(len(plan.offered)))
    g.rule("tool-call", f"{literal(OPEN + chr(10))} ( {one} ) {literal(chr(10) + CLOSE)}" if plan.tagged else one)
    repeat = f" ({literal(chr(10))} tool-call){{0,{MAX_PARALLEL_CALLS - 1}}}" if plan.parallel else ""
    return g.rule("tool-calls", f"tool-call{repeat}")


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(text: str, names: Collection[str]) -> tuple[str, list[dict]] | None:
    """(the text before the calls, [{"name", "arguments" (JSON text)}]) when `text` ends in tool calls of the
    offered functions, in any format above; None when it is an ordinary answer."""
    found: list[Any] = []
    rest = text.strip()
    if OPEN in rest:
        before, _, tail = rest.partition(OPEN)
        for block in tail.split(OPEN):
            inside, _, after = block.partition(CLOSE)  # the last block may be cut before its CLOSE
            if after.strip() or (values := _json_values(inside)) is None:
                return None  # text after a call, or a block that is not JSON: an answer that mentions the tag
            found += values
    else:
        before, marker, calls = rest.partition(MARKERS[1])
        if not marker:
            before, calls = "", rest
        if (values := _json_values(calls)) is None:
            return None
        found = values
    flat = [c for v in found for c in (v if isinstance(v, list) else [v])]
    parsed = [_call(c, names) for c in flat]
    if not parsed or any(c is None for c in parsed):
        return None
    return before.strip(), [c for c in parsed if c is not None]


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in `text`, separated by whitespace; None if anything else is there."""
    values, i, text = [], 0, text.strip()
    while i < len(text):
        try:
            value, i = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)
        while i < len(text) and text[i].isspace():
            i += 1
    return values or None


def _call(value: Any, names: Collection[str]) -> dict | None:
    if isinstance(value, dict) and isinstance(value.get("function"), dict):  # {"type": "function", "function": ...}
        value = value["function"]
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": value["name"], "arguments": json.dumps(args, ensure_ascii=False)}


class ChatAnswer:
    """One choice's generated text as chat deltas: content as it comes, and tool calls.

    Without tools the text is content. When a call is forced, the text is the grammar's calls: each call's id
    and name go out as soon as its name is complete, then its arguments as they are generated. With tools on
    offer (auto), content streams until the text may be starting a call (it opens with `{` or `[`, or reaches
    `<tool_call>`); from there it is held back, and at the end it is either calls or the rest of the content.
    """

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self._sent = 0  # text given out as content (auto) or as arguments (forced)
        self._hold: int | None = None  # auto: where the text that may be calls starts
        self._calls = 0
        self._open: int | None = None  # forced: where the arguments of the call being written start

    def feed(self, text: str) -> dict:
        """The delta for newly generated text: {"content": ...} and/or {"tool_calls": [...]}, or {}."""
        self.text += text
        if not self.plan.names:
            return self._content(len(self.text))
        if self.plan.forced:
            return _delta(None, self._forced())
        upto = self._auto_safe()
        while upto > self._sent and self.text[upto - 1].isspace():
            upto -= 1  # whitespace may only separate the content from a call: sent once more content follows
        return self._content(upto)

    def finish(self, reason: str) -> tuple[dict, str]:
        """The last delta and OpenAI's finish_reason ("tool_calls" when the answer ended in calls)."""
        if self.plan.forced:
            calls = self._forced()
            done = reason == "stop" and self._calls > 0 and self._open is None
            return _delta(None, calls), "tool_calls" if done else reason
        if self._hold is None or not self.plan.names:
            return self._content(len(self.text)), reason
        parsed = parse_calls(self.text[self._hold :], self.plan.names)
        if parsed is None:
            return self._content(len(self.text)), reason
        before, calls = parsed
        if not self.plan.parallel:
            calls = calls[:1]
        entries = [{"index": i, "id": call_id(), "type": "function", "function": call} for i, call in enumerate(calls)]
        self._sent = len(self.text)
        return _delta(before or None, entries), "tool_calls" if reason == "stop" else reason

    def _content(self, upto: int) -> dict:
        chunk, self._sent = self.text[self._sent : upto], max(self._sent, upto)
        return {"content": chunk} if chunk else {}

    def _auto_safe(self) -> int:
        """How far the text is surely content (auto)."""
        if self._hold is not None:
            return self._sent
        stripped = self.text.lstrip()
        if not stripped:
            return self._sent  # nothing but whitespace yet: it may still open a JSON call
        if stripped[0] in "{[" and self._sent == 0:
            self._hold = 0
            return 0
        starts = [i for i in (self.text.find(m, self._sent) for m in MARKERS) if i >= 0]
        if starts:
            self._hold = min(starts)
            return self._hold
        partial = max(
            (n for m in MARKERS for n in range(len(m) - 1, 0, -1) if self.text.endswith(m[:n])),
            default=0,
        )
        return len(self.text) - partial

    def _forced(self) -> list[dict]:
        """Tool-call delta entries for what the grammar-forced text holds now."""
        out: list[dict] = []
        while True:
            if self._open is None:
                head = _HEAD.search(self.text, self._sent)
                if head is None:
                    return out
                out.append(
                    {
                        "index": self._calls,
                        "id": call_id(),
                        "type": "function",
                        "function": {"name": head.group(1), "arguments": ""},
                    }
                )
                self._calls += 1
                self._open = self._sent = head.end()
                continue
            try:
                _, end = _DECODER.raw_decode(self.text, self._open)
            except json.JSONDecodeError:  # the arguments are still being written
                end = None
            upto = len(self.text) if end is None else end
            if upto > self._sent:
                out.append({"index": self._calls - 1, "function": {"arguments": self.text[self._sent : upto]}})
            self._sent = upto
            if end is None:
                return out
            self._open = None


def join(*deltas: dict) -> dict:
    """Several deltas of one choice as one."""
    content = "".join(d.get("content") or "" for d in deltas)
    return _delta(content or None, [entry for d in deltas for entry in d.get("tool_calls") or []])


def _delta(content: str | None, calls: list[dict]) -> dict:
    """One delta; consecutive entries for one call are merged into one."""
    merged: list[dict] = []
    for entry in calls:
        if merged and merged[-1]["index"] == entry["index"]:
            last = merged[-1]
            last["function"]["arguments"] += entry["function"]["arguments"]
        else:
            merged.append({**entry, "function": dict(entry["function"])})
    delta: dict = {}
    if content:
        delta["content"] = content
    if merged:
        delta["tool_calls"] = merged
    return delta


class Message:
    """A whole assistant message, put together from a choice's deltas the way the openai SDK does it."""

    def __init__(self) -> None:
        self.content = ""
        self.calls: list[dict] = []

    def add(self, delta: dict) -> None:
        self.content += delta.get("content") or ""
        for entry in delta.get("tool_calls") or []:
            if entry["index"] == len(self.calls):
                self.calls.append({"id": entry["id"], "type": "function", "function": {"name": "", "arguments": ""}})
            function = self.calls[entry["index"]]["function"]
            function["name"] += entry["function"].get("name") or ""
            function["arguments"] += entry["function"].get("arguments") or ""

    def message(self) -> dict:
        if not self.calls:
            return {"role": "assistant", "content": self.content}
        return {"role": "assistant", "content": self.content or None, "tool_calls": self.calls}
