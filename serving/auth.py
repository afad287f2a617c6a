"""Bearer keys in two roles: client keys for inference and the model list, admin keys for everything else."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ScalpelError
from serving.context import context


class Forbidden(ScalpelError):
    status = 403
    type = "permission_error"


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the role its key has, and `owner`, a digest of the key that per-key limits count by
    (never the key itself). Without keys on loopback every caller is the one local operator, owner None."""

    role: str  # "client" or "admin"
    owner: str | None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _matches(given: bytes, keys: frozenset[str]) -> bool:
    # Every key is compared (no early exit), as bytes: compare_digest refuses non-ASCII text.
    return any([secrets.compare_digest(given, k.encode()) for k in keys])


def caller(request: Request) -> Caller:
    """The caller a key check recorded on the request (routes behind admin_key or client_key)."""
    return getattr(request.state, "caller", Caller("client", None))


def check_key(request: Request, *, admin: bool) -> Caller:
    """Client routes need any configured key (none when no key is configured). Admin routes need an admin key
    when there is one; without one they are open on loopback only (where client keys act as admin keys, a
    single local operator) and refused beyond it."""
    settings = context(request).settings
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode("utf-8", errors="surrogateescape") if scheme.lower() == "bearer" else b""
    owner = hashlib.sha256(given).hexdigest()[:16] if given else None
    if not settings.api_keys and not settings.admin_keys:
        if admin and not is_loopback(settings.host):
            raise StarletteHTTPException(
                401,
                f"the admin routes need an admin key when the server listens on "
                f"{settings.host}: start it with --admin-key or SCALPEL_ADMIN_KEYS",
            )
        request.state.caller = Caller("admin" if admin else "client", None)
        return request.state.caller
    role = "admin" if _matches(given, settings.admin_keys) else "client" if _matches(given, settings.api_keys) else None
    if role is None:
        raise StarletteHTTPException(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")
    if admin and role != "admin":
        if settings.admin_keys:
            raise Forbidden("this is a client key: this route needs an admin key", code="admin_key_required")
        if not is_loopback(settings.host):
            raise Forbidden(
                f"no admin key is configured and the server listens on {settings.host}: routes that write or "
                "train are refused; start it with --admin-key or SCALPEL_ADMIN_KEYS",
                code="admin_key_required",
            )
        role = "admin"
    request.state.caller = Caller(role, owner)
    return request.state.caller


def client_key(request: Request) -> Caller:
    """Dependency of the inference routes and the model list."""
    return check_key(request, admin=False)


def admin_key(request: Request) -> Caller:
    """Dependency of the routes that change the store, upload, or start work."""
    return check_key(request, admin=True)
