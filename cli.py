"""``molecule-codex``: run the codex adapter without the Molecule platform.

* ``serve``: preflight (the adapter's ``setup()``), then A2A on 127.0.0.1:8000 with uvicorn.
* ``doctor``: the preflight report, one line per check; exit 1 on any failure.
* ``demo``: the offline demo (scripted model on loopback, real codex, real A2A client).
* ``--version``: our version and the codex binary's.

Shutdown (SIGTERM/SIGINT): stop accepting, interrupt running turns (their tasks end FAILED with
the reason), close codex, exit; the conversation map is already on disk after every change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from app_server import _our_version
from codex_binary import CodexBinaryError, resolve_codex_binary

logger = logging.getLogger("molecule_codex")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"
#: uvicorn's wait for open connections once turns were interrupted (they end within ~1 s).
GRACEFUL_HTTP_SHUTDOWN_S = 3


def configure_logging(level: str) -> None:
    """One handler on the root logger; the runtime never configures logging, so we do."""
    from adapter import LOG_FORMAT  # every command but --version loads the stack anyway

    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    # a2a-sdk's optional OpenTelemetry hooks cost ~1 ms per request and log noise on errors.
    os.environ.setdefault("OTEL_INSTRUMENTATION_A2A_SDK_ENABLED", "false")


def version_text() -> str:
    """``molecule-codex X (codex Y at PATH)``; a broken codex is reported, not raised."""
    try:
        binary = resolve_codex_binary()
        codex = ".".join(map(str, binary.version())) + f" at {binary.path}"
    except CodexBinaryError as exc:
        codex = f"unavailable: {exc}"
    return f"molecule-codex {_our_version()} (codex {codex})"


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tokens(raw: str | None) -> tuple[str, ...]:
    """Comma-separated bearer tokens, one per caller."""
    return tuple(token.strip() for token in (raw or "").split(",") if token.strip())


def default_state_dir(env: dict[str, str] | os._Environ[str]) -> Path:
    """``$MOLECULE_CODEX_STATE_DIR``, else ``$XDG_STATE_HOME/molecule-codex`` (~/.local/state/…)."""
    explicit = env.get("MOLECULE_CODEX_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg).expanduser() / "molecule-codex"


def _add_host_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config.yaml (default: the repo's)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="conversation map, task database, CODEX_HOME (default $MOLECULE_CODEX_STATE_DIR "
                             "or ~/.local/state/molecule-codex)")
    parser.add_argument("--workdir", type=Path, default=None, help="the agent's working directory (default: cwd)")
    parser.add_argument("--base-url", default=None, help="any OpenAI-compatible Responses endpoint")
    parser.add_argument("--api-key-env", default=None, help="with --base-url: env var holding its API key")
    parser.add_argument("--model", default=None, help="model id (with --base-url any id the endpoint serves)")
    parser.add_argument("--log-level", default=os.environ.get("MOLECULE_CODEX_LOG_LEVEL", "INFO"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molecule-codex", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="store_true", help="print our version and the codex version")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="serve A2A (standalone)")
    _add_host_options(serve)
    serve.add_argument("--host", default=DEFAULT_HOST)
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--token", default=os.environ.get("MOLECULE_CODEX_TOKEN"),
                       help="bearer token(s), comma-separated, one per caller (env MOLECULE_CODEX_TOKEN)")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without a token")
    serve.add_argument("--task-store", default=os.environ.get("MOLECULE_CODEX_TASK_STORE"),
                       help="SQLAlchemy URL for tasks (default: SQLite in the state directory)")
    serve.add_argument("--max-body-bytes", type=int, default=None, help="request body cap (default 32 MiB)")
    doctor = commands.add_parser("doctor", help="print the preflight report")
    _add_host_options(doctor)
    demo = commands.add_parser("demo", help="offline demo: scripted model, real codex, real A2A client")
    demo.add_argument("--log-level", default=os.environ.get("MOLECULE_CODEX_LOG_LEVEL", "WARNING"))
    return parser


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
    from adapter import HostOptions

    return HostOptions(
        state_dir=(args.state_dir or default_state_dir(env)).expanduser().resolve(),
        workspace=(args.workdir or Path.cwd()).expanduser().resolve(),
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        model=args.model,
        env=env,
    )


@contextlib.asynccontextmanager
async def serving(args: argparse.Namespace, *, env: dict[str, str] | None = None) -> AsyncIterator[Running]:
    """Preflight, build and start the whole stack on ``args.host:args.port``; stop it on exit."""
    from adapter import CodexAdapter  # import late: --version must not need the stack
    from host import build_agent_card, build_app, create_task_store, running_server, task_store_url

    host_options = host_options_from(args, dict(os.environ if env is None else env))
    state_dir = host_options.state_dir
    adapter = CodexAdapter(host=host_options)
    config = adapter.standalone_config(args.config)
    await adapter.setup(config)
    executor = await adapter.create_executor(config)
    store = create_task_store(task_store_url(state_dir, args.task_store))
    await store.fail_unfinished()
    public_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    card = build_agent_card(
        f"http://{public_host}:{args.port}/",
        name=config.runtime_config.get("name") or "codex",
        description=adapter.description(),
        version=_our_version(),
    )
    tokens = _tokens(getattr(args, "token", None))
    body_cap = {"max_body_bytes": args.max_body_bytes} if getattr(args, "max_body_bytes", None) else {}
    app, handler = build_app(executor, card=card, task_store=store, tokens=tokens, **body_cap)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="off",
                               timeout_graceful_shutdown=GRACEFUL_HTTP_SHUTDOWN_S)
    server = _Server(uv_config, adapter)
    try:
        async with running_server(server, card, public_host) as (url, task):
            logger.info("serving A2A on %s (codex thread per conversation; state in %s)", url, state_dir)
            yield Running(url, adapter, server, task)
            if not task.done():
                await adapter.shutdown("the agent is shutting down")
    finally:
        await adapter.shutdown("the agent is shutting down")
        await handler.aclose()
        await store.engine.dispose()


async def _serve(args: argparse.Namespace) -> int:
    if not _is_loopback(args.host) and not _tokens(args.token) and not args.insecure:
        logger.error("refusing to bind %s without a token: set --token/MOLECULE_CODEX_TOKEN or pass --insecure",
                     args.host)
        return 2
    try:
        async with serving(args) as running:
            await running.wait()
    except RuntimeError as exc:  # preflight and setup say what is wrong and how to fix it
        logger.debug("serve stopped", exc_info=True)
        logger.error("%s", exc)
        return 1
    return 0


async def _doctor(args: argparse.Namespace) -> int:
    from adapter import CodexAdapter

    adapter = CodexAdapter(host=host_options_from(args, dict(os.environ)))
    report = await adapter.preflight(adapter.standalone_config(args.config))
    print(report.render())
    print("credentials: " + ", ".join(f"{name}={state}" for name, state in adapter.credential_report().items()))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging(args.log_level)
    if args.command == "serve":
        return asyncio.run(_serve(args))
    if args.command == "doctor":
        return asyncio.run(_doctor(args))
    from demo import run_demo

    return asyncio.run(run_demo())


if __name__ == "__main__":
    sys.exit(main())
