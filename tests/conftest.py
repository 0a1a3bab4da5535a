"""Suite-wide hooks: the long soak profile, and how many tests ran against the real codex binary."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from molecule_codex.demo.scripted_model import ScriptedModel

_real_codex: dict[str, int] = {"passed": 0, "failed": 0, "skipped": 0}
_deselected_soak: list[str] = []


@pytest.fixture
def model() -> Iterator[ScriptedModel]:
    """A scripted Responses-API model on loopback (its default responder), stopped after the test."""
    with ScriptedModel() as running:
        yield running


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak profile (make soak)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: long profile, selected only with --soak (make soak)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --soak, soak tests are deselected (not skipped) and the summary says so."""
    if config.getoption("--soak"):
        return
    keep = []
    for item in items:
        (_deselected_soak.append(item.nodeid) if "soak" in item.keywords else keep.append(item))
    if _deselected_soak:
        config.hook.pytest_deselected(items=[i for i in items if "soak" in i.keywords])
        items[:] = keep


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Tally outcomes of tests marked ``real_codex`` (each test counted once, at its call phase)."""
    if "real_codex" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _real_codex[report.outcome] = _real_codex.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Lines an operator can grep: real-binary test count, and what the long profile left out."""
    total = sum(_real_codex.values())
    terminalreporter.write_line(
        f"real codex binary: {total} tests ran against it "
        f"({_real_codex['passed']} passed, {_real_codex['failed']} failed, {_real_codex['skipped']} skipped)"
    )
    if _deselected_soak:
        terminalreporter.write_line(
            f"soak profile: {len(_deselected_soak)} long test(s) not selected; run them with `make soak`"
        )
