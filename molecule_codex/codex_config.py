"""Render ``$CODEX_HOME/config.toml``: one owner, one pass, operator settings preserved.

Our settings live in marked blocks (``# >>> molecule-codex managed`` … ``# <<< molecule-codex
managed``); rendering removes every marked block and writes fresh ones, so rendering twice
changes nothing and whatever the operator wrote outside the blocks survives byte for byte.

Placement keeps the file valid TOML in every case:

* the main block goes at the very top of the file, written with dotted keys
  (``features.plugins = false``), so our top-level keys precede every table and no table header
  of ours can collide with the operator's;
* where the operator opened a table with a ``[header]`` that our dotted keys would redefine
  (TOML forbids that), our keys go in a small marked block right under that header instead.

The operator wins: a key the operator sets is left out of our blocks, and so is our whole MCP
server or provider entry when the operator defines anything under its name. The result is
checked with ``tomllib``; keys that still cannot be placed are dropped with a warning.

Built-in providers (``openai``, ``chatgpt``) never get a ``model_provider`` key.

Sandboxed modes run under our permission profile (``default_permissions = "molecule"``): it extends
codex's ``:workspace`` (or ``:read-only``) profile, sets network access, and denies reads of the
paths in :class:`read_deny.ReadDeny`. Codex ignores a profile when a thread is started with a
``sandbox`` mode or when any config sets ``sandbox_mode``, so threads are started without one and
:func:`profile_overridden` tells doctor when the operator's config takes the profile out of force.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
import signal
import subprocess
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from molecule_codex.providers import API_KEY_ENV, AUTH_JSON_ENV, ResolvedProvider, atomic_write_text, ensure_codex_home
from molecule_codex.read_deny import PROFILE_NAME, ReadDeny

if TYPE_CHECKING:
    from molecule_codex.codex_binary import CodexBinary
    from molecule_codex.settings import Settings

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.toml"
BLOCK_BEGIN = "# >>> molecule-codex managed: rewritten at every start, put your own settings outside this block"
BLOCK_END = "# <<< molecule-codex managed"
_BEGIN_PREFIX = "# >>> molecule-codex managed"
_END_PREFIX = "# <<< molecule-codex managed"

MCP_SERVER_NAME = "molecule"
MCP_MODULE = "molecule_runtime.a2a_mcp_server"
#: The MCP server reached ``ready`` in ~150 ms; 30 s covers a cold Python import on a busy host.
MCP_STARTUP_TIMEOUT_S = 30
#: A synchronous ``delegate_task`` waits for the peer's whole answer; a hung server must still not
#: hold a turn for ever (capped again by the turn timeout).
MCP_TOOL_TIMEOUT_S = 600
#: Env the platform MCP server needs; codex gives MCP children only a minimal env plus this table.
MCP_ENV_REQUIRED = ("WORKSPACE_ID", "PLATFORM_URL")
MCP_ENV_OPTIONAL = ("CONFIGS_DIR", "MOLECULE_ORG_ID")

#: ``codex app-server --strict-config`` reads config and exits at stdin EOF in ~0.1 s.
VALIDATE_TIMEOUT_S = 15.0
_MAX_ERROR_CHARS = 2000

#: Env names hidden from the agent's shell commands on top of ``inherit = "core"``; codex matches
#: these globs case-insensitively.
SHELL_ENV_EXCLUDES = (
    API_KEY_ENV,
    AUTH_JSON_ENV,
    "OPENAI_*",
    "CODEX_AUTH*",
    "MOLECULE_*",
    "*TOKEN*",
    "*SECRET*",
    "*KEY*",
    "*PASSWORD*",
    "*PASSWD*",
    "*CREDENTIAL*",
    "*AUTH*",
)
FEATURES_OFF = (
    "plugins",  # startup plugin sync reaches github.com / chatgpt.com
    "shell_snapshot",  # snapshots a login shell per new thread: 32 threads took ~22 s instead of ~4 s
    "unbounded_connection_retries",  # else "connection refused" is retried for ever
)

#: The built-in profile ours extends, per sandbox mode; ``danger-full-access`` gets no profile.
PROFILE_BASE = {"auto": ":workspace", "workspace-write": ":workspace", "read-only": ":read-only"}

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_HEADER = re.compile(r"^\s*\[(?!\[)[^\]]*\]\s*(#.*)?$")

KeyPath = tuple[str, ...]


class CodexConfigError(RuntimeError):
    """config.toml cannot be rendered or is rejected by codex; the message says why."""


@dataclass(frozen=True)
class McpServer:
    """A stdio MCP server for codex's ``[mcp_servers.<name>]`` table."""

    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


