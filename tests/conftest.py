"""What every test file shares: the ``launcher`` marker's rule and the environment fixtures.

(The markers ``launcher`` and ``slow`` are registered in pyproject.toml.)

* ``@pytest.mark.launcher``: the test starts processes through ``mpiexec`` or
  ``torchrun`` (seconds each, and it needs them installed). ``pytest -m "not
  launcher"`` runs everything else, in one process; tests/launch.py refuses
  to start a job from a test without the marker, so the selection holds.
* ``no_launcher``: the test runs as a process started without a launcher,
  even when pytest itself runs inside an mpiexec or torchrun job.
* Every test starts in the normal mode: ``SYNCBN_DEBUG`` is cleared, as
  the collective counts asserted throughout are those of the normal mode
  (a test of debug mode turns it on itself).
"""
from __future__ import annotations

import os

import pytest
import torch.distributed as dist

import launch
from syncbn.comm import detect_launcher


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # before the test's fixtures, which may start the job (a module-scoped launch)
    launch.allow_jobs(item.get_closest_marker("launcher") is not None)


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear every variable a launcher sets (torchrun's RANK, WORLD_SIZE,
    LOCAL_RANK, TORCHELASTIC_*; MPI's OMPI_COMM_WORLD_*, PMIX_*, PMI_*), so
    ``process_group=None`` sees a process started alone."""
    for name in [n for n in os.environ if launch.is_launcher_variable(n)]:
        monkeypatch.delenv(name)
    assert detect_launcher().name == "none", f"still inside a launcher: {detect_launcher()}"
    assert not dist.is_initialized(), "torch.distributed is initialized in the test process"


@pytest.fixture(autouse=True)
def normal_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``SYNCBN_DEBUG`` from the caller's environment: layers built without
    ``debug=`` are in the normal mode, one collective per pass."""
    monkeypatch.delenv("SYNCBN_DEBUG", raising=False)


@pytest.fixture
def python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training calls through the Python function, not the
    C++ node (syncbn/_cpp_node.cpp): for tests of the Python path's own
    steps (its views, its saved state, its autograd node)."""
    from syncbn import function

    monkeypatch.setattr(function, "NODE", None)
