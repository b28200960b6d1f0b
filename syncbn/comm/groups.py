"""Groups inside a job: which ranks share a host, this host's ranks, and fixed-size groups.

* :func:`host_layout`: one gather of host identities, the same table on every rank;
* :func:`split`: this rank's subgroup of a torch.distributed group or an
  mpi4py communicator, every subgroup created by every rank alike;
* :func:`host_communicator`: ``process_group="host"``;
* :func:`new_groups`: groups of ``size`` consecutive ranks.

Every decision here is taken from values that every rank holds alike (a
size, the gathered host table), never from local state alone:
``torch.distributed.new_group`` must be called by every rank of the default
group, members or not, for every group, in the same order.
"""

from __future__ import annotations

import atexit
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import shm
from .base import Communicator, LocalCommunicator, gather_values
from .distributed import TorchCommunicator
from .mpi import MPICommunicator, import_mpi, is_mpi_comm

__all__ = [
    "HostGroup",
    "HostLayout",
    "communicator_of",
    "host_communicator",
    "host_group",
    "host_layout",
    "new_groups",
    "split",
]


@dataclass(frozen=True)
class HostLayout:
    """Which ranks of a group share a host; every rank of the group holds the same table.

    Attributes:
        rank: this rank in the group.
        ids: every rank's :func:`~syncbn.comm.shm.host_id`, in rank order.
        hosts: the ranks on each host, in rank order; the hosts in the order
            of their lowest rank.
    """

    rank: int
    ids: tuple[float, ...]
    hosts: tuple[tuple[int, ...], ...]

    @classmethod
    def from_ids(cls, rank: int, ids: Sequence[float]) -> HostLayout:
        by_host: dict[float, list[int]] = {}  # (insertion order: the hosts' lowest ranks)
        for r, ident in enumerate(ids):
            by_host.setdefault(ident, []).append(r)
        return cls(rank, tuple(ids), tuple(tuple(ranks) for ranks in by_host.values()))

    @property
    def host(self) -> tuple[int, ...]:
        """The ranks on this rank's host (this rank included)."""
        return next(ranks for ranks in self.hosts if self.rank in ranks)

    @property
    def host_ids(self) -> tuple[float, ...]:
        """The identities of the ranks on this rank's host (all equal)."""
        return tuple(self.ids[r] for r in self.host)

    @property
    def leaders(self) -> tuple[int, ...]:
        """One rank per host, its lowest."""
        return tuple(ranks[0] for ranks in self.hosts)

    @property
    def is_leader(self) -> bool:
        return self.rank == self.host[0]

    @property
    def shared_hosts(self) -> tuple[tuple[int, ...], ...]:
        """The hosts that run more than one rank (the only ones shared memory can help)."""
        return tuple(ranks for ranks in self.hosts if len(ranks) > 1)


def host_layout(comm: Communicator) -> HostLayout:
    """The :class:`HostLayout` of ``comm``'s ranks: one collective, the same answer on every rank."""
    ids = gather_values(comm, [shm.host_id()])[:, 0].tolist()
    return HostLayout.from_ids(comm.rank, ids)


def split(group: Any, blocks: Sequence[Sequence[int]], rank: int) -> Any | None:
    """This rank's subgroup of ``group``: the block of ``blocks`` that holds ``rank``.

    Collective over ``group``: every rank calls it with the same ``blocks``
    (disjoint lists of ranks of ``group``, ascending; they need not cover
    every rank). Returns None for a rank in no block.

    Args:
        group: a torch.distributed ProcessGroup that spans the whole default
            group (``torch.distributed.new_group`` is called for every block,
            in order, on every rank: the default group's ranks must all take
            part), or an mpi4py communicator (one ``Split``).
        blocks: the subgroups, as ranks of ``group``.
        rank: this rank in ``group``.
    """
    if is_mpi_comm(group):
        MPI = import_mpi()
        color = next((i for i, block in enumerate(blocks) if rank in block), MPI.UNDEFINED)
        sub = group.Split(color, rank)
        return None if sub == MPI.COMM_NULL else sub
    import torch.distributed as dist

    if dist.get_world_size(group) != dist.get_world_size():
        raise ValueError(
            "split: torch.distributed.new_group needs every rank of the default group, so expected "
            f"a group of all {dist.get_world_size()} ranks (got {dist.get_world_size(group)})"
        )
    global_ranks = dist.get_process_group_ranks(group)
    backend = dist.get_backend(group)
    mine = None
    for block in blocks:
        sub = dist.new_group([global_ranks[r] for r in block], backend=backend)
        if rank in block:
            mine = sub
    return mine


