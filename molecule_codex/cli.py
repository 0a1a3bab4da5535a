"""``molecule-codex``: run the codex adapter without the Molecule platform.

* ``serve``: preflight (the adapter's ``setup()``), then A2A on 127.0.0.1:8000 with uvicorn.
* ``connect``: External Connect: register with the platform, heartbeat, answer the workspace's
  messages (poll the activity feed, or push with ``--public-url``); see ``molecule_codex.connect``.
* ``doctor``: the preflight report, one line per check (and the platform when ``PLATFORM_URL`` is
  set); exit 1 on any failure.
* ``demo``: the offline demo (scripted model on loopback, real codex, real A2A client).
* ``--version``: our version and the codex binary's.

Shutdown (SIGTERM/SIGINT): stop accepting, interrupt running turns (their tasks end FAILED with
the reason), close codex, exit; the conversation map is already on disk after every change.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from molecule_codex.app_server import _our_version
from molecule_codex.codex_binary import CodexBinaryError, resolve_codex_binary
from molecule_codex.standalone import (
    DEFAULT_CONFIG,
    DEFAULT_HOST,
    DEFAULT_PORT,
    host_options_from,
    is_loopback,
    parse_tokens,
    serving,
)

logger = logging.getLogger("molecule_codex")



def configure_logging(level: str) -> None:
    """One handler on the root logger; the runtime never configures logging, so we do."""
    from molecule_codex.adapter import LOG_FORMAT  # every command but --version loads the stack anyway

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
    connect = commands.add_parser("connect", help="External Connect: answer a platform workspace from this machine")
    _add_host_options(connect)
    connect.add_argument("--platform-url", default=os.environ.get("PLATFORM_URL"),
                         help="the platform URL from the External Connect modal (env PLATFORM_URL)")
    connect.add_argument("--workspace-id", default=os.environ.get("WORKSPACE_ID"),
                         help="the workspace id from the modal (env WORKSPACE_ID); the token is read from "
                              "MOLECULE_WORKSPACE_TOKEN, MOLECULE_WORKSPACE_TOKEN_FILE or $CONFIGS_DIR/.auth_token")
    connect.add_argument("--public-url", default=os.environ.get("MOLECULE_CODEX_PUBLIC_URL"),
                         help="push mode: the https:// URL the platform calls (default: poll mode, no URL needed)")
    connect.add_argument("--host", default=DEFAULT_HOST, help="push mode: local listen address")
    connect.add_argument("--port", type=int, default=DEFAULT_PORT, help="push mode: local listen port")
    connect.add_argument("--poll-interval", type=float, default=5.0, help=argparse.SUPPRESS)
    connect.add_argument("--heartbeat-interval", type=float, default=20.0, help=argparse.SUPPRESS)
    doctor = commands.add_parser("doctor", help="print the preflight report")
    _add_host_options(doctor)
    demo = commands.add_parser("demo", help="offline demo: scripted model, real codex, real A2A client")
    demo.add_argument("--log-level", default=os.environ.get("MOLECULE_CODEX_LOG_LEVEL", "WARNING"))
    return parser


async def _serve(args: argparse.Namespace) -> int:
    if not is_loopback(args.host) and not parse_tokens(args.token) and not args.insecure:
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
    from molecule_codex.adapter import CodexAdapter

    adapter = CodexAdapter(host=host_options_from(args, dict(os.environ)))
    report = await adapter.preflight(adapter.standalone_config(args.config))
    print(report.render())
    print("credentials: " + ", ".join(f"{name}={state}" for name, state in adapter.credential_report().items()))
    platform_ok = True
    if os.environ.get("PLATFORM_URL"):
        from molecule_codex.connect.doctor import platform_report

        lines, platform_ok = await platform_report(adapter, dict(os.environ))
        print("\n".join(lines))
    return 0 if report.ok and platform_ok else 1


def run_on_fast_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run a command on uvloop when it is installed (a dependency on Linux and macOS), else asyncio's loop.

    uvloop's loop and pipes shave a millisecond or more off every A2A turn (HTTP, the codex stdio
    channel and the SDK's queues all run on it); the fallback keeps other platforms working.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


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
        return run_on_fast_loop(_serve(args))
    if args.command == "doctor":
        return run_on_fast_loop(_doctor(args))
    if args.command == "connect":
        from molecule_codex.connect.runner import run_connect

        return run_on_fast_loop(run_connect(args, dict(os.environ)))
    from molecule_codex.demo.run import run_demo

    return run_on_fast_loop(run_demo())


if __name__ == "__main__":
    sys.exit(main())
