"""The Molecule platform's External Connect endpoints, as one small HTTP client.

Every call carries ``Authorization: Bearer <workspace token>`` and ``Origin: <platform_url>``
(the hosted edge silently answers 404 on ``/workspaces/*`` without it). The token goes only to
``platform_url``: the client is bound to that base URL and never follows redirects, so a
redirect elsewhere cannot carry it away; it is never logged and never put in a URL.

Errors are sorted by what the caller should do: :class:`AuthRejected` (401/403: fatal at
register, retried later), :class:`CursorGone` (410: reset the feed cursor), :class:`Rejected`
(any other 4xx: the request itself is wrong, retrying cannot help) and :class:`Unavailable`
(connection errors, timeouts, 5xx, 408/429: retry with :class:`Backoff`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from molecule_codex import runtime_seam

logger = logging.getLogger(__name__)

TOKEN_ENV = "MOLECULE_WORKSPACE_TOKEN"
TOKEN_FILE_ENV = "MOLECULE_WORKSPACE_TOKEN_FILE"
AUTH_TOKEN_FILENAME = ".auth_token"
#: Ordinary calls: the platform answers in milliseconds; a stuck connection must not hold a loop.
REQUEST_TIMEOUT_S = 30.0
#: A reply to a push-mode peer is relayed synchronously (up to the platform's 30-minute A2A cap).
PEER_SEND_TIMEOUT_S = 31 * 60.0
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0
FEED_PAGE_LIMIT = 100
#: What the platform's own tools use on a cold start: the last ten minutes of the feed.
COLD_START_SINCE_S = 600
#: Error texts from the platform end up in logs; keep them short.
ERROR_TEXT_CHARS = 200


class PlatformError(Exception):
    """A platform call did not succeed; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthRejected(PlatformError):
    """401/403: the workspace token was refused."""


class CursorGone(PlatformError):
    """410 on the activity feed: the cursor row is unknown or pruned; omit ``since_id``."""


class Rejected(PlatformError):
    """A 4xx other than 401/403/408/410/429: the request is wrong, retrying will not help."""


class Unavailable(PlatformError):
    """Connection failure, timeout, 5xx, 408 or 429: retry later."""


class TokenError(RuntimeError):
    """No workspace token could be found; the message says where we looked."""


@dataclass(frozen=True, slots=True)
class Token:
    """The workspace token and a description of where it came from (never the value)."""

    value: str = ""
    source: str = ""

    def __repr__(self) -> str:  # a stray log of the object must not print the secret
        return f"Token(source={self.source!r})"


def resolve_token(env: Mapping[str, str]) -> Token:
    """``MOLECULE_WORKSPACE_TOKEN``, else the file named by ``MOLECULE_WORKSPACE_TOKEN_FILE``,
    else ``${CONFIGS_DIR}/.auth_token`` (the order of the platform's own tools)."""
    value = (env.get(TOKEN_ENV) or "").strip()
    if value:
        return Token(value, TOKEN_ENV)
    named = (env.get(TOKEN_FILE_ENV) or "").strip()
    if named:
        path = Path(named).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise TokenError(f"{TOKEN_FILE_ENV} names {path}, which cannot be read ({exc.strerror})") from None
        if not value:
            raise TokenError(f"{TOKEN_FILE_ENV} names {path}, which is empty")
        return Token(value, f"{TOKEN_FILE_ENV} ({path})")
    path = runtime_seam.resolve_configs_dir(env) / AUTH_TOKEN_FILENAME
    try:
        value = path.read_text().strip()
    except OSError:
        value = ""
    if not value:
        raise TokenError(
            f"no workspace token: set {TOKEN_ENV} (or {TOKEN_FILE_ENV}) to the auth token shown in the "
            f"workspace's External Connect modal, or put it in {path}"
        )
    return Token(value, str(path))


class Backoff:
    """Exponential delay, 1 s doubling to 60 s; ``reset()`` after every success."""

    def __init__(self, initial: float = BACKOFF_INITIAL_S, maximum: float = BACKOFF_MAX_S) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def delay(self) -> float:
        """The delay to wait now; the following one doubles (up to the maximum)."""
        current = self._next
        self._next = min(self._next * 2, self.maximum)
        return current

    async def wait(self) -> float:
        seconds = self.delay()
        await asyncio.sleep(seconds)
        return seconds


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        text = body.get("error") or body.get("message") or body if isinstance(body, dict) else body
    except ValueError:
        text = response.text
    return str(text)[:ERROR_TEXT_CHARS]


def _raise_for(response: httpx.Response, what: str) -> None:
    status = response.status_code
    if status < 400:
        return
    detail = f"{what}: HTTP {status} {_error_text(response)}"
    if status in (401, 403):
        raise AuthRejected(detail, status)
    if status == 410:
        raise CursorGone(detail, status)
    if status in (408, 429) or status >= 500:
        raise Unavailable(detail, status)
    raise Rejected(detail, status)


