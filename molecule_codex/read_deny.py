"""Which paths the agent's shell commands must not read, as codex 0.163 permission-profile entries.

Codex's workspace-write sandbox lets commands read the whole filesystem. A permission profile
(``[permissions.<name>.filesystem]``, ``"<path>" = "none"``) denies reads *and* writes of a path;
codex enforces it with bubblewrap for every command. What we deny: CODEX_HOME (auth.json, every
conversation's rollout, codex's SQLite state and logs), our state directory (conversation map,
task database, External Connect secret and cursor), the platform's token, inbound secret and
snapshot, ``secrets.d``, another codex home under ``$HOME/.codex``, and any file an env var with a
credential-like name points at.

How an entry is written matters (all measured on the pinned binary):

* an existing directory is denied by its exact path (listing included);
* a file is written as a one-match glob (``.auth_tok[e]n``). Globs are expanded again for every
  command, so a file created after start (the platform writes ``.auth_token`` after ``setup()``)
  is denied too, and a missing file leaves nothing behind. An exact path that does not exist makes
  bubblewrap create an empty mount-point file in the real directory (a 0-byte ``.auth_token``
  the runtime would then read as its token);
* a path whose parent directory does not exist cannot be denied at all: bubblewrap fails and
  codex refuses to start *any* thread. Such paths are reported instead;
* a glob only works in the last path component, so a path whose directories contain glob
  characters is reported instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The permission profile we render into config.toml and select with ``default_permissions``.
PROFILE_NAME = "molecule"
DENY = "none"
#: Files the platform runtime keeps in its configs directory (token, inbound secret, snapshot).
PLATFORM_SECRET_FILES = (".auth_token", ".platform_inbound_secret", ".agent_snapshot.json")
#: Multi-line secrets arrive through this directory's load.sh.
PLATFORM_SECRETS_DIR = "secrets.d"
#: Env vars naming files that hold platform or runtime state.
PATH_ENV_VARS = ("AGENT_SNAPSHOT_PATH", "MOLECULE_WORKSPACE_TOKEN_FILE", "AUDIT_LOG_PATH")
DEFAULT_AUDIT_LOG = Path("/var/log/molecule/audit.jsonl")
#: An env var with such a name that points at an existing file names a credential file.
_CREDENTIAL_NAME = re.compile(r"(TOKEN|SECRET|KEY|CREDENTIAL|PASSWORD|PASSWD|AUTH)", re.IGNORECASE)
_GLOB_CHARS = re.compile(r"[*?\[\]{}]")


@dataclass(frozen=True, slots=True)
class ReadDeny:
    """The profile's deny entries plus what could not be denied (and why), for doctor and logs."""

    #: ``[permissions.molecule.filesystem]`` keys, each mapped to ``"none"``.
    entries: tuple[str, ...]
    #: The paths those entries protect (for the report).
    protected: tuple[Path, ...]
    #: (path, reason) for locations codex cannot deny on this host.
    unprotected: tuple[tuple[Path, str], ...] = ()

    @property
    def filesystem(self) -> dict[str, str]:
        """The profile's filesystem table."""
        return {entry: DENY for entry in self.entries}

    def describe(self) -> str:
        """One line for doctor: what is denied, and what is not."""
        text = "denied to shell commands: " + (", ".join(str(path) for path in self.protected) or "nothing")
        if self.unprotected:
            text += "; NOT denied: " + ", ".join(f"{path} ({why})" for path, why in self.unprotected)
        return text


def _one_match_glob(path: Path) -> str:
    """``/a/b/name`` as a glob that matches exactly that file (its last character bracketed)."""
    name = path.name
    last = name[-1]
    return str(path.parent / f"{name[:-1]}[{last}]")


def _under(path: Path, directory: Path) -> bool:
    return path == directory or path.is_relative_to(directory)


@dataclass(frozen=True, slots=True)
class Location:
    """A place holding a secret or another conversation's text; ``directory`` when it is (or will be) one."""

    path: Path
    directory: bool = False


def secret_locations(
    *,
    state_dir: Path,
    codex_home: Path,
    env: Mapping[str, str],
    configs_dir: Path | None,
) -> list[Location]:
    """Every location holding a secret or another conversation's text, existing or not.

    ``configs_dir`` is the platform runtime's directory (None outside the platform).
    """
    found = [Location(codex_home, True), Location(state_dir, True)]
    home = env.get("HOME")
    if home:
        found.append(Location(Path(home) / ".codex", True))
    if configs_dir is not None:
        found.extend(Location(configs_dir / name) for name in PLATFORM_SECRET_FILES)
        found.append(Location(configs_dir / PLATFORM_SECRETS_DIR, True))
        found.append(Location(DEFAULT_AUDIT_LOG))
    found.extend(Location(Path(env[name])) for name in PATH_ENV_VARS if env.get(name))
    for name, value in env.items():
        if _CREDENTIAL_NAME.search(name) and value.startswith("/") and "\n" not in value and len(value) < 4096:
            try:
                if Path(value).is_file():
                    found.append(Location(Path(value)))
            except OSError:
                continue
    return [Location(Path(os.path.abspath(item.path)), item.directory) for item in found]


def build_read_deny(locations: Iterable[Location], workspace: Path) -> ReadDeny:
    """Profile entries for ``locations`` (see the module docstring for how each kind is written).

    A location that contains the workspace is left out: :func:`workspace_conflict` reports it.
    """
    resolved: dict[Path, bool] = {}
    for item in locations:
        real = Path(os.path.realpath(item.path))
        resolved[real] = resolved.get(real, False) or item.directory or real.is_dir()
    denied_dirs = [path for path, directory in resolved.items() if directory and path.is_dir()]
    workspace = Path(os.path.realpath(workspace))
    entries: list[str] = []
    protected: list[Path] = []
    unprotected: list[tuple[Path, str]] = []
    for path, directory in resolved.items():
        if any(other != path and _under(path, other) for other in denied_dirs):
            continue  # inside a denied directory already; a nested entry can break bubblewrap
        if _under(workspace, path):
            continue
        if directory:
            if not path.is_dir():
                continue  # absent: nothing to read (a glob cannot deny a directory created later)
            entry = str(path)
        elif not path.parent.is_dir():
            unprotected.append((path, "its directory does not exist at start"))
            continue
        else:
            entry = _one_match_glob(path)
        if _GLOB_CHARS.search(str(path)):
            unprotected.append((path, "its path contains glob characters"))
            continue
        entries.append(entry)
        protected.append(path)
    return ReadDeny(tuple(entries), tuple(protected), tuple(unprotected))


def workspace_conflict(locations: Sequence[Location], workspace: Path) -> Path | None:
    """A secret location that contains the workspace (the agent would need to read it), if any."""
    workspace = Path(os.path.realpath(workspace))
    for item in locations:
        if _under(workspace, Path(os.path.realpath(item.path))):
            return item.path
    return None