def _runtime_importable() -> bool:
    """Whether ``molecule_runtime`` can be imported here (a stub in ``sys.modules`` counts)."""
    try:
        return importlib.util.find_spec("molecule_runtime") is not None
    except (ImportError, ValueError):  # ValueError: a stub module without __spec__ is loaded
        return True


def platform_mcp_server(python_executable: str, env: Mapping[str, str]) -> McpServer | None:
    """The platform's A2A MCP server, or None when the runtime isn't installed or not on the platform.

    ``env`` must already carry ``CONFIGS_DIR`` as the runtime resolved it: the child must read the
    same ``.auth_token`` as the runtime or every platform call fails with 401.
    """
    if not _runtime_importable():
        logger.info("molecule_runtime is not installed: no platform MCP server for codex")
        return None
    missing = [name for name in MCP_ENV_REQUIRED if not env.get(name)]
    if missing:
        logger.warning("platform MCP server not configured: %s unset", ", ".join(missing))
        return None
    child_env = {name: env[name] for name in (*MCP_ENV_REQUIRED, *MCP_ENV_OPTIONAL) if env.get(name)}
    return McpServer(command=python_executable, args=("-m", MCP_MODULE), env=child_env)


# ----------------------------------------------------------------------------- TOML writing


def _toml_key(key: str) -> str:
    """A bare key when possible, else a quoted one."""
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    """A TOML basic string; control characters (DEL included) are escaped."""
    out = ['"']
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    """A TOML value: strings, booleans, numbers, lists and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CodexConfigError(f"cannot write non-finite number {value!r} to config.toml")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise CodexConfigError(f"cannot write {type(value).__name__} to config.toml")


def _dotted(path: KeyPath) -> str:
    """A dotted TOML key."""
    return ".".join(_toml_key(part) for part in path)


# ----------------------------------------------------------------------------- what we want


@dataclass(frozen=True)
class _Unit:
    """Keys that stand or fall together: if the operator defines anything at ``root``, all are dropped."""

    root: KeyPath
    leaves: tuple[tuple[KeyPath, Any], ...]


def _flatten(prefix: KeyPath, table: Mapping[str, Any], inline: Iterable[str] = ()) -> list[tuple[KeyPath, Any]]:
    """Leaves of a nested mapping; keys in ``inline`` stay whole (written as inline tables)."""
    inline = frozenset(inline)
    leaves: list[tuple[KeyPath, Any]] = []
    for key, value in table.items():
        if isinstance(value, Mapping) and key not in inline:
            leaves.extend(_flatten((*prefix, key), value, inline))
        else:
            leaves.append(((*prefix, key), value))
    return leaves


def uses_profile(sandbox: str) -> bool:
    """Whether threads in this sandbox mode run under our permission profile."""
    return sandbox in PROFILE_BASE


def agent_profile(sandbox: str, network_access: bool, read_deny: ReadDeny | None) -> dict[str, Any]:
    """Our ``[permissions.molecule]`` table for a sandboxed mode."""
    profile: dict[str, Any] = {"extends": PROFILE_BASE[sandbox], "network": {"enabled": network_access}}
    if read_deny is not None and read_deny.entries:
        profile["filesystem"] = read_deny.filesystem
    return profile


def profile_config_text(sandbox: str, network_access: bool, read_deny: ReadDeny | None) -> str:
    """A config.toml holding only our profile, selected: what the sandbox probe runs under."""
    profile = agent_profile(sandbox, network_access, read_deny)
    lines = [f"default_permissions = {_toml_string(PROFILE_NAME)}\n"]
    lines.extend(
        f"{_dotted(path)} = {_toml_value(value)}\n" for path, value in _flatten(("permissions", PROFILE_NAME), profile)
    )
    return "".join(lines)


def profile_overridden(existing: str | None) -> str | None:
    """Why the operator's config.toml keeps our profile out of force, or None when it is in force."""
    try:
        operator = tomllib.loads(strip_managed_blocks(existing or ""))
    except (tomllib.TOMLDecodeError, CodexConfigError):
        return None  # rendering reports a broken file
    if "sandbox_mode" in operator:
        return "config.toml sets sandbox_mode, which makes codex ignore permission profiles"
    chosen = operator.get("default_permissions")
    if chosen is not None and chosen != PROFILE_NAME:
        return f"config.toml selects default_permissions = {chosen!r} instead of {PROFILE_NAME!r}"
    if _lookup(operator, ("permissions", PROFILE_NAME))[0]:
        return f"config.toml defines its own [permissions.{PROFILE_NAME}], which replaces ours"
    return None


