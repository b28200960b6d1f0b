"""Communicators: one in-place SUM allreduce of a float64 buffer, several backends.

* :class:`~syncbn.comm.mpi.MPICommunicator` over an mpi4py communicator;
* :class:`~syncbn.comm.distributed.TorchCommunicator` over a
  ``torch.distributed`` process group (gloo on CPU included);
* :class:`~syncbn.comm.shm.SharedMemoryCommunicator`, ranks on one host
  summing through a shared-memory segment set up over one of the others;
* :class:`~syncbn.comm.hierarchical.HierarchicalCommunicator`, a group
  across hosts: shared memory on each host, one leader per host on the network;
* :class:`~syncbn.comm.base.LocalCommunicator`, one process, a no-op.

:func:`get_communicator` turns what a user passes as ``process_group`` into
one of them; :func:`~syncbn.comm.groups.new_groups` makes groups of
consecutive ranks. mpi4py and torch.distributed are imported only when asked
for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from .base import Communicator, LocalCommunicator, gather_values
from .distributed import TorchCommunicator
from .groups import host_communicator, new_groups
from .hierarchical import HierarchicalCommunicator, over_hosts
from .launcher import Launcher, detect_launcher
from .mpi import MPICommunicator, is_mpi_comm
from .shm import SharedMemoryCommunicator, ShmUnavailable, group_segment, shm_enabled

__all__ = [
    "CommSpec",
    "Communicator",
    "HierarchicalCommunicator",
    "Launcher",
    "LocalCommunicator",
    "MPICommunicator",
    "SharedMemoryCommunicator",
    "ShmUnavailable",
    "TorchCommunicator",
    "auto_backend",
    "detect_launcher",
    "gather_values",
    "get_communicator",
    "new_groups",
]

CommSpec = Union[None, str, Communicator, Any]
"""What ``process_group`` accepts: see :func:`get_communicator`."""

_NAMES = ("None", "'auto'", "'mpi'", "'torch'", "'local'", "'shm'", "'host'")


def get_communicator(spec: CommSpec = None) -> Communicator:
    """Return the communicator that ``spec`` names.

    Args:
        spec: ``None`` or ``"auto"``: if torch.distributed is initialized, its
            default group, over shared memory when all its ranks are on this
            host, in two levels when they span several hosts and some host
            runs several of them (:class:`HierarchicalCommunicator`), else
            ``torch.distributed.all_reduce``; else MPI ``COMM_WORLD`` if an
            MPI launcher started more than one rank; else a single process.
            A ``torch.distributed.ProcessGroup``: that group, likewise (two
            levels only for a group of every rank of the job). ``"torch"``:
            plain torch.distributed on the default group (no shared memory).
            ``"mpi"``, an mpi4py communicator: MPI. ``"local"``: this process
            alone. ``"shm"``: shared memory among the ranks of ``"auto"``'s
            group, an error if they are not on one host. ``"host"``: the
            ranks of ``"auto"``'s group on this host, through shared memory
            (one rank alone on its host: local). A :class:`Communicator`:
            itself. Groups of consecutive ranks: :func:`new_groups`.

    Shared memory is chosen automatically only for torch.distributed groups
    of more than one rank, and not when ``$SYNCBN_SHM`` is ``0`` (set it alike
    on every rank). All layers on one group share its set-up: one segment per
    host, one leaders' group.
    """
    if isinstance(spec, Communicator):
        return spec
    if spec is None or spec == "auto":
        backend = auto_backend(_torch_world_size(), detect_launcher(), shm_enabled())
        auto = _auto_group(backend)
        if backend == "shm":
            return over_hosts(auto.group, auto.communicator)
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
        if spec == "host":
            auto = plain_auto()
            return host_communicator(auto.group, auto.communicator)
        raise ValueError(
            f"process_group: expected {', '.join(_NAMES)}, a torch.distributed ProcessGroup "
            f"or an mpi4py communicator (got {spec!r})"
        )
    if is_mpi_comm(spec):
        return MPICommunicator(spec)
    import torch.distributed as dist

    if dist.is_available() and isinstance(spec, dist.ProcessGroup):
        base = TorchCommunicator(spec)
        return over_hosts(spec, base) if _shm_first(base.size, shm_enabled()) else base
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


def auto_backend(torch_world_size: int | None, launcher: Launcher, shm: bool) -> str:
    """The name of the backend ``None`` (or ``"auto"``) resolves to; the one place that decides.

    Pure: nothing is imported, initialized or communicated, so it also
    describes a job before it starts (``python -m syncbn``).

    Args:
        torch_world_size: the size of torch.distributed's default group, or
            None when torch.distributed is not initialized.
        launcher: how this process was started (:func:`detect_launcher`).
        shm: whether shared memory may be chosen (:func:`~syncbn.comm.shm.shm_enabled`).

    Returns:
        ``"shm"``: shared memory over torch.distributed's default group: on
        one host, shared memory alone; across hosts, two levels (shared
        memory on each host, one leader per host on the network); its set-up
        falls back to ``"torch"``, on every rank alike, when no host runs two
        ranks or a segment cannot be made (:func:`~syncbn.comm.hierarchical.over_hosts`); ``"torch"``;
        ``"mpi"``: ``COMM_WORLD``, only when an MPI launcher started more than
        one rank (so a single process never imports mpi4py, which initializes
        MPI); else ``"local"``.
    """
    if torch_world_size is not None:
        return "shm" if _shm_first(torch_world_size, shm) else "torch"
    if launcher.name == "mpirun" and launcher.size > 1:
        return "mpi"
    return "local"


def plain_auto() -> AutoGroup:
    """``"auto"`` without shared memory: torch.distributed's default group if
    it is initialized, else MPI ``COMM_WORLD`` under an MPI launcher with more
    than one rank, else this process."""
    return _auto_group(auto_backend(_torch_world_size(), detect_launcher(), shm=False))


def _auto_group(backend: str) -> AutoGroup:
    """The group of :func:`auto_backend`'s answer (for ``"shm"``: the group it is set up over)."""
    if backend == "local":
        return AutoGroup(THIS_PROCESS, LocalCommunicator())
    if backend == "mpi":
        # without mpi4py: an ImportError that says what to install, never a silent
        # single process (which would train on unsynchronized statistics)
        comm = MPICommunicator()
        return AutoGroup(comm.comm, comm)
    import torch.distributed as dist

    return AutoGroup(dist.group.WORLD, TorchCommunicator())


def _torch_world_size() -> int | None:
    """The size of torch.distributed's default group, None when it is not initialized."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else None


def _shm_first(size: int, shm: bool) -> bool:
    """Whether a torch.distributed group of ``size`` ranks tries shared memory first."""
    return size > 1 and shm
