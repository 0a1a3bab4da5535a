"""The one place that imports ``molecule_runtime`` (the Molecule workspace runtime).

The runtime hosts the adapter in production, but its wheel is not installable from every package
index, and the codex client, the executor and the tests must run without it. So every other module
imports the runtime's names from here: when the runtime is installed they are the runtime's own
objects (the runtime's preflight checks ``issubclass(Adapter, BaseAdapter)`` against *its* class),
otherwise they are minimal local equivalents with the same names and signatures.

Import policy, decided here once:

* runtime not installed (``ModuleNotFoundError`` for ``molecule_runtime`` itself): standalone,
  silently; that is the normal case for ``molecule-codex serve`` and the tests.
* runtime present but broken (any other error while importing its core: a missing dependency, a
  renamed module): log a WARNING naming the error and run standalone. Raising would only trade one
  crash for another (the runtime's own ``main`` would fail the same way), and standalone keeps
  ``molecule-codex doctor`` able to report it. The error text stays in ``RUNTIME_IMPORT_ERROR``.
* runtime present, an optional piece missing (``runtime_wedge``, ``executor_helpers``,
  ``configs_dir`` appeared in later runtime versions): that piece alone falls back, with a
  WARNING when the fallback loses behaviour the platform would see.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from a2a.server.agent_execution import AgentExecutor

logger = logging.getLogger(__name__)

#: Distribution name on the package index (import name ``molecule_runtime``).
RUNTIME_DISTRIBUTION = "molecule-ai-workspace-runtime"

#: The in-container configs volume the runtime prefers when it is writable.
CONTAINER_CONFIGS_DIR = Path("/configs")

#: ``$HOME`` sub-directory the runtime falls back to outside a container.
HOME_CONFIGS_DIRNAME = ".molecule-workspace"

#: Bound on ``_common_setup()``: it calls the platform (peers, children). A hanging ``setup()``
#: means the runtime serves no agent card at all, so a slow platform must not block boot.
COMMON_SETUP_TIMEOUT_S = 60.0

__all__ = [
    "COMMON_SETUP_TIMEOUT_S",
    "RUNTIME_AVAILABLE",
    "RUNTIME_IMPORT_ERROR",
    "RUNTIME_VERSION",
    "AdapterConfig",
    "BaseAdapter",
    "RuntimeCapabilities",
    "SetupResult",
    "build_system_prompt",
    "clear_wedge",
    "is_wedged",
    "mark_wedged",
    "read_prompt_files",
    "resolve_configs_dir",
    "runtime_wedge",
    "set_current_task",
    "wedge_reason",
]


# ---------------------------------------------------------------------------
# Standalone equivalents. Names, fields, defaults and signatures follow the runtime's
# ``molecule_runtime.adapters.base`` (May 2026); behaviour is the minimum a standalone host needs.
# ---------------------------------------------------------------------------


@dataclass
class _LocalSetupResult:
    """What ``_common_setup()`` returns; CLI runtimes use only ``system_prompt``."""

    system_prompt: str
    loaded_skills: list
    langchain_tools: list
    is_coordinator: bool
    children: list


@dataclass
class _LocalAdapterConfig:
    """The config every adapter receives; ``system_prompt`` is None under the May runtime."""

    model: str
    system_prompt: str | None = None
    tools: list[str] = field(default_factory=list)
    runtime_config: dict[str, Any] = field(default_factory=dict)
    config_path: str = "/configs"
    workspace_id: str = ""
    prompt_files: list[str] = field(default_factory=list)
    a2a_port: int = 8000
    heartbeat: Any = None


@dataclass(frozen=True)
class _LocalRuntimeCapabilities:
    """Which platform fallbacks the adapter replaces natively; all off by default.

    Frozen like the runtime's: each heartbeat reads it from a fresh ``Adapter()``.
    """

    provides_native_heartbeat: bool = False
    provides_native_scheduler: bool = False
    provides_native_session: bool = False
    provides_native_status_mgmt: bool = False
    provides_native_retry: bool = False
    provides_activity_decoration: bool = False
    provides_channel_dispatch: bool = False

    def to_dict(self) -> dict[str, bool]:
        """The wire names the platform reads from ``runtime_metadata.capabilities``."""
        return {
            "heartbeat": self.provides_native_heartbeat,
            "scheduler": self.provides_native_scheduler,
            "session": self.provides_native_session,
            "status_mgmt": self.provides_native_status_mgmt,
            "retry": self.provides_native_retry,
            "activity_decoration": self.provides_activity_decoration,
            "channel_dispatch": self.provides_channel_dispatch,
        }


class _NullEventLog:
    """The runtime's default event log is a no-op; standalone has no backend at all."""

    def append(self, *, kind: str, payload: Any = None) -> None:
        """Drop the event."""
        del kind, payload


