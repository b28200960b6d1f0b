"""Communicators: one in-place SUM allreduce of a float64 buffer, several backends.

* :class:`~syncbn.comm.mpi.MPICommunicator` over an mpi4py communicator;
* :class:`~syncbn.comm.distributed.TorchCommunicator` over a
  ``torch.distributed`` process group (gloo on CPU included);
* :class:`~syncbn.comm.shm.SharedMemoryCommunicator`, ranks on one host
  summing through a shared-memory segment set up over one of the others;
* :class:`~syncbn.comm.base.LocalCommunicator`, one process, a no-op.

:func:`get_communicator` turns what a user passes as ``process_group`` into
one of them. mpi4py and torch.distributed are imported only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from .base import Communicator, LocalCommunicator, gather_values
from .distributed import TorchCommunicator
from .launcher import Launcher, detect_launcher
from .mpi import MPICommunicator, is_mpi_comm, mpi_world_size
from .shm import SharedMemoryCommunicator, ShmUnavailable, group_segment, shm_enabled

__all__ = [
    "CommSpec",
    "Communicator",
    "Launcher",
    "LocalCommunicator",
    "MPICommunicator",
    "SharedMemoryCommunicator",
    "ShmUnavailable",
    "TorchCommunicator",
    "detect_launcher",
    "gather_values",
    "get_communicator",
]

CommSpec = Union[None, str, Communicator, Any]
"""What ``process_group`` accepts: see :func:`get_communicator`."""

_NAMES = ("None", "'auto'", "'mpi'", "'torch'", "'local'", "'shm'")


def get_communicator(spec: CommSpec = None) -> Communicator:
    """Return the communicator that ``spec`` names.

    Args:
        spec: ``None`` or ``"auto"``: if torch.distributed is initialized, its
            default group, over shared memory when all its ranks are on this
            host (else ``torch.distributed.all_reduce``); else MPI
            ``COMM_WORLD`` if an MPI launcher started more than one rank;
            else a single process. A ``torch.distributed.ProcessGroup``:
            that group, over shared memory likewise. ``"torch"``: plain
            torch.distributed on the default group (no shared memory).
            ``"mpi"``, an mpi4py communicator: MPI. ``"local"``: this process
            alone. ``"shm"``: shared memory among the ranks of ``"auto"``'s
            group, an error if they are not on one host. A
            :class:`Communicator`: itself.

    Shared memory is chosen automatically only for torch.distributed groups
    of more than one rank, and not when ``$SYNCBN_SHM`` is ``0`` (set it alike
    on every rank). All layers on one group share one segment.
    """
    if isinstance(spec, Communicator):
        return spec
    if spec is None or spec == "auto":
        auto = plain_auto()
        if isinstance(auto.communicator, TorchCommunicator):
            return _shm_or_torch(auto.group, auto.communicator)
        return auto.communicator
    if isinstance(spec, str):
        if spec == "local":
            return LocalCommunicator()
        if spec == "mpi":
            return MPICommunicator()
        if spec == "torch":
            return TorchCommunicator()
        if spec == "shm":
            auto = plain_auto()
            return SharedMemoryCommunicator._over(group_segment(auto.group, auto.communicator))
        raise ValueError(
            f"process_group: expected {', '.join(_NAMES)}, a torch.distributed ProcessGroup "
            f"or an mpi4py communicator (got {spec!r})"
        )
    if is_mpi_comm(spec):
        return MPICommunicator(spec)
    import torch.distributed as dist

    if dist.is_available() and isinstance(spec, dist.ProcessGroup):
        return _shm_or_torch(spec, TorchCommunicator(spec))
    raise TypeError(
        f"process_group: expected {', '.join(_NAMES)}, a torch.distributed ProcessGroup, "
        f"an mpi4py communicator or a syncbn.comm.Communicator (got {type(spec).__name__})"
    )


@dataclass(frozen=True)
class AutoGroup:
    """The group ``"auto"`` names, without shared memory, and its communicator."""

    group: Any  # a torch ProcessGroup, an mpi4py communicator, or THIS_PROCESS
    communicator: Communicator


THIS_PROCESS = object()
"""The group of a single process (the key of its shared-memory registration)."""


def plain_auto() -> AutoGroup:
    """``"auto"`` without shared memory: torch.distributed's default group if
    it is initialized, else MPI ``COMM_WORLD`` under an MPI launcher with more
    than one rank, else this process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return AutoGroup(dist.group.WORLD, TorchCommunicator())
    if mpi_world_size() > 1:
        comm = MPICommunicator()
        return AutoGroup(comm.comm, comm)
    return AutoGroup(THIS_PROCESS, LocalCommunicator())


def _shm_or_torch(group: Any, base: TorchCommunicator) -> Communicator:
    """Shared memory over ``group`` if it can serve it (decided alike on every rank), else ``base``."""
    if base.size == 1 or not shm_enabled():
        return base
    try:
        return SharedMemoryCommunicator._over(group_segment(group, base))
    except ShmUnavailable:
        return base
