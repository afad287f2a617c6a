"""`scalpel chat [MODEL]`: an interactive chat in the terminal, with a running server or one started in-process."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator


def _base_for(model: str | None) -> str:
    """The base an in-process server serves for `model`: itself if it is a base, else the adapter's base."""
    from core import adapter_store, model_store
    from core.errors import NotFoundError

    if model is None:
        return model_store.DEFAULT_MODEL
    name = model.removesuffix("@base")
    with contextlib.suppress(NotFoundError):
        return model_store.get(name).name
    if model.startswith("ft:"):  # ft:<base>:<suffix>:<job id>[:ckpt-step-N]
        return model.split(":")[1]
    return adapter_store.resolve(model).manifest.require_base().name


@contextlib.contextmanager
def _server(url: str | None, model: str | None, base: str | None) -> Iterator[str]:
    """The /v1 URL to talk to: the given server's, or that of one started here on a free 127.0.0.1 port."""
    if url:
        url = url.rstrip("/")
        yield url if url.endswith("/v1") else f"{url}/v1"
        return
    from core import model_store
    from scalpel.demo import BackgroundServer
    from serving.app import create_app
    from serving.engine import Engine

    engine = Engine(model_store.get(base or _base_for(model)))
    try:
        with BackgroundServer(create_app(engine)) as server:
            yield server.base_url
    finally:
        engine.close()


def cmd_chat(args) -> None:
    import openai

    from core.errors import ScalpelError
    from scalpel.chat_session import ChatSession, run

    url = args.url or os.environ.get("SCALPEL_URL")
    key = args.api_key or os.environ.get("SCALPEL_API_KEY") or "none"
    with _server(url, args.model, args.base) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
        try:
            offered = [m.id for m in client.models.list()]  # the server lists its base first
        except openai.APIConnectionError as exc:
            raise ScalpelError(
                f"cannot reach a scalpel server at {base_url}: start one with `scalpel serve`, or leave out --url "
                "and $SCALPEL_URL to chat with one started here",
                param="url",
                code="server_unreachable",
            ) from exc
        except openai.APIStatusError as exc:
            raise ScalpelError(f"the server at {base_url} refused: {exc.message}", param="api_key") from exc
        model = args.model or offered[0]
        if model not in offered:
            raise ScalpelError(
                f"the server has no model {model!r}; it offers {', '.join(offered[:12])}"
                + (f" and {len(offered) - 12} more" if len(offered) > 12 else ""),
                param="model",
                code="model_not_found",
            )
        session = ChatSession(
            client, model, system=args.system, temperature=args.temperature, max_tokens=args.max_tokens
        )
        interactive = sys.stdin.isatty()
        read = None
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            read = input
            print(f"chatting with {model} at {base_url}; /help for commands, Ctrl-D to leave")
        run(session, sys.stdin, sys.stdout, read=read)


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command to the `scalpel` parser; `threads` is the shared --threads parent."""
    chat = sub.add_parser(
        "chat",
        parents=[threads],
        help="chat in the terminal (streams; /model NAME switches model or adapter, /reset, /help, /exit)",
    )
    chat.add_argument("model", nargs="?", help="base, BASE@base, adapter, ADAPTER@vN or ft:... (default: the base)")
    chat.add_argument("--url", help="a running server (default: $SCALPEL_URL; without either, one is started here)")
    chat.add_argument("--api-key", help="Bearer key (default: $SCALPEL_API_KEY)")
    chat.add_argument("--base", help="the base an in-process server serves (default: MODEL's base)")
    chat.add_argument("--system", help="a system message at the start of the conversation")
    chat.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    chat.add_argument("--max-tokens", type=int, help="cap each answer (default: the context's room)")
    chat.set_defaults(func=cmd_chat)