_NULL_EVENT_LOG = _NullEventLog()


def read_prompt_files(config_path: str | os.PathLike[str], prompt_files: list[str]) -> str:
    """Join the configured prompt files (relative to ``config_path``) with blank lines.

    Standalone stand-in for the prompt-file part of the runtime's prompt builder. A missing or
    unreadable file is logged and skipped: a workspace with one bad prompt file should still boot.
    """
    base = Path(config_path)
    sections: list[str] = []
    for name in prompt_files:
        path = base / name
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            logger.warning("prompt file %s not found; skipped", path)
            continue
        except OSError as exc:
            logger.warning("prompt file %s unreadable (%s); skipped", path, exc.strerror or exc)
            continue
        if text:
            sections.append(text)
    return "\n\n".join(sections)


class _LocalBaseAdapter(ABC):
    """Standalone ``BaseAdapter``: the abstract surface plus the defaults the runtime provides."""

    @staticmethod
    @abstractmethod
    def name() -> str:
        """Runtime identifier; should equal ``runtime:`` in config.yaml."""

    @staticmethod
    @abstractmethod
    def display_name() -> str:
        """Human-readable name for the canvas."""

    @staticmethod
    @abstractmethod
    def description() -> str:
        """One-line description for the canvas."""

    @staticmethod
    def get_config_schema() -> dict:
        """JSON schema of ``runtime_config`` fields for the Config tab; none by default."""
        return {}

    def capabilities(self) -> _LocalRuntimeCapabilities:
        """Native capabilities; the platform provides every fallback by default."""
        return _LocalRuntimeCapabilities()

    def idle_timeout_override(self) -> int | None:
        """Seconds of silence the platform tolerates per dispatch; None = platform default."""
        return None

    @property
    def event_log(self) -> Any:
        """Event-log backend; the runtime sets one at boot, standalone keeps the no-op."""
        return getattr(self, "_event_log", None) or _NULL_EVENT_LOG

    @event_log.setter
    def event_log(self, backend: Any) -> None:
        self._event_log = backend

    def memory_filename(self) -> str:
        """File under the configs dir that plugins append memory to."""
        return "CLAUDE.md"

    def register_tool_hook(self, name: str, fn: Any) -> None:
        """Plugin hook; no dynamic tool registry here."""
        del name, fn

    def register_subagent_hook(self, name: str, spec: dict) -> None:
        """Plugin hook; no sub-agents here."""
        del name, spec

    async def inject_plugins(self, config: _LocalAdapterConfig, plugins: Any) -> None:
        """Plugin hook; standalone loads no plugins."""
        del config, plugins

    async def transcript_lines(self, since: int = 0, limit: int = 100) -> dict:
        """Backs the runtime's ``/transcript`` route; unsupported by default."""
        del limit
        return {
            "runtime": self.name(),
            "supported": False,
            "lines": [],
            "cursor": since,
            "more": False,
            "source": None,
        }

    def pre_stop_state(self) -> dict:
        """Snapshot for pause/resume: the executor's session id when it has one."""
        state: dict = {}
        session_id = getattr(getattr(self, "_executor", None), "_session_id", None)
        if session_id:
            state["session_id"] = session_id
        return state

    def restore_state(self, snapshot: dict) -> None:
        """Keep a snapshot's session handle for the executor to pick up."""
        self._snapshot_session_id = snapshot.get("session_id")
        self._snapshot_transcript = snapshot.get("transcript_lines")

    async def _common_setup(self, config: _LocalAdapterConfig) -> _LocalSetupResult:
        """Standalone system prompt: the configured prompt files only (no platform, no peers)."""
        return _LocalSetupResult(
            system_prompt=read_prompt_files(config.config_path, list(config.prompt_files)),
            loaded_skills=[],
            langchain_tools=[],
            is_coordinator=False,
            children=[],
        )

    @abstractmethod
    async def setup(self, config: _LocalAdapterConfig) -> None:
        """Validate and prepare; raise ``RuntimeError`` with a short, secret-free message."""

    @abstractmethod
    async def create_executor(self, config: _LocalAdapterConfig) -> AgentExecutor:
        """Build the A2A executor (and keep it as ``self._executor``)."""


async def _local_set_current_task(heartbeat: Any, task: str) -> None:
    """Standalone hosts have no platform heartbeat to push; nothing to do."""
    del heartbeat, task


