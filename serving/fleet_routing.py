"""What the fleet's ingress and replicas hand each other, and which adapter version a request is routed by.

No Ray here: serving.fleet holds the deployments, and this part is importable (and tested) without Ray.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qs

from core import adapter_store, checkpoints
from core.errors import ScalpelError
from serving.model_names import BARE, fine_tuned

LOAD_ROUTE = re.compile(r"^/api/adapters/([^/]+)/load$")


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as the ingress received it: what the replica's ASGI scope needs, and the body."""

    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    scheme: str = "http"
    http_version: str = "1.1"
    client: tuple[str, int] | None = None
    server: tuple[str, int | None] | None = None

    def scope(self) -> dict:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.http_version,
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "raw_path": self.raw_path,
            "query_string": self.query_string,
            "root_path": "",
            "headers": list(self.headers),
            "client": self.client,
            "server": self.server,
            "state": {},
        }


@dataclass(frozen=True)
class Start:
    """A replica's first message for a request: the status line, the headers and the first body bytes.

    The status is held back until the first byte of the body, so "not started" means nothing reached the
    client: such a request can still go to another replica."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    more: bool  # more body follows (a stream), as further messages of bytes


def routed_model(method: str, path: str, query: bytes, body: bytes, base: str) -> str:
    """The multiplexed model id of a request: the adapter version its `model` names now (NAME@vN, or the
    checkpoint id of a fine-tuning checkpoint), "" for the base and for anything the replica will refuse
    (which then answers the error exactly as a single server does).

    A POST names it in its JSON body. A GET may name it in a `model` query parameter (`/health?model=NAME`
    answers from a replica that holds NAME's live version, and loads nothing); a single server ignores it."""
    if method in ("GET", "HEAD"):
        model: object = parse_qs(query.decode("latin-1")).get("model", [None])[0]
    elif method == "POST":
        try:
            data = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            return ""
        if not isinstance(data, dict):
            return ""
        if load := LOAD_ROUTE.match(path):  # POST /api/adapters/NAME/load: the replica that keeps it loads it
            version = data.get("version")
            model = f"{load.group(1)}@{version}" if isinstance(version, str) and version else load.group(1)
        else:
            model = data.get("model")
    else:
        return ""
    if not isinstance(model, str) or model in (base, base + BARE):
        return ""
    try:
        if checkpoints.is_checkpoint_id(model):
            checkpoints.resolve(model)
            return model
        return (fine_tuned(model) if model.startswith("ft:") else adapter_store.resolve(model)).ref
    except (ScalpelError, OSError, ValueError):
        return ""


def stored_version(model_id: str) -> adapter_store.AdapterVersion:
    """The version a multiplexed model id names (routed_model's answer)."""
    return checkpoints.resolve(model_id) if checkpoints.is_checkpoint_id(model_id) else adapter_store.resolve(model_id)
