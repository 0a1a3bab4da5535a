"""Find the native codex binary, check its version, and build the environment its children get.

Resolution order (first hit wins): the ``CODEX_BIN`` environment variable, the binary inside the
``codex_cli_bin`` package (the pinned ``openai-codex-cli-bin`` wheel), then ``codex`` on PATH.
The native binary is always spawned directly: the npm Node wrapper adds start-up cost and, when
killed, orphans the real binary.

The supported version range is declared here and nowhere else.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Versions of codex we have contract tests for: ``MIN <= version < BELOW``.
#: Bump together with the ``openai-codex-cli-bin`` pin in pyproject.toml.
PINNED_CODEX_VERSION = "0.163.0"
SUPPORTED_MIN = (0, 163, 0)
SUPPORTED_BELOW = (0, 164, 0)

#: ``codex --version`` is a local call; anything slower means a broken install.
VERSION_PROBE_TIMEOUT_S = 15.0

_VERSION_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)")


class CodexBinaryError(RuntimeError):
    """The codex binary is missing, does not run, or has an unsupported version."""


def supported_range_text() -> str:
    """Human-readable supported range, for error messages and docs."""
    low = ".".join(map(str, SUPPORTED_MIN))
    high = ".".join(map(str, SUPPORTED_BELOW))
    return f">={low},<{high}"


def parse_version(text: str) -> tuple[int, int, int]:
    """Parse ``codex-cli 0.163.0`` (or a bare ``0.163.0``) into a tuple."""
    match = _VERSION_RE.search(text)
    if not match:
        raise CodexBinaryError(f"cannot read a codex version from {text.strip()!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return (major, minor, patch)


def is_supported(version: tuple[int, int, int]) -> bool:
    """Whether ``version`` lies inside the declared range."""
    return SUPPORTED_MIN <= version < SUPPORTED_BELOW


def require_supported(version: tuple[int, int, int], where: object) -> tuple[int, int, int]:
    """Return ``version``, or raise naming both the found and the supported versions."""
    if not is_supported(version):
        raise CodexBinaryError(
            f"codex at {where} is version {'.'.join(map(str, version))}, but molecule-codex "
            f"supports {supported_range_text()} (pinned {PINNED_CODEX_VERSION}). Install "
            f"openai-codex-cli-bin=={PINNED_CODEX_VERSION} or point CODEX_BIN at a supported binary."
        )
    return version


@dataclass(frozen=True, slots=True)
class CodexBinary:
    """A resolved codex executable plus the helper folders its children need on PATH."""

    path: Path
    source: str  # "CODEX_BIN", "codex_cli_bin" or "PATH": says how it was found, for doctor output
    extra_path_dirs: tuple[Path, ...] = ()

    def child_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a codex child: ``base`` (default: ours) with the bundled tools on PATH.

        The wheel ships ``rg`` in ``codex-path`` and ``bwrap`` in ``codex-resources``; codex finds
        them through PATH, so both go first.
        """
        env = dict(os.environ if base is None else base)
        prefix = [str(directory) for directory in self.extra_path_dirs]
        current = env.get("PATH", os.defpath)
        env["PATH"] = os.pathsep.join([*prefix, current]) if prefix else current
        return env

    def version(self) -> tuple[int, int, int]:
        """Run ``codex --version`` and parse it."""
        try:
            completed = subprocess.run(
                [str(self.path), "--version"],
                capture_output=True,
                text=True,
                timeout=VERSION_PROBE_TIMEOUT_S,
                env=self.child_env(),
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CodexBinaryError(f"cannot run {self.path} --version: {exc}") from exc
        if completed.returncode != 0:
            raise CodexBinaryError(
                f"{self.path} --version exited {completed.returncode}: {completed.stderr.strip()[:300]}"
            )
        return parse_version(completed.stdout)

    def check_version(self) -> tuple[int, int, int]:
        """Return the version, or raise naming both the found and the supported versions."""
        return require_supported(self.version(), self.path)


def _bundled() -> CodexBinary | None:
    """The binary from the ``openai-codex-cli-bin`` wheel, if installed."""
    try:
        import codex_cli_bin
    except ImportError:
        return None
    try:
        path = codex_cli_bin.bundled_codex_path()
        package_dir = codex_cli_bin.bundled_package_dir()
    except FileNotFoundError as exc:
        logger.warning("codex_cli_bin is installed but broken: %s", exc)
        return None
    extra = tuple(d for d in (package_dir / "codex-path", package_dir / "codex-resources") if d.is_dir())
    return CodexBinary(path=path, source="codex_cli_bin", extra_path_dirs=extra)


def resolve_codex_binary(env: dict[str, str] | None = None) -> CodexBinary:
    """Find codex: ``CODEX_BIN``, then the pinned wheel, then PATH. Raises CodexBinaryError."""
    env = dict(os.environ if env is None else env)
    override = env.get("CODEX_BIN", "").strip()
    bundled = _bundled()
    # The wheel's helper folders are useful whichever binary runs.
    helpers = bundled.extra_path_dirs if bundled else ()
    if override:
        path = Path(override).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise CodexBinaryError(f"CODEX_BIN={override} is not an executable file")
        return CodexBinary(path=path.resolve(), source="CODEX_BIN", extra_path_dirs=helpers)
    if bundled:
        return bundled
    found = shutil.which("codex", path=env.get("PATH"))
    if found:
        return CodexBinary(path=Path(found).resolve(), source="PATH")
    raise CodexBinaryError(
        "codex binary not found: install the pinned wheel "
        f"(pip install openai-codex-cli-bin=={PINNED_CODEX_VERSION}), or set CODEX_BIN to the native binary"
    )