class PlatformClient:
    """One workspace's calls to the platform (register, heartbeat, feed, replies, ack)."""

    def __init__(self, platform_url: str, workspace_id: str, token: Token, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.platform_url = platform_url.rstrip("/")
        self.workspace_id = workspace_id
        self.token_source = token.source
        self._http = httpx.AsyncClient(
            base_url=self.platform_url,
            headers={
                "Authorization": f"Bearer {token.value}",
                "Origin": self.platform_url,
                "Content-Type": "application/json",
            },
            timeout=REQUEST_TIMEOUT_S,
            follow_redirects=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, what: str, *, timeout: float | None = None,
                    **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(
                method, path, timeout=timeout if timeout is not None else REQUEST_TIMEOUT_S, **kwargs
            )
        except httpx.HTTPError as exc:
            raise Unavailable(f"{what}: {type(exc).__name__} {str(exc)[:ERROR_TEXT_CHARS]}") from None
        _raise_for(response, what)
        return response

    @staticmethod
    def _json(response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise Unavailable(f"{what}: the answer is not JSON (HTTP {response.status_code})") from None

    async def register(self, agent_card: dict[str, Any], *, url: str, delivery_mode: str) -> dict[str, Any]:
        """``POST /registry/register``; always with ``delivery_mode`` (a push row without url is a 400)."""
        body = {"id": self.workspace_id, "agent_card": agent_card, "url": url, "delivery_mode": delivery_mode}
        response = await self._call("POST", "/registry/register", "register", json=body)
        answer = self._json(response, "register")
        return answer if isinstance(answer, dict) else {}

    async def heartbeat(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /registry/heartbeat``; the answer carries the current inbound secret."""
        response = await self._call("POST", "/registry/heartbeat", "heartbeat",
                                    json={"workspace_id": self.workspace_id, **payload})
        answer = self._json(response, "heartbeat")
        return answer if isinstance(answer, dict) else {}

    async def activity(self, *, since_id: str | None) -> list[dict[str, Any]]:
        """One page of ``a2a_receive`` rows, oldest first (a cold-start page is reversed here)."""
        params: dict[str, Any] = {"type": "a2a_receive", "limit": FEED_PAGE_LIMIT}
        if since_id is None:
            params["since_secs"] = COLD_START_SINCE_S
        else:
            params["since_id"] = since_id
        response = await self._call("GET", f"/workspaces/{self.workspace_id}/activity", "activity feed",
                                    params=params)
        answer = self._json(response, "activity feed")
        rows = answer.get("activities", answer.get("items", [])) if isinstance(answer, dict) else answer
        if not isinstance(rows, list):
            raise Unavailable("activity feed: the answer is not a list of rows")
        rows = [row for row in rows if isinstance(row, dict)]
        return rows if since_id is not None else list(reversed(rows))

    async def notify(self, text: str) -> None:
        """Reply to the canvas user: ``POST /workspaces/:id/notify``."""
        try:
            await self._call("POST", f"/workspaces/{self.workspace_id}/notify", "notify",
                             json={"message": text, "attachments": []})
        except AuthRejected as exc:
            if exc.status == 403 and "talk_to_user_disabled" in str(exc):
                raise Rejected(str(exc), exc.status) from None  # a workspace setting, not our token
            raise

    async def send_to_peer(self, peer_id: str, text: str, *, message_id: str) -> None:
        """Reply to a peer workspace: a new ``message/send`` through the platform, as ourselves.

        ``X-Workspace-ID`` marks it as coming from this agent (without it the peer's chat shows it
        as typed by a human). ``message_id`` is derived from the row, so a receiver that
        deduplicates by message id drops a re-send after a crash.
        """
        body = {
            "jsonrpc": "2.0",
            "id": str(uuid.uuid4()),
            "method": "message/send",
            "params": {"message": {"role": "user", "messageId": message_id,
                                   "parts": [{"kind": "text", "text": text}]}},
        }
        response = await self._call(
            "POST", f"/workspaces/{peer_id}/a2a", f"reply to peer {peer_id}", json=body,
            headers={"X-Workspace-ID": self.workspace_id}, timeout=PEER_SEND_TIMEOUT_S,
        )
        answer = self._json(response, f"reply to peer {peer_id}")
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            # Delivered to the platform; the peer's own handling failed. Not ours to retry.
            logger.warning("peer %s answered our reply with an error: %s", peer_id,
                           str(answer["error"].get("message"))[:ERROR_TEXT_CHARS])

    async def ack(self, seq: int) -> None:
        """Retention ack: rows up to ``seq`` may be pruned after 7 days."""
        await self._call("POST", f"/workspaces/{self.workspace_id}/activity/ack", "activity ack",
                         json={"acked_seq": seq})
