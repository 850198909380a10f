"""Kernel write-tracking modes for the machine tests: a ``kernel_mode`` fixture that skips a
mode the running kernel lacks (with the reason), and a summary line saying which ran."""

from __future__ import annotations

from typing import Any

import pytest

from multifd.machine.tracking import available_modes

KERNEL_MODES = ("uffd-wp", "soft-dirty")
_used: dict[str, int] = {}  # mode -> tests that ran with it (0: requested, skipped)


@pytest.fixture(params=KERNEL_MODES)
def kernel_mode(request: pytest.FixtureRequest) -> str:
    """A kernel tracking mode that works here (the test is skipped for the others)."""
    mode: str = request.param
    why = available_modes()[mode]
    _used.setdefault(mode, 0)
    if why is not None:
        pytest.skip(f"environment: tracking={mode!r} unavailable on this kernel: {why}")
    _used[mode] += 1
    return mode


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _used:
        return
    modes = available_modes()
    parts = [f"{m}: ran {_used[m]} test(s)" if _used.get(m) else f"{m}: skipped ({modes[m]})"
             for m in KERNEL_MODES if m in _used]
    terminalreporter.write_line("kernel write tracking modes: " + "; ".join(parts))
