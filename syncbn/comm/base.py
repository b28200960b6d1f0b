"""The communicator interface, the single-process backend and ``gather_values``.

The layer needs exactly one collective per pass, so the whole interface is
``rank``, ``size`` and an in-place SUM allreduce of a float64 buffer:
:meth:`Communicator.allreduce_` for a tensor, checked, and
:meth:`Communicator.allreduce_array_` for the layer's own NumPy buffers.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Communicator", "LocalCommunicator", "gather_values"]


class Communicator:
    """Interface: ``rank``, ``size`` and an in-place SUM allreduce.

    A backend sets ``_rank`` and ``_size`` in its constructor and implements
    ``_allreduce(tensor)``; one that can take a NumPy array without a tensor
    around it also overrides ``_allreduce_array``. ``calls`` counts the
    collectives issued through this object, so tests and benchmarks can
    check how many a step costs.
    """

    name: str = "abstract"

    _rank = 0
    _size = 1

    def __init__(self) -> None:
        self.calls = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def allreduce_(self, buf: torch.Tensor) -> torch.Tensor:
        """Sum ``buf`` (1-D contiguous float64 CPU tensor) over all ranks, in place."""
        if buf.dtype != torch.float64 or buf.dim() != 1 or not buf.is_contiguous():
            raise TypeError(
                "allreduce_: expected a contiguous 1-D float64 tensor "
                f"(got dtype={buf.dtype}, shape={tuple(buf.shape)})"
            )
        self.calls += 1
        self._allreduce(buf)
        return buf

    def _allreduce(self, buf: torch.Tensor) -> None:
        raise NotImplementedError

    def allreduce_array_(self, buf: np.ndarray) -> None:
        """:meth:`allreduce_` for the layer's own buffers: a 1-D C-contiguous
        float64 NumPy array, taken as it is (no check, no tensor around it:
        the layer makes these buffers itself, on a path where every call costs)."""
        self.calls += 1
        self._allreduce_array(buf)

    def _allreduce_array(self, buf: np.ndarray) -> None:
        self._allreduce(torch.from_numpy(buf))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class LocalCommunicator(Communicator):
    """A single process: the allreduce is the identity."""

    name = "local"

    def _allreduce(self, buf: torch.Tensor) -> None:
        pass

    def _allreduce_array(self, buf: np.ndarray) -> None:
        pass


def gather_values(comm: Communicator, values: list[float]) -> torch.Tensor:
    """Every rank's ``values`` as a ``(size, len(values))`` float64 tensor, on every rank.

    Built on the SUM allreduce (each rank fills its own row of a zero
    buffer), so it is one fixed-size collective that any backend provides.
    All ranks must pass the same number of values.
    """
    buf = torch.zeros(comm.size * len(values), dtype=torch.float64)
    row = comm.rank * len(values)
    buf[row : row + len(values)] = torch.tensor(values, dtype=torch.float64)
    comm.allreduce_(buf)
    return buf.view(comm.size, len(values))
