"""Bearer keys: client routes need one when keys are configured; admin routes always do beyond loopback."""

from __future__ import annotations

import ipaddress
import secrets

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.context import context


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_key(request: Request, *, admin: bool) -> None:
    settings = context(request).settings
    if not settings.api_keys:
        if admin and not is_loopback(settings.host):
            raise StarletteHTTPException(
                401,
                f"the admin routes need an API key when the server listens on "
                f"{settings.host}: start it with --api-key or SCALPEL_API_KEYS",
            )
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(secrets.compare_digest(token, k) for k in settings.api_keys):
        raise StarletteHTTPException(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")


def client_key(request: Request) -> None:
    """Dependency of the inference routes."""
    check_key(request, admin=False)


def admin_key(request: Request) -> None:
    """Dependency of the routes that change the store or start work."""
    check_key(request, admin=True)
