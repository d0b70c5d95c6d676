"""The guards both servers share: a shared token, the worker-address allow-list and body-size caps.

Why each exists:
- the token keeps strangers on a shared network from registering workers or spending GPU time;
- the allow-list stops `/register_worker` from turning the controller into a proxy that calls any
  host it is told to (the controller calls registered workers back for status and health);
- the body cap refuses a 2 GB upload before it is read, instead of after it filled the memory.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omni_serve.serve.protocol import ErrorBody


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every refusal looks the same on the wire: an HTTP status and {"code", "message"}."""
    return JSONResponse(ErrorBody(code=code, message=message).model_dump(), status_code=status, headers=headers)


# --- token ----------------------------------------------------------------------------------------


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def token_refusal(request: Request, expected: str | None) -> JSONResponse | None:
    """None when the request may proceed; a 401 answer when a token is set and this one is wrong."""
    if expected is None:
        return None
    given = bearer_token(request)
    if given is None:
        return error_response(401, "unauthorized", "this server needs a token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return error_response(401, "unauthorized", "the token is wrong")
    return None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# --- worker addresses -----------------------------------------------------------------------------


class AddressRefused(ValueError):
    """A worker address the controller will not call."""


def check_worker_address(address: str, allowed: tuple[str, ...]) -> str:
    """Return the address as `scheme://host:port`, or raise AddressRefused saying why.

    `allowed` holds networks ("127.0.0.0/8", "10.1.0.0/16"), single addresses and host names. Names
    are compared as written, never resolved, so a DNS answer cannot widen the list.
    """
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError as exc:
        raise AddressRefused(f"not a URL: {address!r}") from exc
    if parts.scheme not in ("http", "https"):
        raise AddressRefused(f"worker address must be http:// or https://, got {address!r}")
    if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment:
        raise AddressRefused(f"worker address must be scheme://host:port only, got {address!r}")
    if parts.path not in ("", "/"):
        raise AddressRefused(f"worker address must not hold a path, got {address!r}")
    host = parts.hostname.lower()
    if not _host_allowed(host, allowed):
        raise AddressRefused(f"worker host {host!r} is not in the controller's allow-list {list(allowed)} "
                             "(start the controller with --allow-worker-hosts to add it)")
    netloc = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{netloc}:{port}" if port else f"{parts.scheme}://{netloc}"


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in allowed:
        entry = entry.strip().lower()
        if ip is None:
            if host == entry:
                return True
            continue
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name entry; an IP literal never matches it
    return False


# --- body size ------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """Raised while reading a request body that grew past the cap (bodies without Content-Length)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class BodyLimitMiddleware:
    """Refuse bodies over the cap with 413: at once when Content-Length says so, else while reading.

    `per_prefix` gives other caps to paths under a prefix (the controller's own messages are tiny, the
    speech API it also serves carries audio).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, per_prefix: tuple[tuple[str, int], ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_prefix = per_prefix

    def limit(self, path: str) -> int:
        return next((cap for prefix, cap in self.per_prefix if path.startswith(prefix)), self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def too_large(max_bytes: int) -> JSONResponse:
    return error_response(413, "too_large", f"the request body is larger than the limit of {max_bytes} bytes")


def install_guards(app: FastAPI, max_body_bytes: int, per_prefix: tuple[tuple[str, int], ...] = ()) -> None:
    """Body caps plus the 413 answer for bodies that only turn out too large while being read."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, per_prefix=per_prefix)

    async def on_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return too_large(exc.limit)

    app.add_exception_handler(BodyTooLarge, on_too_large)

