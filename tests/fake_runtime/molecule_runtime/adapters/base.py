"""Stand-in for ``molecule_runtime.adapters.base``: same names, fields, defaults and signatures.

``_common_setup`` builds a recognisable prompt (``FAKE_PLATFORM_PROMPT`` then the prompt files)
and records each call in ``COMMON_SETUP_CALLS``, so adapter tests can prove the platform prompt
path ran without a platform.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAKE_RUNTIME = True

#: First section of every prompt the stand-in ``_common_setup`` builds.
FAKE_PLATFORM_PROMPT = "[fake-runtime platform instructions]"

#: The config object of each ``_common_setup`` call, in order.
COMMON_SETUP_CALLS: list[Any] = []


class PrivilegedPluginInstallError(RuntimeError):
    """A privileged plugin failed to install; the runtime aborts boot on it."""


@dataclass
class SetupResult:
    """Result of ``_common_setup``."""

    system_prompt: str
    loaded_skills: list
    langchain_tools: list
    is_coordinator: bool
    children: list


@dataclass
class AdapterConfig:
    """Config passed to every adapter."""

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
class RuntimeCapabilities:
    """Native-capability flags, all off by default."""

    provides_native_heartbeat: bool = False
    provides_native_scheduler: bool = False
    provides_native_session: bool = False
    provides_native_status_mgmt: bool = False
    provides_native_retry: bool = False
    provides_activity_decoration: bool = False
    provides_channel_dispatch: bool = False

    def to_dict(self) -> dict[str, bool]:
        """Heartbeat wire names."""
        return {
            "heartbeat": self.provides_native_heartbeat,
            "scheduler": self.provides_native_scheduler,
            "session": self.provides_native_session,
            "status_mgmt": self.provides_native_status_mgmt,
            "retry": self.provides_native_retry,
            "activity_decoration": self.provides_activity_decoration,
            "channel_dispatch": self.provides_channel_dispatch,
        }


class _DisabledEventLog:
    def append(self, *, kind: str, payload: Any = None) -> None:
        del kind, payload


class BaseAdapter(ABC):
    """Stand-in adapter base."""

    @staticmethod
    @abstractmethod
    def name() -> str: ...

    @staticmethod
    @abstractmethod
    def display_name() -> str: ...

    @staticmethod
    @abstractmethod
    def description() -> str: ...

    @staticmethod
    def get_config_schema() -> dict:
        return {}

    def capabilities(self) -> RuntimeCapabilities:
        return RuntimeCapabilities()

    def idle_timeout_override(self) -> int | None:
        return None

    @property
    def event_log(self) -> Any:
        return getattr(self, "_event_log", None) or _DisabledEventLog()

    @event_log.setter
    def event_log(self, backend: Any) -> None:
        self._event_log = backend

    def memory_filename(self) -> str:
        return "CLAUDE.md"

    def register_tool_hook(self, name: str, fn) -> None:
        return None

    def register_subagent_hook(self, name: str, spec: dict) -> None:
        return None

    async def inject_plugins(self, config: AdapterConfig, plugins) -> None:
        return None

    async def transcript_lines(self, since: int = 0, limit: int = 100) -> dict:
        return {"runtime": self.name(), "supported": False, "lines": [], "cursor": since, "more": False, "source": None}

    def pre_stop_state(self) -> dict:
        session_id = getattr(getattr(self, "_executor", None), "_session_id", None)
        return {"session_id": session_id} if session_id else {}

    def restore_state(self, snapshot: dict) -> None:
        self._snapshot_session_id = snapshot.get("session_id")
        self._snapshot_transcript = snapshot.get("transcript_lines")

    async def _common_setup(self, config: AdapterConfig) -> SetupResult:
        COMMON_SETUP_CALLS.append(config)
        sections = [FAKE_PLATFORM_PROMPT]
        for name in config.prompt_files:
            path = Path(config.config_path) / name
            if path.is_file():
                sections.append(path.read_text(encoding="utf-8").strip())
        return SetupResult(
            system_prompt="\n\n".join(sections),
            loaded_skills=[],
            langchain_tools=[],
            is_coordinator=False,
            children=[],
        )

    @abstractmethod
    async def setup(self, config: AdapterConfig) -> None: ...

    @abstractmethod
    async def create_executor(self, config: AdapterConfig) -> Any: ...
