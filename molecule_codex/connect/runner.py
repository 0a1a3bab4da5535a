"""``molecule-codex connect``: set up the stack, register, heartbeat, then poll or serve push calls.

Order matters for exactly-once and for secrets: the stack (preflight, codex warm) comes first, so
a broken setup never registers; register decides whether the token works (401/403: exit 1 with a
sentence naming where the token came from, never the token); the push listener opens only after
register returned the inbound secret. On SIGTERM/SIGINT poll mode stops its turns *before* the
adapter shuts down, so an interrupted turn leaves its row unanswered (the next start runs it
again) instead of answering it with "the agent is shutting down".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from a2a.server.request_handlers.response_helpers import agent_card_to_dict

from molecule_codex.app_server import _our_version
from molecule_codex.connect.heartbeat import HEARTBEAT_INTERVAL_S, TurnTracker, heartbeat_loop, heartbeat_payload
from molecule_codex.connect.inbox import POLL_INTERVAL_S, Inbox
from molecule_codex.connect.platform import (
    AuthRejected,
    Backoff,
    PlatformClient,
    Rejected,
    Token,
    TokenError,
    Unavailable,
    resolve_token,
)
from molecule_codex.connect.push import InboundSecret, InboundSecretGate, PushServer, check_public_url
from molecule_codex.connect.state import InboxState, StateLocked, lock_state_dir
from molecule_codex.host import build_agent_card, build_app, running_server

logger = logging.getLogger(__name__)

#: Exit codes: 1 = the platform or the preflight refused us, 2 = the command line/env is incomplete.
EXIT_REFUSED = 1
EXIT_USAGE = 2
#: uvicorn's wait for open connections once turns were interrupted (push mode).
GRACEFUL_HTTP_SHUTDOWN_S = 3


class ConnectError(RuntimeError):
    """A reason to stop before or at register; ``code`` is the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class ConnectSettings:
    platform_url: str
    workspace_id: str
    token: Token
    public_url: str | None
    host: str
    port: int
    poll_interval: float = POLL_INTERVAL_S
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S

    @property
    def delivery_mode(self) -> str:
        return "push" if self.public_url else "poll"


def connect_settings(args: argparse.Namespace, env: Mapping[str, str]) -> ConnectSettings:
    """The connection settings from flags and env; ConnectError says what is missing."""
    platform_url = (args.platform_url or "").strip().rstrip("/")
    workspace_id = (args.workspace_id or "").strip()
    if not platform_url or urllib.parse.urlsplit(platform_url).scheme not in ("http", "https"):
        raise ConnectError("set PLATFORM_URL (or --platform-url) to the platform URL shown in the workspace's "
                           "External Connect modal, e.g. https://your-org.example.com", EXIT_USAGE)
    if not workspace_id:
        raise ConnectError("set WORKSPACE_ID (or --workspace-id) to the workspace id shown in the External "
                           "Connect modal", EXIT_USAGE)
    if args.public_url and (reason := check_public_url(args.public_url)):
        raise ConnectError(reason, EXIT_USAGE)
    try:
        token = resolve_token(env)
    except TokenError as exc:
        raise ConnectError(str(exc), EXIT_USAGE) from None
    return ConnectSettings(platform_url, workspace_id, token, args.public_url or None, args.host, args.port,
                           args.poll_interval, args.heartbeat_interval)


