"""Two levels: shared memory within each host, one allreduce among one leader per host.

For a torch.distributed group whose ranks run on several hosts, some host
with more than one of them. :func:`over_hosts` decides, once per group and
alike on every rank, what such a group's layers sum through: shared memory
alone (one host), :class:`HierarchicalCommunicator` (several hosts), or
the group's own backend (the flat path).
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import Communicator
from .distributed import TorchCommunicator
from .groups import HostLayout, host_group, host_layout, split
from .shm import SEGMENT_CAPACITY, Segment, ShmUnavailable, group_segment, shared_or_base

__all__ = ["HierarchicalCommunicator", "TwoLevels", "over_hosts", "path_of"]


@dataclass(frozen=True)
class TwoLevels:
    """What every layer on a two-level group shares (one set-up per group).

    Attributes:
        flat: the whole group over its own backend: set-up, and buffers of
            more than ``capacity`` values.
        layout: which ranks share a host.
        host: the shared-memory segment of this host's ranks; None when this
            rank is alone on its host.
        leaders: the group's backend among one rank per host (each host's
            lowest); None on the other ranks.
        capacity: the largest buffer that goes through the two levels, the
            same on every rank (a segment's capacity, whether this rank has
            a segment or not).
    """

    flat: Communicator
    layout: HostLayout
    host: Segment | None
    leaders: Communicator | None
    capacity: int = SEGMENT_CAPACITY


class HierarchicalCommunicator(Communicator):
    """Sum over a group that spans several hosts: shared memory on each host, the network among hosts.

    One allreduce is three steps:

    1. the ranks of each host sum their buffers through their segment (in
       rank order; every rank of the host gets the host's sum);
    2. each host's leader (its lowest rank) sums the hosts' sums with the
       other leaders, over the group's own backend: one collective among
       ``H`` leaders instead of ``W`` ranks, none on the other ranks;
    3. the leader hands the result back through the segment: it contributes
       the result, the others zeros, so every rank of the host gets the
       leader's bits exactly (``x + 0.0 == x``).

    A rank alone on its host is its own leader and skips steps 1 and 3.
    Buffers of more than :attr:`capacity` values go through the whole group
    instead (every rank sees the same size and takes the same path).
    ``calls`` counts this object's allreduces; ``leaders.calls`` counts the
    network collectives of every layer on the group.

    Built by :func:`over_hosts`, which gives every layer a communicator of
    its own over one shared :class:`TwoLevels`.
    """

    name = "hierarchical"

    def __init__(self, levels: TwoLevels) -> None:
        super().__init__()
        self.levels = levels
        self._rank, self._size = levels.flat.rank, levels.flat.size

    flat = property(lambda self: self.levels.flat, doc="The whole group, over its own backend.")
    leaders = property(lambda self: self.levels.leaders, doc="The leaders' communicator (None off leaders).")
    capacity = property(lambda self: self.levels.capacity, doc="The largest buffer sent in two levels.")

    @property
    def hosts(self) -> int:
        return len(self.levels.layout.hosts)

    def _allreduce(self, buf: torch.Tensor) -> None:
        self._allreduce_array(buf.numpy())

    def _allreduce_array(self, buf: np.ndarray) -> None:
        levels = self.levels
        if buf.shape[0] > levels.capacity:  # the same size, so the same choice, on every rank
            levels.flat.allreduce_array_(buf)
            return
        if levels.host is not None:
            levels.host.allreduce(buf)  # 1. this host's sum
        if levels.leaders is not None:
            levels.leaders.allreduce_array_(buf)  # 2. the sum over hosts
        else:
            buf.fill(0.0)  # in step 3 only the leader's result may count
        if levels.host is not None:
            levels.host.allreduce(buf)  # 3. the leader's result, plus zeros
        else:
            # a rank alone on its host adds the zero the others' step 3 adds,
            # so that -0.0 becomes 0.0 here as there: the same bits everywhere
            buf += 0.0

    def __repr__(self) -> str:
        leader = self.levels.leaders is not None
        return (
            f"{type(self).__name__}(rank={self.rank}, size={self.size}, hosts={self.hosts}, leader={leader})"
        )


@dataclass(frozen=True)
class _Plan:
    """What :func:`over_hosts` decided for a group: ``levels``, or one host, or flat (``reason``)."""

    group: Any  # held so that its id cannot be reused while the entry lives
    layout: HostLayout
    levels: TwoLevels | None
    reason: str


# id(group) -> its plan. Decided once: later layers on the group take the same
# path without set-up collectives, on every rank alike.
_PLANS: dict[int, _Plan] = {}
atexit.register(_PLANS.clear)  # before the interpreter shuts down (see shm._forget_groups)


def over_hosts(group: Any, base: Communicator) -> Communicator:
    """The communicator of a torch.distributed ``group`` of several ranks, shared memory allowed.

    * every rank on one host: shared memory over the group
      (:class:`~syncbn.comm.SharedMemoryCommunicator`, or ``base`` if its
      segment cannot be made);
    * several hosts, some running several ranks, and the group spanning the
      whole job: :class:`HierarchicalCommunicator`, or ``base`` on every rank
      if shared memory fails on any host;
    * else (one rank per host, or a subgroup of the job across hosts:
      ``new_group`` would need the ranks outside it): ``base``.

    Set-up, on first use of ``group``, every step decided from values every
    rank holds alike:

    1. one gather of host identities over ``base`` (:func:`~syncbn.comm.groups.host_layout`);
    2. one ``new_group`` per host that runs several ranks (every rank calls
       each), then each such host sets up its segment among its own ranks
       (two small collectives in that host's subgroup);
    3. one allreduce over ``base``: how many hosts failed; any -> flat, on
       every rank;
    4. one ``new_group`` of the leaders (every rank calls it).
    """
    plan = _PLANS.get(id(group))
    if plan is None:
        plan = _PLANS[id(group)] = _plan(group, base)
    if len(plan.layout.hosts) == 1:
        return shared_or_base(group, base, plan.layout.ids)
    if plan.levels is None:
        return base
    return HierarchicalCommunicator(plan.levels)


def path_of(group: Any) -> str | None:
    """Why :func:`over_hosts` chose what it did for ``group`` (``"one host"``,
    ``"two levels"`` or the reason for the flat path); None before its first use."""
    plan = _PLANS.get(id(group))
    return None if plan is None else plan.reason


def _plan(group: Any, base: Communicator) -> _Plan:
    import torch.distributed as dist

    layout = host_layout(base)
    if len(layout.hosts) == 1:
        return _Plan(group, layout, None, "one host")
    if not layout.shared_hosts:
        return _Plan(group, layout, None, "one rank per host")
    if base.size != dist.get_world_size():
        return _Plan(group, layout, None, "a subgroup of the job: new_group would need the others")
    host = host_group(group, base, layout)
    segment, failure = None, ""
    if host.group is not None:
        try:
            segment = group_segment(host.group, TorchCommunicator(host.group), layout.host_ids)
        except ShmUnavailable as exc:
            failure = str(exc)
    failed_hosts = torch.tensor([float(bool(failure) and layout.is_leader)], dtype=torch.float64)
    base.allreduce_(failed_hosts)
    if failed_hosts.item():
        reason = f"shared memory failed on {int(failed_hosts.item())} of {len(layout.hosts)} hosts"
        return _Plan(group, layout, None, reason + (f" (here: {failure})" if failure else ""))
    leaders_group = split(group, [layout.leaders], base.rank)
    leaders = TorchCommunicator(leaders_group) if leaders_group is not None else None
    return _Plan(group, layout, TwoLevels(base, layout, segment, leaders), "two levels")