def _desired_units(
    settings: Settings, provider: ResolvedProvider, mcp: McpServer | None, read_deny: ReadDeny | None
) -> list[_Unit]:
    """Everything we want in config.toml, in output order."""
    units: list[_Unit] = [_Unit(("model",), ((("model",), settings.model),))]
    if provider.writes_model_provider and provider.entry is not None:
        units.append(_Unit(("model_provider",), ((("model_provider",), provider.entry.name),)))
    if settings.reasoning_effort:
        units.append(_Unit(("model_reasoning_effort",), ((("model_reasoning_effort",), settings.reasoning_effort),)))
    # auth.json is the credential contract: never the OS keyring, which a container lacks.
    units.append(_Unit(("cli_auth_credentials_store",), ((("cli_auth_credentials_store",), "file"),)))

    excludes = list(SHELL_ENV_EXCLUDES)
    if provider.entry is not None:
        excludes.extend(name for name in provider.credential_env_names if name not in excludes)
    shell_policy = {"inherit": "core", "ignore_default_excludes": False, "exclude": excludes}
    for key, value in shell_policy.items():
        path = ("shell_environment_policy", key)
        units.append(_Unit(path, ((path, value),)))
    if uses_profile(settings.sandbox):
        units.append(_Unit(("default_permissions",), ((("default_permissions",), PROFILE_NAME),)))
        root = ("permissions", PROFILE_NAME)
        profile = agent_profile(settings.sandbox, settings.network_access, read_deny)
        units.append(_Unit(root, tuple(_flatten(root, profile))))
    for feature in FEATURES_OFF:
        path = ("features", feature)
        units.append(_Unit(path, ((path, False),)))

    if provider.writes_model_provider and provider.entry is not None:
        entry = provider.entry
        table: dict[str, Any] = {"name": entry.name, "base_url": entry.base_url, "wire_api": entry.wire_api}
        if entry.env_key:
            table["env_key"] = entry.env_key
        for key in ("query_params", "http_headers", "env_http_headers"):
            if getattr(entry, key):
                table[key] = dict(getattr(entry, key))
        table["request_max_retries"] = entry.request_max_retries
        table["stream_max_retries"] = entry.stream_max_retries
        if entry.stream_idle_timeout_ms is not None:
            table["stream_idle_timeout_ms"] = entry.stream_idle_timeout_ms
        root = ("model_providers", entry.name)
        inline = ("query_params", "http_headers", "env_http_headers")
        units.append(_Unit(root, tuple(_flatten(root, table, inline))))

    if mcp is not None:
        root = ("mcp_servers", MCP_SERVER_NAME)
        server = {
            "command": mcp.command,
            "args": list(mcp.args),
            "env": dict(mcp.env),
            "startup_timeout_sec": MCP_STARTUP_TIMEOUT_S,
            "tool_timeout_sec": min(MCP_TOOL_TIMEOUT_S, math.ceil(settings.turn_timeout)),
            # Without it every tool call needs an approval, which fails under approval_policy=never.
            "default_tools_approval_mode": "approve",
        }
        units.append(_Unit(root, tuple(_flatten(root, server, ("env",)))))
    return units


# ----------------------------------------------------------------------------- operator text


