"""Which launcher started this process, read from the environment it set.

The one place that knows the launchers' variables: the communicator
factory, the scripts and the tests all ask :func:`detect_launcher`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Launcher", "detect_launcher"]

# torchrun (torch.distributed.elastic) sets these for every worker.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Open MPI's mpirun, then PMIx-based (srun, Open MPI 5) and PMI-based
# (MPICH's Hydra, Intel MPI) launchers: (size variable, rank variable).
_MPI_VARS = (
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("PMIX_SIZE", "PMIX_RANK"),
    ("PMI_SIZE", "PMI_RANK"),
)


@dataclass(frozen=True)
class Launcher:
    """What the environment says about how this process was started.

    Attributes:
        name: ``"torchrun"``, ``"mpirun"`` (any MPI launcher) or ``"none"``.
        size: the number of processes the launcher started (1 for ``"none"``).
        rank: this process's rank among them (0 for ``"none"``).
    """

    name: str
    size: int
    rank: int


def detect_launcher(environ: Mapping[str, str] | None = None) -> Launcher:
    """The launcher of this process, from ``environ`` (default: ``os.environ``).

    torchrun is recognised by ``TORCHELASTIC_RUN_ID`` or by ``RANK``,
    ``WORLD_SIZE`` and ``LOCAL_RANK`` together; an MPI launcher by Open MPI's
    ``OMPI_COMM_WORLD_*``, ``PMIX_*`` or ``PMI_*`` variables. torchrun wins
    when both are present (torchrun started inside an MPI allocation).
    Nothing is imported and nothing is initialized.
    """
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env or all(k in env for k in _TORCHRUN_VARS):
        return Launcher("torchrun", _int(env.get("WORLD_SIZE"), 1), _int(env.get("RANK"), 0))
    for size_var, rank_var in _MPI_VARS:
        if size_var in env or rank_var in env:
            return Launcher("mpirun", _int(env.get(size_var), 1), _int(env.get(rank_var), 0))
    return Launcher("none", 1, 0)


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default