class _LocalWedge:
    """Process-wide wedge flag with the runtime's ``runtime_wedge`` API.

    One instance (module-global) holds the state: the wedge is a property of the process, not of
    an executor. The first reason wins so the banner the operator sees stays the original cause.
    """

    def __init__(self) -> None:
        self._reason: str | None = None

    def is_wedged(self) -> bool:
        """True until ``clear_wedge()`` after an observed success."""
        return self._reason is not None

    def wedge_reason(self) -> str:
        """The first recorded reason, or ``""`` when healthy (as the runtime returns)."""
        return self._reason or ""

    def mark_wedged(self, reason: str) -> None:
        """Record a failure that needs a restart; later reasons are ignored."""
        if self._reason is None:
            self._reason = reason
            logger.error("runtime wedged: %s (the workspace needs a restart)", reason)

    def clear_wedge(self) -> None:
        """Forget the wedge after a successful turn."""
        if self._reason is not None:
            logger.warning("runtime wedge cleared after a successful operation")
            self._reason = None

    def reset_for_test(self) -> None:
        """Silent reset between test cases."""
        self._reason = None


class _WedgeApi(Protocol):
    """What the seam needs from ``runtime_wedge`` (the runtime's module or ``_LocalWedge``)."""

    def is_wedged(self) -> bool: ...
    def wedge_reason(self) -> str: ...
    def mark_wedged(self, reason: str) -> None: ...
    def clear_wedge(self) -> None: ...


# ---------------------------------------------------------------------------
# Import of the runtime.
# ---------------------------------------------------------------------------


def _import_core() -> tuple[ModuleType | None, str | None]:
    """Import the runtime's adapter base; return (module, error text for a broken runtime)."""
    try:
        base = importlib.import_module("molecule_runtime.adapters.base")
    except ModuleNotFoundError as exc:
        if exc.name == "molecule_runtime":
            return None, None
        return None, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a broken runtime can fail in any way while importing
        return None, f"{type(exc).__name__}: {exc}"
    missing = [
        name
        for name in ("BaseAdapter", "AdapterConfig", "RuntimeCapabilities", "SetupResult")
        if not hasattr(base, name)
    ]
    if missing:
        return None, "molecule_runtime.adapters.base lacks " + ", ".join(missing)
    return base, None


def _import_optional(module: str) -> ModuleType | None:
    """Import an optional runtime module; None when this runtime version lacks it or it breaks."""
    try:
        return importlib.import_module(module)
    except Exception as exc:
        logger.debug("%s unavailable: %s", module, exc)
        return None