def strip_managed_blocks(text: str) -> str:
    """The operator's part of a config.toml: every managed block removed, nothing else touched."""
    kept: list[str] = []
    inside_since: int | None = None
    separator_pending = False  # the blank line we put after a block at the top of the file
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        stripped = line.strip()
        if separator_pending:
            separator_pending = False
            if not stripped:
                continue
        if inside_since is None:
            if stripped.startswith(_BEGIN_PREFIX):
                inside_since = number
            elif stripped.startswith(_END_PREFIX):
                raise CodexConfigError(
                    f"config.toml line {number}: a molecule-codex end marker without its begin marker; "
                    "delete the stray marker line"
                )
            else:
                kept.append(line)
        elif stripped.startswith(_END_PREFIX):
            separator_pending = not kept
            inside_since = None
        elif stripped.startswith(_BEGIN_PREFIX):
            raise CodexConfigError(f"config.toml line {number}: nested molecule-codex begin marker; delete it")
    if inside_since is not None:
        raise CodexConfigError(
            f"config.toml line {inside_since}: molecule-codex block is never closed; delete the marker "
            "line (the block is rewritten at every start)"
        )
    return "".join(kept)


def _lookup(tree: Mapping[str, Any], path: KeyPath) -> tuple[bool, Any]:
    """(found, value) of a dotted path in parsed TOML."""
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _operator_defines(tree: Mapping[str, Any], path: KeyPath) -> bool:
    """Whether the operator set ``path`` or a non-table on the way to it."""
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping):
            return True  # a scalar sits where our table would go: theirs wins
        if part not in node:
            return False
        node = node[part]
    return True


def _header_lines(lines: Sequence[str]) -> dict[KeyPath, int]:
    """Line index of every ``[table]`` header (array tables excluded), keyed by its parsed path."""
    headers: dict[KeyPath, int] = {}
    for index, line in enumerate(lines):
        if not _HEADER.match(line):
            continue
        try:
            node: Any = tomllib.loads(line)
        except tomllib.TOMLDecodeError:
            continue  # e.g. a header-looking line inside a multi-line string
        path: list[str] = []
        while isinstance(node, dict) and len(node) == 1:
            key = next(iter(node))
            path.append(key)
            node = node[key]
        if path:
            headers.setdefault(tuple(path), index)
    return headers


def _anchor_length(path: KeyPath, headers: Mapping[KeyPath, int]) -> int:
    """Length of the longest table prefix of ``path`` the operator opened with a header (0: none)."""
    for length in range(len(path) - 1, 0, -1):
        if path[:length] in headers:
            return length
    return 0


def _render_block(entries: Sequence[tuple[KeyPath, Any]]) -> list[str]:
    """A managed block for ``entries`` (paths relative to where the block sits)."""
    body = [f"{_dotted(path)} = {_toml_value(value)}\n" for path, value in entries]
    return [BLOCK_BEGIN + "\n", *body, BLOCK_END + "\n"]


def _place(operator_text: str, operator: Mapping[str, Any], leaves: Sequence[tuple[KeyPath, Any]]) -> str:
    """Operator text plus our leaves: top block for most, blocks under the operator's headers otherwise."""
    lines = operator_text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    # A header-looking line inside a multi-line string names no table the operator has.
    headers = {path: index for path, index in _header_lines(lines).items() if _lookup(operator, path)[0]}
    top: list[tuple[KeyPath, Any]] = []
    under: dict[int, list[tuple[KeyPath, Any]]] = {}
    for path, value in leaves:
        anchor = _anchor_length(path, headers)
        if anchor:
            under.setdefault(headers[path[:anchor]], []).append((path[anchor:], value))
        else:
            top.append((path, value))
    out: list[str] = []
    if top:
        out.extend(_render_block(top))
        if lines:
            out.append("\n")
    for index, line in enumerate(lines):
        out.append(line)
        if index in under:
            out.extend(_render_block(under[index]))
    return "".join(out)


def _misplaced(text: str, leaves: Sequence[tuple[KeyPath, Any]]) -> list[KeyPath] | None:
    """None when ``text`` parses and holds every leaf with our value; else the leaves that don't."""
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return [path for path, _ in leaves]
    wrong = [path for path, value in leaves if _lookup(parsed, path) != (True, _normalized(value))]
    return wrong or None


