"""Preflight pieces: the sandbox decision (fake probes for hosts we are not on) and a real probe."""

from __future__ import annotations

import os

import pytest

from molecule_codex.codex_binary import resolve_codex_binary
from molecule_codex.preflight import PreflightError, PreflightReport, SandboxProbe, probe_sandbox, resolve_sandbox


def _never_called() -> SandboxProbe:
    raise AssertionError("an explicit sandbox choice must not probe")


@pytest.mark.parametrize("mode", ["read-only", "danger-full-access"])
def test_explicit_modes_are_taken_without_probing(mode):
    assert resolve_sandbox(mode, _never_called)[0] == mode


@pytest.mark.parametrize("requested", ["auto", "workspace-write"])
def test_working_probe_gives_workspace_write(requested):
    mode, detail = resolve_sandbox(requested, lambda: SandboxProbe(True, True, "INSIDE-OK"))
    assert mode == "workspace-write" and "blocked" in detail


def test_unconfined_host_fails_and_names_the_opt_in():
    with pytest.raises(PreflightError) as caught:
        resolve_sandbox("auto", lambda: SandboxProbe(True, False, "OUTSIDE-WRITTEN"))
    assert "NOT blocked" in str(caught.value) and "danger-full-access" in str(caught.value)


def test_broken_sandbox_fails_with_codex_output():
    with pytest.raises(PreflightError) as caught:
        resolve_sandbox("auto", lambda: SandboxProbe(False, True, "bwrap: No permissions to create new namespace"))
    message = str(caught.value)
    assert "could not run a write inside" in message and "No permissions" in message


def test_report_lists_every_failure_with_its_fix():
    report = PreflightReport()
    report.note("model", False, "bad model", "set runtime_config.model")
    report.note("workspace", True, "ok")
    assert not report.ok and [f.name for f in report.failures] == ["model"]
    assert "[FAIL] model: bad model" in report.render() and "fix: set runtime_config.model" in report.render()
    with pytest.raises(PreflightError, match=r"model: bad model Fix: set runtime_config\.model"):
        report.raise_for_failures()


@pytest.mark.real_codex
def test_real_probe_on_this_host_writes_inside_and_is_blocked_outside(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    result = probe_sandbox(resolve_codex_binary(), workspace, home, dict(os.environ))
    assert result.inside_ok, result.output
    assert result.outside_blocked, result.output
    assert not list(workspace.iterdir()), "the probe must clean up after itself"
