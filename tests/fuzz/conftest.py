"""Print the fuzzing figures (inputs tried and rejected per target) after the run."""

from __future__ import annotations

import pytest

from tests.fuzz._harness import FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fuzzing figures")
    for key in sorted(FIGURES):
        terminalreporter.write_line(f"{key}: {FIGURES[key]}")