def _normalized(value: Any) -> Any:
    """A value as tomllib returns it after our writer (tuples become lists, whole floats ints)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {k: _normalized(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalized(v) for v in value]
    return value


def render_config_toml(
    existing: str | None,
    settings: Settings,
    provider: ResolvedProvider,
    mcp: McpServer | None,
    read_deny: ReadDeny | None = None,
) -> str:
    """The new config.toml text: ``existing`` minus old managed blocks, plus fresh ones."""
    operator_text = strip_managed_blocks(existing or "")
    try:
        operator = tomllib.loads(operator_text)
    except tomllib.TOMLDecodeError as exc:
        raise CodexConfigError(
            f"the existing config.toml (outside the molecule-codex block) is not valid TOML: {exc}"
        ) from None

    leaves: list[tuple[KeyPath, Any]] = []
    for unit in _desired_units(settings, provider, mcp, read_deny):
        if _operator_defines(operator, unit.root):
            logger.info("config.toml: keeping the operator's %s", _dotted(unit.root))
            continue
        leaves.extend((path, value) for path, value in unit.leaves if not _operator_defines(operator, path))

    text = _place(operator_text, operator, leaves)
    wrong = _misplaced(text, leaves)
    if wrong:
        # The operator defined one of our tables in a form we can't extend (e.g. an inline table):
        # their table wins whole.
        owned = {path[0] for path in wrong}
        dropped = [path for path, _ in leaves if path[0] in owned]
        logger.warning(
            "config.toml: the operator's %s cannot be extended; leaving out our %s",
            ", ".join(sorted(owned)),
            ", ".join(_dotted(path) for path in dropped),
        )
        leaves = [(path, value) for path, value in leaves if path[0] not in owned]
        text = _place(operator_text, operator, leaves)
        if _misplaced(text, leaves):
            raise CodexConfigError("cannot merge molecule-codex settings into the existing config.toml")
    return text


def write_config_toml(codex_home: Path, text: str) -> bool:
    """Write ``config.toml`` atomically (0600) if it differs; True when it changed."""
    home = ensure_codex_home(codex_home)
    path = home / CONFIG_NAME
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    atomic_write_text(path, text)
    logger.info("wrote %s", path)
    return True


def read_config_toml(codex_home: Path) -> str | None:
    """The current config.toml text, or None when there is none."""
    try:
        return (Path(codex_home) / CONFIG_NAME).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- validation


#: codex's own tracing log lines (``2026-11-21T19:27:14.929022Z ERROR …``): noise, not the config error.
_TRACING_LINE = re.compile(r"^\s*\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")


def config_error_text(stderr: str) -> str:
    """Codex's own error message without log noise or a backtrace."""
    lines = []
    for line in stderr.splitlines():
        if line.startswith("Stack backtrace:"):
            break
        if "could not create PATH aliases" in line or "\x1b[" in line or _TRACING_LINE.match(line):
            continue
        lines.append(line.rstrip())
    text = "\n".join(lines).strip()
    return text[:_MAX_ERROR_CHARS] or "codex rejected config.toml without a message"


def validate_config(binary: CodexBinary, codex_home: Path, env: Mapping[str, str]) -> str | None:
    """Let codex itself check config.toml; None when accepted, else codex's error text.

    ``codex app-server --strict-config`` loads the config, errors with ``unknown configuration
    field`` (or a parse error) and exit 1 before ``initialize``, and exits 0 at stdin EOF when the
    config is fine. It opens its state databases in ``codex_home`` as the real server would.
    """
    child_env = binary.child_env(dict(env))
    child_env.update({"CODEX_HOME": str(codex_home), "RUST_LOG": "off", "RUST_BACKTRACE": "0"})
    command = [str(binary.path), "app-server", "--strict-config", "--listen", "stdio://"]
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env,
            start_new_session=True,
            text=True,
        )
    except OSError as exc:
        return f"cannot run {binary.path}: {exc.strerror}"
    try:
        _, stderr = process.communicate(timeout=VALIDATE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return f"codex app-server --strict-config did not exit within {VALIDATE_TIMEOUT_S:g} s"
    if process.returncode == 0:
        return None
    return config_error_text(stderr)
