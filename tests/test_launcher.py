"""Launcher detection: which launcher started the process, from its environment."""
from __future__ import annotations

import pytest

from syncbn.comm import Launcher, detect_launcher


@pytest.mark.parametrize("env, expected", [
    ({}, Launcher("none", 1, 0)),
    ({"PATH": "/usr/bin", "MASTER_ADDR": "127.0.0.1"}, Launcher("none", 1, 0)),
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"},
     Launcher("torchrun", 4, 3)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, Launcher("torchrun", 2, 1)),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5"}, Launcher("mpirun", 8, 5)),
    ({"PMIX_SIZE": "2", "PMIX_RANK": "1"}, Launcher("mpirun", 2, 1)),
    ({"PMIX_RANK": "0"}, Launcher("mpirun", 1, 0)),  # PMIx without a size variable
    ({"PMI_SIZE": "6", "PMI_RANK": "2"}, Launcher("mpirun", 6, 2)),
    # torchrun started inside an MPI allocation: the workers are torchrun's
    ({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0", "TORCHELASTIC_RUN_ID": "x",
      "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, Launcher("torchrun", 2, 1)),
    # a malformed value is taken as absent, not as an error
    ({"OMPI_COMM_WORLD_SIZE": "many"}, Launcher("mpirun", 1, 0)),
], ids=["nothing", "unrelated", "torchrun", "torchrun-no-run-id", "openmpi", "pmix",
        "pmix-rank-only", "pmi", "torchrun-in-mpi", "malformed"])
def test_detect_launcher(env: dict[str, str], expected: Launcher) -> None:
    assert detect_launcher(env) == expected


def test_detect_launcher_reads_the_process_environment(no_launcher: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert detect_launcher() == Launcher("none", 1, 0)
    monkeypatch.setenv("PMI_SIZE", "3")
    monkeypatch.setenv("PMI_RANK", "2")
    assert detect_launcher() == Launcher("mpirun", 3, 2)
