"""Suite-wide hooks: count what ran against the real codex binary, and say so at the end."""

from __future__ import annotations

import pytest

_real_codex: dict[str, int] = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Tally outcomes of tests marked ``real_codex`` (each test counted once, at its call phase)."""
    if "real_codex" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _real_codex[report.outcome] = _real_codex.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line an operator can grep: how many tests drove the real pinned codex binary."""
    total = sum(_real_codex.values())
    terminalreporter.write_line(
        f"real codex binary: {total} tests ran against it "
        f"({_real_codex['passed']} passed, {_real_codex['failed']} failed, {_real_codex['skipped']} skipped)"
    )
