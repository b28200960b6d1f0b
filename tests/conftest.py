"""Markers of the test suite."""
from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "launcher: starts mpiexec / torchrun jobs (seconds to minutes)")
    config.addinivalue_line("markers", "slow: compiles with torch.compile (tens of seconds each)")