def communicator_of(group: Any) -> Communicator:
    """The plain communicator of a subgroup from :func:`split`: MPI or torch.distributed."""
    return MPICommunicator(group) if is_mpi_comm(group) else TorchCommunicator(group)


@dataclass(frozen=True)
class HostGroup:
    """This rank's host within a group: the layout and the subgroup of the host's ranks.

    Attributes:
        parent: the group (held so that its id cannot be reused while this lives).
        layout: the group's :class:`HostLayout`.
        group: the subgroup of this host's ranks (a torch ProcessGroup or an
            mpi4py communicator), None when this rank is alone on its host.
    """

    parent: Any
    layout: HostLayout
    group: Any | None


# id(parent group) -> its HostGroup, so that a group's host subgroups are
# created once: by "host" and by the two-level communicator alike.
_HOST_GROUPS: dict[int, HostGroup] = {}
atexit.register(_HOST_GROUPS.clear)  # before the interpreter shuts down (see shm._forget_groups)


def host_group(group: Any, base: Communicator, layout: HostLayout | None = None) -> HostGroup:
    """The :class:`HostGroup` of ``group`` (over ``base``), set up on first use.

    Set-up: :func:`host_layout` (unless given) and one :func:`split` into the
    hosts that run more than one rank. Every rank of ``group`` asks for it at
    the same point of its sequence of collectives, so every rank finds the
    same entry or joins the same set-up.
    """
    entry = _HOST_GROUPS.get(id(group))
    if entry is None:
        layout = host_layout(base) if layout is None else layout
        sub = split(group, layout.shared_hosts, base.rank)
        entry = _HOST_GROUPS[id(group)] = HostGroup(group, layout, sub)
    return entry


def host_communicator(group: Any, base: Communicator) -> Communicator:
    """``process_group="host"``: the sum over the ranks of ``group`` that share this host.

    Shared memory among them, set up over their subgroup (a torch
    ProcessGroup or an mpi4py communicator), which also serves buffers too
    large for the segment and the fallback when the segment cannot be made
    or ``$SYNCBN_SHM`` is off; a rank alone on its host sums locally. Every
    rank of ``group`` must resolve it at the same point (the subgroups are
    created together); after that, each host runs on its own.
    """
    if base.size == 1:
        return LocalCommunicator()
    host = host_group(group, base)
    if host.group is None:
        return LocalCommunicator()
    host_base = communicator_of(host.group)
    if not shm.shm_enabled():
        return host_base
    return shm.shared_or_base(host.group, host_base, host.layout.host_ids)


def new_groups(size: int) -> Any:
    """This rank's group of ``size`` consecutive ranks, usable as ``process_group``.

    The world is the group ``process_group="auto"`` sums over: with
    torch.distributed initialized, its default group; else under an MPI
    launcher of several ranks, MPI ``COMM_WORLD``; else this process. Ranks
    ``k * size`` to ``(k + 1) * size - 1`` form group ``k``.

    Collective: every rank calls it, with the same ``size``, at the same
    point (``torch.distributed.new_group`` is called for every group, in
    order, on every rank). A ``size`` that does not divide the world size is
    a ValueError on every rank, raised before any collective.

    Returns:
        A ``torch.distributed.ProcessGroup`` under torch.distributed (usable
        for DDP or any collective too; through shared memory in a layer when
        its ranks share a host), an mpi4py communicator under MPI (from
        ``Split``), or a :class:`~syncbn.comm.LocalCommunicator` in a single
        process.

    Examples::

        >>> # 8 ranks: statistics over ranks 0-3 and over ranks 4-7
        >>> group = syncbn.new_groups(4)
        >>> model = syncbn.convert_sync_batchnorm(model, process_group=group)
    """
    from . import THIS_PROCESS, plain_auto  # (the factory imports this module)

    auto = plain_auto()
    world = auto.communicator.size
    if type(size) is not int or size < 1 or world % size:  # (a bool is not a size)
        raise ValueError(
            f"new_groups: expected a group size that divides the world size {world} (got {size!r})"
        )
    if auto.group is THIS_PROCESS:
        return LocalCommunicator()
    blocks = [tuple(range(start, start + size)) for start in range(0, world, size)]
    return split(auto.group, blocks, auto.communicator.rank)
