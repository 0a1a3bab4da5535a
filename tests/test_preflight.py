"""Preflight pieces: the sandbox decision (fake probes for hosts we are not on) and real probes of our profile.

The real probe must not depend on HOME: codex's ``:workspace`` profile lets ``/tmp`` through, so
HOME under ``/tmp``, HOME=``/`` and an unwritable HOME all have to pass (they failed before the probe
targeted the state directory, which our profile denies).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from molecule_codex.codex_binary import resolve_codex_binary
from molecule_codex.codex_config import profile_config_text
from molecule_codex.preflight import PreflightError, PreflightReport, SandboxProbe, probe_sandbox, resolve_sandbox
from molecule_codex.read_deny import Location, build_read_deny


def _never_called() -> SandboxProbe:
    raise AssertionError("an explicit sandbox choice must not probe")


@pytest.mark.parametrize("mode", ["read-only", "danger-full-access"])
def test_explicit_modes_are_taken_without_probing(mode):
    assert resolve_sandbox(mode, _never_called)[0] == mode


@pytest.mark.parametrize("requested", ["auto", "workspace-write"])
def test_working_probe_gives_workspace_write(requested):
    mode, detail = resolve_sandbox(requested, lambda: SandboxProbe(True, True, True, "INSIDE-OK"))
    assert mode == "workspace-write" and "blocked" in detail


def test_unconfined_host_fails_and_names_the_opt_in():
    with pytest.raises(PreflightError) as caught:
        resolve_sandbox("auto", lambda: SandboxProbe(True, False, True, "OUTSIDE-WRITTEN"))
    assert "NOT blocked" in str(caught.value) and "danger-full-access" in str(caught.value)


def test_broken_sandbox_fails_with_codex_output():
    with pytest.raises(PreflightError) as caught:
        resolve_sandbox("auto",
                        lambda: SandboxProbe(False, True, True, "bwrap: No permissions to create new namespace"))
    message = str(caught.value)
    assert "could not run a write inside" in message and "No permissions" in message


def test_readable_denied_file_fails_the_probe():
    with pytest.raises(PreflightError, match="read of a denied file was NOT blocked"):
        resolve_sandbox("auto", lambda: SandboxProbe(True, True, False, "<canary>"))


def test_report_lists_every_failure_with_its_fix():
    report = PreflightReport()
    report.note("model", False, "bad model", "set runtime_config.model")
    report.note("workspace", True, "ok")
    assert not report.ok and [f.name for f in report.failures] == ["model"]
    assert "[FAIL] model: bad model" in report.render() and "fix: set runtime_config.model" in report.render()
    with pytest.raises(PreflightError, match=r"model: bad model Fix: set runtime_config\.model"):
        report.raise_for_failures()


def unwritable_home(tmp_path: Path) -> Path:
    """A HOME nobody can write: a 0500 directory, or sysfs when we are root (root ignores file modes)."""
    home = tmp_path / "ro-home"
    home.mkdir()
    home.chmod(0o500)
    if os.geteuid() == 0:
        home = Path("/sys/kernel")
    with pytest.raises(OSError):
        (home / "probe").write_text("x")
    return home


def _probe(tmp_path, env):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir(mode=0o700)
    deny = build_read_deny([Location(state, True), Location(codex_home, True)], workspace)
    profile = profile_config_text("workspace-write", False, deny)
    result = probe_sandbox(resolve_codex_binary(), workspace, state, profile, env, canary_dirs=(codex_home,))
    return result, workspace, state, codex_home


@pytest.mark.real_codex
def test_real_probe_writes_inside_and_is_blocked_outside_and_from_reading(tmp_path):
    result, workspace, state, codex_home = _probe(tmp_path, dict(os.environ))
    assert result.inside_ok, result.output
    assert result.outside_blocked, result.output
    assert result.read_blocked, result.output
    assert "Permission denied" in result.output, result.output  # the canary reads really ran and failed
    assert not list(workspace.iterdir()), "the probe must clean up after itself"
    assert not list(state.iterdir()) and not list(codex_home.iterdir()), "canaries and scratch home must be gone"


@pytest.mark.real_codex
@pytest.mark.parametrize("home", ["tmp", "root", "read-only"])
def test_real_probe_does_not_depend_on_home(tmp_path, home):
    if home == "tmp":
        value = tmp_path / "home-under-tmp"  # /tmp is writable under codex's :workspace profile
        value.mkdir()
    elif home == "root":
        value = "/"
    else:
        value = unwritable_home(tmp_path)
    env = {**os.environ, "HOME": str(value)}
    result, *_ = _probe(tmp_path, env)
    assert result.works, result.output
