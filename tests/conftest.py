"""Markers of the test suite."""
import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "launcher: starts a job under mpiexec or torchrun")