async def register(platform: PlatformClient, card: dict[str, Any], settings: ConnectSettings,
                   stop: asyncio.Event) -> dict[str, Any] | None:
    """Register (retrying outages with backoff); None when stopped first; ConnectError when refused."""
    backoff = Backoff()
    while not stop.is_set():
        try:
            return await platform.register(card, url=settings.public_url or "", delivery_mode=settings.delivery_mode)
        except AuthRejected as exc:
            raise ConnectError(
                f"the platform refused the workspace token from {settings.token.source} (HTTP {exc.status}): "
                "copy the current token from the workspace's External Connect modal (or rotate it there)",
                EXIT_REFUSED,
            ) from None
        except Rejected as exc:
            raise ConnectError(f"the platform refused to register workspace {settings.workspace_id}: {exc}. "
                               "Check PLATFORM_URL and WORKSPACE_ID", EXIT_REFUSED) from None
        except Unavailable as exc:
            delay = backoff.delay()
            logger.warning("register failed: %s; retrying in %.0f s", exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    return None


async def _first(stop: asyncio.Event, task: asyncio.Task[Any]) -> None:
    """Until a stop signal or the task ends (its exception, if any, is raised)."""
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()


async def run_connect(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """The whole ``connect`` command; returns the exit code."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll is noise
    try:
        settings = connect_settings(args, env)
    except ConnectError as exc:
        logger.error("connect: %s", exc)
        return exc.code
    from molecule_codex.standalone import host_options_from, stack  # these need codex; the checks above do not

    try:
        lock = lock_state_dir(host_options_from(args, dict(env)).state_dir)
    except (StateLocked, OSError) as exc:
        logger.error("connect: %s", exc)
        return EXIT_REFUSED
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    platform = PlatformClient(settings.platform_url, settings.workspace_id, settings.token)
    try:
        # The executor maps platform messages without contextId by WORKSPACE_ID (canvas-<id>), flag or env.
        stack_env = {**env, "WORKSPACE_ID": settings.workspace_id, "PLATFORM_URL": settings.platform_url}
        async with stack(args, env=stack_env) as parts:
            return await _connected(parts, platform, settings, stop)
    except ConnectError as exc:
        logger.error("connect: %s", exc)
        return exc.code
    except RuntimeError as exc:  # preflight and setup say what is wrong and how to fix it
        logger.debug("connect stopped", exc_info=True)
        logger.error("%s", exc)
        return EXIT_REFUSED
    finally:
        await platform.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        os.close(lock)


async def _connected(parts: Any, platform: PlatformClient, settings: ConnectSettings, stop: asyncio.Event) -> int:
    tracker = TurnTracker(parts.executor)
    card_url = settings.public_url or f"{settings.platform_url}/workspaces/{settings.workspace_id}/a2a"
    card = build_agent_card(card_url, name=parts.config.runtime_config.get("name") or "codex",
                            description=parts.adapter.description(), version=_our_version())
    app, handler = build_app(tracker, card=card, task_store=parts.store)
    heartbeat: asyncio.Task[None] | None = None
    try:
        answer = await register(platform, {**agent_card_to_dict(card), "configuration_status": "ready"},
                                settings, stop)
        if answer is None:
            return 0
        logger.info("connect: workspace %s registered with %s (delivery %s)", settings.workspace_id,
                    settings.platform_url, answer.get("delivery_mode") or settings.delivery_mode)
        secret = InboundSecret()
        if isinstance(answer.get("platform_inbound_secret"), str) and answer["platform_inbound_secret"]:
            secret.set(answer["platform_inbound_secret"])
        started = time.monotonic()
        heartbeat = asyncio.create_task(heartbeat_loop(
            platform, lambda: heartbeat_payload(parts.adapter, tracker, started),
            interval=settings.heartbeat_interval, on_secret=secret.set,
        ), name="heartbeat")
        if settings.public_url:
            await _push(app, card, secret, settings, adapter=parts.adapter, stop=stop)
        else:
            await _poll(platform, handler, parts.state_dir, settings, stop)
        logger.info("connect: stopped")
        return 0
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        await handler.aclose()


async def _poll(platform: PlatformClient, handler: Any, state_dir: Any, settings: ConnectSettings,
                stop: asyncio.Event) -> None:
    inbox = Inbox(platform, handler, InboxState.load(state_dir), poll_interval=settings.poll_interval)
    logger.info("connect: polling the activity feed every %g s (state in %s)", settings.poll_interval, state_dir)
    poll = asyncio.create_task(inbox.run(), name="inbox")
    try:
        await _first(stop, poll)
    finally:
        poll.cancel()
        await asyncio.gather(poll, return_exceptions=True)
        await inbox.stop()


async def _push(app: Any, card: Any, secret: InboundSecret, settings: ConnectSettings, *, adapter: Any,
                stop: asyncio.Event) -> None:
    if not secret.known:
        raise ConnectError("register answered without platform_inbound_secret, so push calls cannot be "
                           "authenticated; this platform needs poll mode (run connect without --public-url)",
                           EXIT_REFUSED)
    config = uvicorn.Config(InboundSecretGate(app, secret), host=settings.host, port=settings.port,
                            log_level="warning", lifespan="off", timeout_graceful_shutdown=GRACEFUL_HTTP_SHUTDOWN_S)
    server = PushServer(config)
    async with running_server(server, card, settings.host) as (url, task):
        for interface in card.supported_interfaces:
            interface.url = settings.public_url  # the card names the URL callers use
        logger.info("connect: push mode listening on %s for %s", url, settings.public_url)
        try:
            await _first(stop, task)
        finally:
            await adapter.shutdown("the agent is shutting down")
