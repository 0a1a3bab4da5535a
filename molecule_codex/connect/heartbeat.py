"""Heartbeats: the platform shows the workspace online (and busy, or degraded) only from these.

:class:`TurnTracker` wraps the executor as a plain ``AgentExecutor`` (it only delegates), so the
running-turn count and the current task come from the one place every turn passes through, in
poll and push mode alike, without reaching into the executor. The loop beats every 20 s (the
platform marks a workspace offline after ~180 s of silence), backs off 1 s → 60 s while the
platform is unreachable, and hands each answer's ``platform_inbound_secret`` to push mode.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue

from molecule_codex import runtime_seam
from molecule_codex.connect.platform import AuthRejected, Backoff, PlatformClient, PlatformError

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 20.0
#: The canvas shows current_task in one line.
PREVIEW_CHARS = 120


class TurnTracker(AgentExecutor):
    """The executor, counted: how many turns run now, and what the newest one is about."""

    def __init__(self, inner: AgentExecutor) -> None:
        self.inner = inner
        self._running: dict[int, str] = {}
        self._next = 0

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def current_task(self) -> str:
        return next(reversed(self._running.values()), "") if self._running else ""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        key, self._next = self._next, self._next + 1
        preview = " ".join(context.get_user_input()[: PREVIEW_CHARS * 2].split())[:PREVIEW_CHARS]
        self._running[key] = preview or f"conversation {context.context_id}"
        try:
            await self.inner.execute(context, event_queue)
        finally:
            self._running.pop(key, None)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        await self.inner.cancel(context, event_queue)


def heartbeat_payload(adapter: Any, tracker: TurnTracker | None, started: float) -> dict[str, Any]:
    """The periodic beat: load, uptime, static capabilities and idle timeout, wedge state."""
    active = tracker.active if tracker else 0
    payload: dict[str, Any] = {
        "error_rate": 0.0,
        "sample_error": "",
        "active_tasks": active,
        "current_task": tracker.current_task if tracker else "",
        "uptime_seconds": int(time.monotonic() - started),
        "is_busy": active > 0,
        "runtime_metadata": {
            "capabilities": adapter.capabilities().to_dict(),
            "idle_timeout_seconds": adapter.idle_timeout_override(),
        },
    }
    if runtime_seam.is_wedged():
        payload["runtime_state"] = "wedged"
        payload["sample_error"] = runtime_seam.wedge_reason()
    return payload


async def heartbeat_loop(
    platform: PlatformClient,
    payload: Callable[[], dict[str, Any]],
    *,
    interval: float = HEARTBEAT_INTERVAL_S,
    on_secret: Callable[[str], None] | None = None,
) -> None:
    """Beat forever (cancel to stop); a failure is logged and retried with backoff, never fatal."""
    backoff = Backoff()
    failing = False
    while True:
        try:
            answer = await platform.heartbeat(payload())
        except PlatformError as exc:
            delay = min(backoff.delay(), interval)  # never beat less often than when healthy
            if isinstance(exc, AuthRejected):
                logger.error("heartbeat refused: the platform rejects the workspace token from %s (HTTP %s); "
                             "retrying in %.0f s", platform.token_source, exc.status, delay)
            else:
                logger.warning("heartbeat failed: %s; retrying in %.0f s", exc, delay)
            failing = True
            await asyncio.sleep(delay)
            continue
        if failing:
            logger.info("heartbeat delivered again after an outage")
            failing = False
        backoff.reset()
        secret = answer.get("platform_inbound_secret")
        if on_secret is not None and isinstance(secret, str) and secret:
            on_secret(secret)
        await asyncio.sleep(interval)
