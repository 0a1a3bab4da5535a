"""Push mode: the platform POSTs A2A v0.3 JSON-RPC to our public URL with the inbound secret.

The served app is ``host.build_app`` (the same one ``serve`` runs) behind :class:`InboundSecretGate`,
a plain ASGI wrapper that answers 401 before the request body is read unless ``Authorization:
Bearer <platform_inbound_secret>`` matches (constant-time). Only the agent card and the health
check are public. The secret comes from register and is refreshed from every heartbeat answer;
the listener starts only once it is known, and it lives in memory only (register hands out a new
one on every start, so there is nothing worth persisting).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import urllib.parse
from collections.abc import Iterator
from typing import Any

import uvicorn
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH

from molecule_codex.host import HEALTH_PATH

logger = logging.getLogger(__name__)

PUBLIC_GET_PATHS = frozenset({AGENT_CARD_WELL_KNOWN_PATH, "/.well-known/agent.json", HEALTH_PATH})


class InboundSecret:
    """The current platform inbound secret (refreshed from heartbeats)."""

    def __init__(self) -> None:
        self._value: bytes | None = None

    @property
    def known(self) -> bool:
        return self._value is not None

    def set(self, value: str) -> None:
        new = value.encode()
        if self._value is not None and not hmac.compare_digest(new, self._value):
            logger.info("platform inbound secret rotated")
        self._value = new

    def matches(self, authorization: bytes) -> bool:
        """Whether an ``Authorization`` header value carries the secret (constant time)."""
        scheme, _, presented = authorization.partition(b" ")
        if self._value is None or scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(presented.strip(), self._value)


class InboundSecretGate:
    """ASGI wrapper: refuse every non-public request without the secret, before reading its body."""

    def __init__(self, app: Any, secret: InboundSecret) -> None:
        self.app = app
        self.secret = secret

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan: no caller behind it
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "WEBSOCKET")
        if method in ("GET", "HEAD") and scope["path"] in PUBLIC_GET_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.secret.matches(headers.get(b"authorization", b"")):
            await self.app(scope, receive, send)
            return
        logger.warning("push call refused: missing or wrong inbound secret (%s %s)", method, scope["path"])
        if scope["type"] == "websocket":  # closing before accept refuses the upgrade (HTTP 403)
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": "unauthorized: missing or invalid platform inbound secret"}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"), (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})


def check_public_url(url: str) -> str | None:
    """Why ``url`` cannot be a push URL, or None. HTTPS, except plain HTTP on loopback (development)."""
    parsed = urllib.parse.urlsplit(url)
    if not parsed.hostname:
        return f"--public-url {url!r} has no host"
    if parsed.scheme == "https":
        return None
    try:
        loopback = parsed.hostname == "localhost" or ipaddress.ip_address(parsed.hostname).is_loopback
    except ValueError:
        loopback = False
    if parsed.scheme == "http" and loopback:
        return None
    return f"--public-url must be an https:// URL the platform can reach (got {url!r})"


class PushServer(uvicorn.Server):
    """uvicorn without its own signal handlers: ``connect`` owns SIGTERM/SIGINT and stops in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
