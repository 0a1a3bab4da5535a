"""The standalone stack: preflight, executor, task store and the A2A HTTP server, started and stopped as one.

``serve``, ``demo`` and the tests all run through :func:`serving`, so there is one way to bring
the stack up. Shutdown order (SIGTERM/SIGINT or leaving the context): the adapter's shutdown first
(running turns are interrupted and every task ends), then HTTP, then the task store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from molecule_codex.app_server import _our_version

logger = logging.getLogger("molecule_codex")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: Shipped as package data (a symlink to the repository's config.yaml in a source checkout).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"
#: uvicorn's wait for open connections once turns were interrupted (they end within ~1 s).
GRACEFUL_HTTP_SHUTDOWN_S = 3


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine ("" binds every interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def card_host(bind: str) -> str:
    """The host name the card advertises for a server bound to ``bind``: ``localhost`` for a
    loopback (what clients and conformance suites expect) or wildcard bind (no one address to
    name), an IPv6 literal in brackets, any other host as given."""
    if is_loopback(bind) or bind in ("0.0.0.0", "::", ""):
        return "localhost"
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(bind).version == 6:
            return f"[{bind}]"
    return bind


def parse_tokens(raw: str | None) -> tuple[str, ...]:
    """Comma-separated bearer tokens, one per caller."""
    return tuple(token.strip() for token in (raw or "").split(",") if token.strip())


def default_state_dir(env: dict[str, str] | os._Environ[str]) -> Path:
    """``$MOLECULE_CODEX_STATE_DIR``, else ``$XDG_STATE_HOME/molecule-codex`` (~/.local/state/…)."""
    explicit = env.get("MOLECULE_CODEX_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg).expanduser() / "molecule-codex"


@dataclass(frozen=True, slots=True)
class Running:
    """A served stack: its URL, the adapter behind it, and uvicorn's task."""

    url: str
    adapter: Any
    server: uvicorn.Server
    task: asyncio.Task[None]

    async def wait(self) -> None:
        """Until uvicorn stops (after a signal)."""
        await self.task


class _Server(uvicorn.Server):
    """uvicorn, with our shutdown first: interrupt turns so every task ends, then stop HTTP."""

    def __init__(self, config: uvicorn.Config, adapter: Any) -> None:
        super().__init__(config)
        self._adapter = adapter
        self._stopping: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._stopping is not None:
            super().handle_exit(sig, frame)  # second signal: uvicorn's forced exit
            return
        name = signal.Signals(sig).name
        logger.warning("received %s: interrupting running turns and shutting down", name)
        loop = asyncio.get_event_loop()
        self._stopping = loop.create_task(self._stop(name))

    async def _stop(self, signal_name: str) -> None:
        try:
            await self._adapter.shutdown(f"the agent is shutting down ({signal_name})")
        finally:
            self.should_exit = True


def host_options_from(args: argparse.Namespace, env: dict[str, str]) -> Any:
    """The adapter's HostOptions from the shared command-line flags (serve, doctor, demo)."""
    from molecule_codex.adapter import HostOptions

    return HostOptions(
        state_dir=(args.state_dir or default_state_dir(env)).expanduser().resolve(),
        workspace=(args.workdir or Path.cwd()).expanduser().resolve(),
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        model=args.model,
        env=env,
    )


@dataclass(frozen=True, slots=True)
class Stack:
    """The served pieces without HTTP: set-up adapter, its executor, the task store and the config."""

    adapter: Any
    config: Any
    executor: Any
    store: Any
    state_dir: Path


@contextlib.asynccontextmanager
async def stack(args: argparse.Namespace, *, env: dict[str, str] | None = None) -> AsyncIterator[Stack]:
    """Preflight and set up the adapter, its executor and the task store; tear them down on exit.

    ``serve`` puts HTTP in front of it; ``connect`` drives the same request handler from the
    platform's inbox (poll) or behind the platform's inbound secret (push).
    """
    from molecule_codex.adapter import CodexAdapter  # import late: --version must not need the stack
    from molecule_codex.task_store import create_task_store, task_store_url

    host_options = host_options_from(args, dict(os.environ if env is None else env))
    adapter = CodexAdapter(host=host_options)
    config = adapter.standalone_config(args.config)
    await adapter.setup(config)
    store = None
    try:
        executor = await adapter.create_executor(config)
        store = create_task_store(task_store_url(host_options.state_dir, getattr(args, "task_store", None)))
        await store.fail_unfinished()
        yield Stack(adapter, config, executor, store, host_options.state_dir)
    finally:
        await adapter.shutdown("the agent is shutting down")
        if store is not None:
            await store.close()


@contextlib.asynccontextmanager
async def serving(args: argparse.Namespace, *, env: dict[str, str] | None = None) -> AsyncIterator[Running]:
    """Preflight, build and start the whole stack on ``args.host:args.port``; stop it on exit."""
    from molecule_codex.host import build_agent_card, build_app, running_server

    async with stack(args, env=env) as parts:
        adapter, config = parts.adapter, parts.config
        public_host = card_host(args.host)
        card = build_agent_card(
            f"http://{public_host}:{args.port}/",
            name=config.runtime_config.get("name") or "codex",
            description=adapter.description(),
            version=_our_version(),
        )
        tokens = parse_tokens(getattr(args, "token", None))
        body_cap = {"max_body_bytes": args.max_body_bytes} if getattr(args, "max_body_bytes", None) else {}
        app, handler = build_app(parts.executor, card=card, task_store=parts.store, tokens=tokens, **body_cap)
        uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="off",
                                   timeout_graceful_shutdown=GRACEFUL_HTTP_SHUTDOWN_S)
        server = _Server(uv_config, adapter)
        try:
            async with running_server(server, card, public_host) as (url, task):
                logger.info("serving A2A on %s (codex thread per conversation; state in %s)", url, parts.state_dir)
                yield Running(url, adapter, server, task)
                if not task.done():
                    await adapter.shutdown("the agent is shutting down")
        finally:
            await adapter.shutdown("the agent is shutting down")
            await handler.aclose()
