"""Start torch.distributed from an MPI job (``mpirun -n N python train.py``).

``mpirun`` gives every process its rank and the world size but none of the
variables ``torch.distributed`` wants (``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``).  :func:`init_process_group_from_mpi` takes them from
the MPI communicator instead, so an MPI job can use ``DistributedDataParallel``
(gradients over gloo) alongside :class:`syncbn.SyncBatchNorm` over mpi4py.
"""

from __future__ import annotations

import socket
from typing import Any

import torch.distributed as dist

from .comm.mpi import import_mpi as _mpi

__all__ = ["init_process_group_from_mpi"]

_LOOPBACK = "127.0.0.1"


def _free_port(host: str) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_process_group_from_mpi(backend: str = "gloo", comm: Any | None = None) -> tuple[int, int]:
    r"""Initialize the default ``torch.distributed`` process group from MPI.

    Rank and world size come from the MPI communicator.  Rank 0 picks the
    rendezvous address and a free TCP port and broadcasts them over MPI; every
    rank then calls :func:`torch.distributed.init_process_group` with
    ``init_method="tcp://addr:port"``.  The address is ``127.0.0.1`` when all
    ranks run on one host, otherwise the host name of rank 0 (which the other
    hosts must be able to resolve).

    This is a collective call: every rank of ``comm`` must make it.  If
    ``torch.distributed`` is already initialized on every rank, nothing is
    started; the existing group's rank and size are checked against ``comm``
    and returned.

    Args:
        backend: the ``torch.distributed`` backend (``"gloo"`` on CPU).
            Default: ``"gloo"``
        comm: an mpi4py intracommunicator whose ranks become the torch ranks.
            Default: ``MPI.COMM_WORLD``

    Returns:
        ``(rank, world_size)`` of this process.

    Raises:
        ImportError: mpi4py is not installed.
        RuntimeError: ``torch.distributed`` is initialized on some ranks only,
            or with a rank or size that does not match ``comm``.

    Examples::

        >>> # mpirun -n 4 python train.py
        >>> rank, world_size = syncbn.init_process_group_from_mpi("gloo")
        >>> model = torch.nn.parallel.DistributedDataParallel(
        ...     syncbn.convert_sync_batchnorm(model, process_group="mpi"))

    .. note::
        The port is free when rank 0 checks it but is only bound later by the
        rendezvous store, so another program could take it in between; this
        is the usual trade-off of letting the OS choose a port.
    """
    MPI = _mpi()
    if comm is None:
        comm = MPI.COMM_WORLD
    rank: int = comm.Get_rank()
    size: int = comm.Get_size()

    # One allgather tells every rank both where everyone runs and whether torch
    # is up everywhere, so all ranks take the same branch below; deciding from
    # local state alone could leave some ranks in the broadcast and others not.
    states: list[tuple[str, bool]] = comm.allgather((socket.gethostname(), dist.is_initialized()))
    initialized = [ready for _, ready in states]
    if all(initialized):
        torch_rank, torch_size = dist.get_rank(), dist.get_world_size()
        if (torch_rank, torch_size) != (rank, size):
            raise RuntimeError(
                "torch.distributed is already initialized with a different layout: "
                f"expected rank {rank} of {size} as in the MPI communicator "
                f"(got rank {torch_rank} of {torch_size})"
            )
        return rank, size
    if any(initialized):
        ready = [r for r, flag in enumerate(initialized) if flag]
        raise RuntimeError(
            "torch.distributed is initialized on some MPI ranks only: "
            f"expected all or none (got ranks {ready} of {size})"
        )

    address: tuple[str, int] | None = None
    if rank == 0:
        hosts = {host for host, _ in states}
        # one host: loopback; several: rank 0's host name, on any interface
        address = (_LOOPBACK, _free_port(_LOOPBACK)) if len(hosts) == 1 else (states[0][0], _free_port(""))
    host, port = comm.bcast(address, root=0)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=size)
    return rank, size