def _runtime_version() -> str | None:
    """The installed distribution's version, else the package's ``__version__``."""
    try:
        return metadata.version(RUNTIME_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        package = _import_optional("molecule_runtime")
        version = getattr(package, "__version__", None)
        return str(version) if version else None


_base, RUNTIME_IMPORT_ERROR = _import_core()
RUNTIME_AVAILABLE: bool = _base is not None
RUNTIME_VERSION: str | None = None

if RUNTIME_IMPORT_ERROR:
    logger.warning(
        "molecule_runtime is installed but failed to import (%s); running standalone",
        RUNTIME_IMPORT_ERROR,
    )

_configs_dir_module: ModuleType | None = None

#: Errors the runtime wants to abort boot loudly (a privileged plugin that failed to install);
#: ``build_system_prompt`` re-raises these instead of falling back.
_FATAL_SETUP_ERRORS: tuple[type[BaseException], ...] = ()

if _base is not None:
    BaseAdapter = _base.BaseAdapter
    AdapterConfig = _base.AdapterConfig
    RuntimeCapabilities = _base.RuntimeCapabilities
    SetupResult = _base.SetupResult
    RUNTIME_VERSION = _runtime_version()
    _privileged = getattr(_base, "PrivilegedPluginInstallError", None)
    if isinstance(_privileged, type) and issubclass(_privileged, BaseException):
        _FATAL_SETUP_ERRORS = (_privileged,)

    _helpers = _import_optional("molecule_runtime.executor_helpers")
    if _helpers is not None and hasattr(_helpers, "set_current_task"):
        set_current_task = _helpers.set_current_task
    else:
        logger.warning("molecule_runtime.executor_helpers.set_current_task missing; busy state not pushed")
        set_current_task = _local_set_current_task

    _wedge_module = _import_optional("molecule_runtime.runtime_wedge")
    if _wedge_module is not None and all(
        hasattr(_wedge_module, name) for name in ("mark_wedged", "clear_wedge", "is_wedged", "wedge_reason")
    ):
        runtime_wedge: _WedgeApi = _wedge_module
    else:
        logger.warning("molecule_runtime.runtime_wedge missing; a wedge will not reach the heartbeat")
        runtime_wedge = _LocalWedge()

    _configs_dir_module = _import_optional("molecule_runtime.configs_dir")
    if _configs_dir_module is not None and not callable(getattr(_configs_dir_module, "resolve", None)):
        _configs_dir_module = None
else:
    BaseAdapter = _LocalBaseAdapter
    AdapterConfig = _LocalAdapterConfig
    RuntimeCapabilities = _LocalRuntimeCapabilities
    SetupResult = _LocalSetupResult
    set_current_task = _local_set_current_task
    runtime_wedge = _LocalWedge()


# ---------------------------------------------------------------------------
# Helpers built on whichever implementation was chosen.
# ---------------------------------------------------------------------------


def mark_wedged(reason: str) -> None:
    """Flag a failure that needs a restart (first reason wins); heartbeats report it."""
    runtime_wedge.mark_wedged(reason)


def clear_wedge() -> None:
    """Clear the wedge; call after every successful turn."""
    runtime_wedge.clear_wedge()


def is_wedged() -> bool:
    """Whether the process is currently marked wedged."""
    return runtime_wedge.is_wedged()


def wedge_reason() -> str:
    """The wedge reason, ``""`` when healthy."""
    return runtime_wedge.wedge_reason()


async def build_system_prompt(adapter: Any, config: Any) -> str | None:
    """The system prompt to send codex as ``developerInstructions``; None when there is none.

    Under the runtime this is ``(await adapter._common_setup(config)).system_prompt``: platform
    instructions, prompt files, memory, skills, A2A docs and peers. Standalone it is the prompt files
    read relative to ``config.config_path``. A prompt the runtime already filled into
    ``config.system_prompt`` (newer runtimes do) is used as is, so the plugin pipeline inside
    ``_common_setup`` never runs twice. If ``_common_setup`` fails or exceeds
    ``COMMON_SETUP_TIMEOUT_S``, a WARNING is logged and the prompt files are used: a prompt without
    peers beats a workspace that never serves its card.
    """
    ready = getattr(config, "system_prompt", None)
    if isinstance(ready, str) and ready.strip():
        return ready
    common_setup = getattr(adapter, "_common_setup", None)
    prompt: str | None = None
    if common_setup is not None:
        try:
            async with asyncio.timeout(COMMON_SETUP_TIMEOUT_S):
                result = await common_setup(config)
            prompt = getattr(result, "system_prompt", None)
        except TimeoutError:
            logger.warning("_common_setup took longer than %.0fs; using the prompt files only", COMMON_SETUP_TIMEOUT_S)
            prompt = _prompt_files_of(config)
        except Exception as exc:
            if _FATAL_SETUP_ERRORS and isinstance(exc, _FATAL_SETUP_ERRORS):
                raise
            # Type only: exception texts can carry URLs or tokens (invariant: no secrets in logs).
            logger.warning("_common_setup failed (%s); using the prompt files only", type(exc).__name__)
            logger.debug("_common_setup failure detail", exc_info=True)
            prompt = _prompt_files_of(config)
    else:
        prompt = _prompt_files_of(config)
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    return prompt


def _prompt_files_of(config: Any) -> str:
    """The standalone prompt for any config-shaped object."""
    return read_prompt_files(
        getattr(config, "config_path", "/configs"), list(getattr(config, "prompt_files", None) or [])
    )


def resolve_configs_dir(env: Mapping[str, str] | None = None) -> Path:
    """The runtime's state directory (``.auth_token``, inbound secret, snapshot), created if needed.

    Order, as the runtime resolves it: explicit ``CONFIGS_DIR`` > ``/configs`` when it exists and is
    writable > ``$HOME/.molecule-workspace`` (mode 0700). Children that call the platform (the
    molecule MCP server) must use the same directory as the runtime, so when the runtime ships its
    own resolver and ``env`` agrees with this process on ``CONFIGS_DIR`` and ``HOME``, the runtime's
    resolver decides. ``env`` defaults to ``os.environ``.
    """
    current = os.environ
    source = current if env is None else env
    if _configs_dir_module is not None and all(source.get(key) == current.get(key) for key in ("CONFIGS_DIR", "HOME")):
        return Path(_configs_dir_module.resolve())
    explicit = (source.get("CONFIGS_DIR") or "").strip()
    if explicit:
        path = Path(explicit)
        path.mkdir(parents=True, exist_ok=True)
        return path
    if CONTAINER_CONFIGS_DIR.is_dir() and os.access(CONTAINER_CONFIGS_DIR, os.W_OK):
        return CONTAINER_CONFIGS_DIR
    home = source.get("HOME") or str(Path.home())
    path = Path(home) / HOME_CONFIGS_DIRNAME
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
