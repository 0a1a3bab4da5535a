"""A loopback stand-in for the Molecule platform's External Connect endpoints (shared/briefs/external-connect.md).

Implemented as the brief describes the platform, so ``molecule-codex connect`` is tested against
the contract and not against itself:

* every call needs ``Authorization: Bearer <workspace token>`` (else 401 ``missing/invalid
  workspace auth token``); ``/workspaces/*`` also needs ``Origin: <platform url>`` (else a bare 404,
  like the hosted edge);
* ``POST /registry/register`` needs ``agent_card``; without ``delivery_mode`` the row stays push and
  an empty url is a 400; answers ``registered`` with the inbound secret;
* ``POST /registry/heartbeat`` needs ``workspace_id``; answers ``ok``, a generation and the secret;
* ``GET /workspaces/:id/activity?type=a2a_receive``: with ``since_id`` oldest first, without it
  newest first (``since_secs`` honoured); unknown or pruned ``since_id`` → 410; rows carry ``seq``;
* ``POST /workspaces/:id/notify`` → ``{"status":"sent"}`` and an echo row (``method: notify``,
  null ``source_id``) in the same feed, as the platform does; 403 ``talk_to_user_disabled`` on cue;
* ``POST /workspaces/:id/a2a`` → ``{"status":"queued","delivery_mode":"poll"}``; to our workspace it
  records an ``a2a_receive`` row (``source_id`` = ``X-Workspace-ID``), to any other it records a
  peer send;
* ``POST /workspaces/:id/activity/ack`` records ``acked_seq``.

The server runs on its own event-loop thread, so sync and async tests and a subprocess can all use
it; :meth:`FakePlatform.down` closes the listening socket (connection refused) until :meth:`up`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

OFFLINE_AFTER_S = 180.0
START_TIMEOUT_S = 10.0


@dataclass
class Sent:
    """A reply the agent delivered: to the canvas (notify) or to a peer (a2a)."""

    at: float
    body: dict[str, Any]
    peer: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        if self.peer is None:
            return self.body.get("message", "")
        parts = self.body.get("params", {}).get("message", {}).get("parts", [])
        return "".join(part.get("text", "") for part in parts)

    @property
    def message_id(self) -> str:
        return self.body.get("params", {}).get("message", {}).get("messageId", "")


class FakePlatform:
    """One workspace (``workspace_id``, ``token``) on a fake platform."""

    def __init__(self, workspace_id: str = "ws-codex", token: str | None = None, *,
                 inject_canvas_context: bool = False) -> None:
        self.workspace_id = workspace_id
        self.token = token or secrets.token_urlsafe(32)
        self.inject_canvas_context = inject_canvas_context
        self.secret = secrets.token_urlsafe(24)
        self.talk_to_user_disabled = False
        self.rows: list[dict[str, Any]] = []
        self.pruned: set[str] = set()
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[tuple[float, dict[str, Any]]] = []
        self.notifies: list[Sent] = []
        self.peer_sends: list[Sent] = []
        self.acks: list[int] = []
        self.log: list[tuple[str, str, int]] = []
        self._seq = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-platform", daemon=True)
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self.port = 0
        self.app = Starlette(routes=[
            Route("/registry/register", self._register, methods=["POST"]),
            Route("/registry/heartbeat", self._heartbeat, methods=["POST"]),
            Route("/workspaces/{ws}/activity", self._activity, methods=["GET"]),
            Route("/workspaces/{ws}/activity/ack", self._ack, methods=["POST"]),
            Route("/workspaces/{ws}/notify", self._notify, methods=["POST"]),
            Route("/workspaces/{ws}/a2a", self._a2a, methods=["POST"]),
        ])

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakePlatform:
        self._thread.start()
        self.up()
        return self

    def stop(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FakePlatform:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def up(self) -> None:
        """Listen (again, on the same port)."""
        asyncio.run_coroutine_threadsafe(self._up(), self._loop).result(START_TIMEOUT_S)

    def down(self) -> None:
        """Close the listener and every connection: calls fail with connection refused."""
        asyncio.run_coroutine_threadsafe(self._down(), self._loop).result(START_TIMEOUT_S)

    async def _up(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=0)
        self._server = uvicorn.Server(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        async with asyncio.timeout(START_TIMEOUT_S):
            while not self._server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                await asyncio.sleep(0.01)
        self._sock = sock

    async def _down(self) -> None:
        if self._server is None or self._serving is None:
            return
        self._server.should_exit = True
        self._server.force_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._serving, START_TIMEOUT_S)
        self._server = self._serving = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------------ test helpers

    def add_row(self, *, method: str = "message/send", source_id: str | None = None,
                request_body: Any = None, created_at: float | None = None) -> str:
        """Record an ``a2a_receive`` row as the platform does; returns its id."""
        with self._changed:
            self._seq += 1
            row = {
                "id": str(uuid.uuid4()),
                "workspace_id": self.workspace_id,
                "activity_type": "a2a_receive",
                "source_id": source_id,
                "method": method,
                "request_body": request_body,
                "created_at": created_at if created_at is not None else time.time(),
                "seq": self._seq,
            }
            self.rows.append(row)
            self._changed.notify_all()
            return row["id"]

    def message(self, text: str, *, source_id: str | None = None, context_id: str | None = None,
                parts: list[dict[str, Any]] | None = None) -> str:
        """A v0.3 ``message/send`` from the canvas user (no source) or a peer workspace."""
        message: dict[str, Any] = {"role": "user", "messageId": str(uuid.uuid4()),
                                   "parts": parts if parts is not None else [{"kind": "text", "text": text}]}
        if context_id is None and source_id is None and self.inject_canvas_context:
            context_id = f"canvas-{self.workspace_id}"
        if context_id:
            message["contextId"] = context_id
        body = {"jsonrpc": "2.0", "id": str(uuid.uuid4()), "method": "message/send", "params": {"message": message}}
        return self.add_row(source_id=source_id, request_body=body)

    def replies(self) -> list[Sent]:
        with self._lock:
            return [*self.notifies, *self.peer_sends]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise AssertionError(f"fake platform: {what} not met within {timeout} s")

    def online(self, now: float | None = None) -> bool:
        with self._lock:
            return bool(self.heartbeats) and (now or time.monotonic()) - self.heartbeats[-1][0] < OFFLINE_AFTER_S

    def deliver_push(self, body: dict[str, Any], *, authorization: str | None = "", timeout: float = 60.0
                     ) -> httpx.Response:
        """What the platform does for a push-mode workspace: POST the v0.3 body to the registered URL
        with ``Bearer <inbound secret>`` (``authorization`` overrides the header; None omits it)."""
        with self._lock:
            url = self.registrations[-1]["url"]
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization or f"Bearer {self.secret}"
        return httpx.post(url, content=json.dumps(body), headers=headers, timeout=timeout)

    # ------------------------------------------------------------------ endpoints

    def _denied(self, request: Request) -> Response | None:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"error": "missing/invalid workspace auth token"}, status_code=401)
        if request.url.path.startswith("/workspaces/") and request.headers.get("origin") != self.url:
            return PlainTextResponse("404 page not found", status_code=404)
        return None

    def _record(self, request: Request, status: int) -> None:
        with self._changed:
            self.log.append((request.method, request.url.path, status))
            self._changed.notify_all()

    async def _json(self, request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            return None

    async def _guarded(self, request: Request, handle: Callable[[Any], Response]) -> Response:
        response = self._denied(request) or handle(await self._json(request))
        self._record(request, response.status_code)
        return response

    async def _register(self, request: Request) -> Response:
        def handle(body: Any) -> Response:
            if not isinstance(body, dict) or body.get("id") != self.workspace_id:
                return JSONResponse({"error": "id does not match the token's workspace"}, status_code=400)
            if not isinstance(body.get("agent_card"), dict):
                return JSONResponse({"error": "agent_card is required"}, status_code=400)
            mode = body.get("delivery_mode") or "push"  # the canvas creates external rows as push
            if mode not in ("push", "poll"):
                return JSONResponse({"error": "delivery_mode must be push or poll"}, status_code=400)
            if mode == "push" and not body.get("url"):
                return JSONResponse({"error": "url is required for push-mode workspaces"}, status_code=400)
            with self._changed:
                self.registrations.append(body)
            return JSONResponse({"status": "registered", "delivery_mode": mode,
                                 "platform_inbound_secret": self.secret})
        return await self._guarded(request, handle)

    async def _heartbeat(self, request: Request) -> Response:
        def handle(body: Any) -> Response:
            if not isinstance(body, dict) or body.get("workspace_id") != self.workspace_id:
                return JSONResponse({"error": "workspace_id is required"}, status_code=400)
            with self._changed:
                self.heartbeats.append((time.monotonic(), body))
                generation = len(self.heartbeats)
            return JSONResponse({"status": "ok", "generation": generation, "platform_inbound_secret": self.secret})
        return await self._guarded(request, handle)

    async def _activity(self, request: Request) -> Response:
        denied = self._denied(request)
        if denied is not None:
            self._record(request, denied.status_code)
            return denied
        query = request.query_params
        limit = int(query.get("limit", "100"))
        with self._lock:
            rows = [row for row in self.rows if row["id"] not in self.pruned]
            if query.get("type") != "a2a_receive":
                rows = []
            since_id = query.get("since_id")
            if since_id is not None:
                index = next((i for i, row in enumerate(rows) if row["id"] == since_id), None)
                if index is None:
                    response: Response = JSONResponse({"error": "omit since_id to reset"}, status_code=410)
                else:
                    response = JSONResponse(rows[index + 1: index + 1 + limit])
            else:
                since = time.time() - float(query.get("since_secs", "600"))
                recent = [row for row in rows if row["created_at"] >= since]
                response = JSONResponse(list(reversed(recent))[:limit])
        self._record(request, response.status_code)
        return response

    async def _ack(self, request: Request) -> Response:
        def handle(body: Any) -> Response:
            if not isinstance(body, dict) or not isinstance(body.get("acked_seq"), int):
                return JSONResponse({"error": "acked_seq is required"}, status_code=400)
            with self._changed:
                self.acks.append(body["acked_seq"])
            return JSONResponse({"status": "ok"})
        return await self._guarded(request, handle)

    async def _notify(self, request: Request) -> Response:
        def handle(body: Any) -> Response:
            if self.talk_to_user_disabled:
                return JSONResponse({"error": "talk_to_user_disabled"}, status_code=403)
            if not isinstance(body, dict) or not isinstance(body.get("message"), str):
                return JSONResponse({"error": "message is required"}, status_code=400)
            with self._changed:
                self.notifies.append(Sent(time.monotonic(), body))
            self.add_row(method="notify", source_id=None, request_body=body)  # our reply lands in our feed
            return JSONResponse({"status": "sent"})
        return await self._guarded(request, handle)

    async def _a2a(self, request: Request) -> Response:
        target = request.path_params["ws"]
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() != "authorization"}

        def handle(body: Any) -> Response:
            if not isinstance(body, dict):
                return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}})
            if target == self.workspace_id:
                self.add_row(source_id=headers.get("x-workspace-id"), request_body=body)
            else:
                with self._changed:
                    self.peer_sends.append(Sent(time.monotonic(), body, peer=target, headers=headers))
            return JSONResponse({"status": "queued", "delivery_mode": "poll"})
        return await self._guarded(request, handle)
