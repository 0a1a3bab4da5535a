"""Boot-time checks: each failure says what is wrong and how to fix it, with no secret in it.

The runtime serves a "not configured" card when ``setup()`` raises, and never retries, so a
wrong configuration must fail here with a message an operator can act on, not later as a turn
that hangs. Every probe is bounded in time (a hanging ``setup()`` means no agent card at all).

The sandbox probe runs ``codex sandbox -P molecule`` (our permission profile) with a command that
writes inside the working directory (must succeed), writes into the state directory (must fail)
and reads a canary file there (must be denied): the state directory is denied by the profile on
every host, so the probe does not depend on HOME. Unprivileged containers often lack
what bubblewrap needs; then ``sandbox: auto`` fails preflight and names the explicit opt-in
``danger-full-access`` for hosts where the container itself is the boundary.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from molecule_codex.codex_binary import CodexBinary
from molecule_codex.read_deny import PROFILE_NAME

logger = logging.getLogger(__name__)

#: Sandbox start-up is ~50 ms; 20 s means bubblewrap is stuck.
SANDBOX_PROBE_TIMEOUT_S = 20.0


class PreflightError(RuntimeError):
    """A boot check failed; the message is safe to show and says how to fix it."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of the preflight report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass(slots=True)
class PreflightReport:
    """Every check that ran, in order; ``failures`` are what stops the boot."""

    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [result for result in self.results if not result.ok]

    def run(self, name: str, check: Callable[[], str], fix: str = "") -> bool:
        """Run one check; its return value is the detail, an exception its failure."""
        try:
            detail = check()
        except (PreflightError, RuntimeError, OSError, ValueError) as exc:
            self.results.append(CheckResult(name, False, str(exc), fix))
            return False
        self.results.append(CheckResult(name, True, detail))
        return True

    def note(self, name: str, ok: bool, detail: str, fix: str = "") -> None:
        self.results.append(CheckResult(name, ok, detail, fix))

    def raise_for_failures(self) -> None:
        """One RuntimeError naming every failed check and its fix."""
        if self.ok:
            return
        lines = [f"{f.name}: {f.detail}" + (f" Fix: {f.fix}" if f.fix else "") for f in self.failures]
        raise PreflightError("molecule-codex preflight failed: " + " | ".join(lines))

    def render(self) -> str:
        """The doctor report: one line per check."""
        lines = []
        for result in self.results:
            mark = "PASS" if result.ok else "FAIL"
            lines.append(f"[{mark}] {result.name}: {result.detail}")
            if not result.ok and result.fix:
                lines.append(f"       fix: {result.fix}")
        return "\n".join(lines)


def check_writable_dir(path: Path, what: str, mode: int | None = None) -> str:
    """Create ``path`` if needed (with ``mode``, whatever the umask) and prove we can write a file in it.

    An existing directory keeps its mode.
    """
    try:
        if mode is not None and not path.is_dir():
            path.mkdir(parents=True, exist_ok=True, mode=mode)  # never wider than ``mode``
            os.chmod(path, mode)
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".molecule-codex-write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise PreflightError(f"{what} {path} is not writable ({exc.strerror or exc})") from exc
    return f"{path} is writable"


@dataclass(frozen=True, slots=True)
class SandboxProbe:
    """What ``codex sandbox`` did on this host under our permission profile."""

    inside_ok: bool
    outside_blocked: bool
    read_blocked: bool
    output: str

    @property
    def works(self) -> bool:
        return self.inside_ok and self.outside_blocked and self.read_blocked


def probe_sandbox(
    binary: CodexBinary,
    workspace: Path,
    state_dir: Path,
    profile_toml: str,
    env: dict[str, str],
    *,
    canary_dirs: tuple[Path, ...] = (),
) -> SandboxProbe:
    """Run our profile's sandbox: write inside the workspace, write and read inside the state directory.

    The state directory (and every directory in ``canary_dirs``) is denied by the profile, so the
    outside write and the canary reads must fail on any host, whatever HOME is: codex's
    ``:workspace`` profile lets ``/tmp`` through, so a HOME under ``/tmp`` proves nothing. The probe
    runs with a scratch CODEX_HOME holding only ``profile_toml`` (the operator's config plays no part).
    """
    tag = uuid.uuid4().hex[:8]
    scratch = state_dir / f"sandbox-check-{tag}"
    inside = workspace / f".molecule-sandbox-probe-{tag}"
    outside = state_dir / f"sandbox-probe-{tag}"
    canaries = {directory / f".molecule-read-probe-{tag}": f"read-probe-{uuid.uuid4().hex}"
                for directory in dict.fromkeys((state_dir, *canary_dirs))}
    reads = "; ".join(f"cat '{path}'" for path in canaries)
    script = f"echo ok > '{inside}' && echo INSIDE-OK; echo bad > '{outside}' && echo OUTSIDE-WRITTEN; {reads}; true"
    try:
        scratch.mkdir(mode=0o700)
        (scratch / "config.toml").write_text(profile_toml, encoding="utf-8")
        for path, content in canaries.items():
            path.write_text(content, encoding="utf-8")
        child_env = binary.child_env(env)
        child_env["CODEX_HOME"] = str(scratch)
        argv = [str(binary.path), "sandbox", "-P", PROFILE_NAME, "-C", str(workspace), "--", "sh", "-c", script]
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=SANDBOX_PROBE_TIMEOUT_S,
                                   env=child_env, cwd=workspace, check=False)
        output = (completed.stdout + completed.stderr).strip()
    except subprocess.TimeoutExpired:
        output = f"codex sandbox did not finish within {SANDBOX_PROBE_TIMEOUT_S:g}s"
    finally:
        inside_written = inside.exists()
        outside_written = outside.exists()
        for leftover in (inside, outside, *canaries):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    leaked = any(content in output for content in canaries.values())
    for content in canaries.values():
        output = output.replace(content, "<canary>")
    return SandboxProbe(
        inside_ok=inside_written and "INSIDE-OK" in output,
        outside_blocked=not outside_written,
        read_blocked=not leaked,
        output=output[-500:],
    )


def resolve_sandbox(requested: str, probe: Callable[[], SandboxProbe]) -> tuple[str, str]:
    """Turn ``sandbox: auto|…`` into the mode threads run with, probing when it matters.

    Returns (mode, detail). ``auto`` and ``workspace-write`` need a working sandbox; ``read-only``
    and ``danger-full-access`` are taken as the operator's explicit choice.
    """
    if requested in ("read-only", "danger-full-access"):
        return requested, f"{requested} (explicit)"
    result = probe()
    if result.works:
        return "workspace-write", (
            "workspace-write: writes inside the workspace work; writes and reads of the state directory are blocked"
        )
    if not result.inside_ok:
        cause = "the sandbox could not run a write inside the workspace"
    elif not result.outside_blocked:
        cause = "a write outside the workspace was NOT blocked"
    else:
        cause = "a read of a denied file was NOT blocked"
    raise PreflightError(
        f"codex's workspace-write sandbox does not work on this host ({cause}; codex said: "
        f"{result.output or 'nothing'}). Give the container what bubblewrap needs (user namespaces, "
        "e.g. --security-opt seccomp=unconfined or a runtime that allows unprivileged namespaces), or set "
        "sandbox: danger-full-access where the container itself is the security boundary."
    )
