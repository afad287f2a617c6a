"""`scalpel chat`'s conversation: the history, the model it talks to, the slash commands, and the read-answer loop.

It talks to a server through the openai SDK only, streaming every answer, so it works against any scalpel
server (or any OpenAI-compatible one) and shows what an SDK user sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import openai

HELP = """commands:
  /model NAME   talk to another model: a base, BASE@base, an adapter, ADAPTER@vN or an ft:... id (history is kept)
  /model        show the current model
  /models       list the models the server offers
  /reset        forget the conversation
  /help         this text
  /exit         leave (also /quit, or Ctrl-D)"""


class Exit(Exception):
    """/exit or /quit."""


@dataclass
class ChatSession:
    client: openai.OpenAI
    model: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    history: list[dict] = field(default_factory=list)  # the user's and the assistant's turns, oldest first

    def messages(self, text: str) -> list[Any]:  # {"role", "content"} dicts, as the SDK's message params are
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": text}]

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`; the exchange joins the history only once the answer is complete."""
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=self.messages(text),
            stream=True,
            temperature=openai.omit if self.temperature is None else self.temperature,
            max_tokens=openai.omit if self.max_tokens is None else self.max_tokens,
        )
        answer = []
        with stream:
            for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    answer.append(delta)
                    yield delta
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]

    def command(self, line: str) -> str:
        """Run a slash command; returns what to show."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            raise Exit
        if name == "/help":
            return HELP
        if name == "/reset":
            self.history.clear()
            return "(conversation cleared)"
        if name == "/models":
            return "\n".join(m.id for m in self.client.models.list())
        if name == "/model":
            if not arg:
                return f"model: {self.model}"
            self.client.models.retrieve(arg)  # a 404 (NotFoundError) leaves the model as it was
            self.model = arg
            return f"model: {arg}" + (f" ({len(self.history) // 2} earlier turns kept)" if self.history else "")
        return f"unknown command {name}; /help lists them"


def _error(exc: openai.OpenAIError) -> str:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        return f"error {exc.status_code}: {body.get('message') or exc.message}"
    if isinstance(exc, openai.APIConnectionError):
        return f"error: cannot reach the server ({exc})"
    return f"error: {exc}"


def run(session: ChatSession, stdin: TextIO, stdout: TextIO, *, read: Callable[[str], str] | None = None) -> int:
    """Read lines until /exit or end of input; answer each, streamed. `read` (e.g. `input`, with readline's
    line editing) replaces reading `stdin` for an interactive terminal. Returns the exit status."""

    def next_line() -> str | None:
        if read is not None:
            try:
                return read(">>> ")
            except EOFError:
                stdout.write("\n")
                return None
        line = stdin.readline()
        return line if line else None

    while True:
        try:
            line = next_line()
        except KeyboardInterrupt:
            stdout.write("\n")
            return 0
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        try:
            if text.startswith("/"):
                stdout.write(session.command(text) + "\n")
            else:
                for piece in session.ask(text):
                    stdout.write(piece)
                    stdout.flush()
                stdout.write("\n")
        except Exit:
            return 0
        except KeyboardInterrupt:  # Ctrl-C stops the answer; the exchange is left out of the history
            stdout.write("\n(interrupted)\n")
        except openai.OpenAIError as exc:
            stdout.write(_error(exc) + "\n")
        stdout.flush()
