"""Shared memory: ranks on one host sum through a POSIX shared-memory segment.

The communicator, the segment and its protocol (the data path is
``syncbn/_shm.pyx``), the per-group registry that lets every layer of a
group share one segment, and the host identity that decides who can.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import secrets
import socket
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import _shm
from .._environment import switched_off
from .base import Communicator, gather_values

__all__ = [
    "SharedMemoryCommunicator",
    "ShmUnavailable",
    "group_segment",
    "host_id",
    "shared_or_base",
    "shm_enabled",
]


class ShmUnavailable(RuntimeError):  # noqa: N818 -- public name; a condition to fall back on, not a fault
    """Shared memory cannot serve this group; raised alike on every rank of it."""


class SharedMemoryCommunicator(Communicator):
    """Sum through a POSIX shared-memory segment, for ranks that all live on one host.

    Set up over ``base`` (default: the communicator ``"auto"`` names without
    shared memory: torch.distributed's default group, MPI ``COMM_WORLD`` or
    this process), using only its ``allreduce_``: the ranks check they share
    a host, rank 0 creates the segment and sends its name, the others attach
    and report whether they could; every rank then agrees to use it or
    raises :class:`ShmUnavailable`. Rank 0 unlinks the name as soon as every
    rank has attached, so nothing is left in ``/dev/shm`` even if the job is
    killed; the memory goes when the last rank unmaps it (:meth:`close`,
    garbage collection or exit). Buffers of more than ``capacity`` values go
    through ``base`` instead.

    :func:`get_communicator` keeps one segment per group (torch
    ``ProcessGroup``, mpi4py communicator or this process) and gives every
    layer on it a communicator of its own (with its own ``calls``) over that
    segment: one segment and one sequence counter per group, which is safe
    because every rank issues the collectives of a group in the same order.
    Constructing this class directly makes a segment of its own.

    Segment: ``size`` int64 sequence flags, then two data slots of shape
    ``(size, capacity)`` float64; ``8 * size * (1 + 2 * capacity)`` bytes,
    1 MiB per rank at the default capacity. Call ``k`` (1, 2, ...) uses slot
    ``k % 2``: each rank writes its buffer into its row, publishes
    ``flags[rank] = k``, waits until every flag is ``>= k`` and sums the rows
    in rank order, so every rank gets the same bits. Two slots make reuse
    safe without a second barrier: a rank writes slot ``k % 2`` again only at
    call ``k + 2``, after it saw every flag ``>= k + 1``, and a rank sets
    flag ``k + 1`` only after it finished reading call ``k``.

    Memory ordering (syncbn/_shm.pyx): the flag is published with a release
    store, after the row, and read with acquire loads, before the rows. So a
    rank that sees ``flags[r] >= k`` also sees rank ``r``'s row of call
    ``k``, and a rank's reads of call ``k`` complete before its flag
    ``k + 1`` can be seen (which is what the reuse argument needs). These are
    GCC/Clang atomics: correct on ARM and POWER as on x86. The wait spins
    briefly, then yields the core (``sched_yield``), without the GIL.

    Args:
        base: the communicator used for set-up and for large buffers.
        capacity: values per rank per slot. Default: 65536
        timeout: seconds to wait for the other ranks before RuntimeError.
            Default: ``$SYNCBN_SHM_TIMEOUT`` or 300
    """

    name = "shm"

    def __init__(
        self, base: Communicator | None = None, capacity: int = 65536, timeout: float | None = None
    ) -> None:
        super().__init__()
        self._segment = Segment(default_base() if base is None else base, capacity, timeout)
        self._rank, self._size = self._segment.rank, self._segment.size

    @classmethod
    def _over(cls, segment: Segment) -> SharedMemoryCommunicator:
        """Another communicator over an existing segment (no collective)."""
        comm = cls.__new__(cls)
        Communicator.__init__(comm)
        comm._segment = segment
        comm._rank, comm._size = segment.rank, segment.size
        return comm

    base = property(lambda self: self._segment.base, doc="The communicator of set-up and large buffers.")
    capacity = property(lambda self: self._segment.capacity, doc="Values per rank per slot.")
    timeout = property(lambda self: self._segment.timeout, doc="Seconds to wait for the others.")
    segment_name = property(lambda self: self._segment.name, doc="The segment's (unlinked) name.")

    def close(self) -> None:
        """Unmap the segment; it and every communicator over it are unusable after."""
        self._segment.close()

    def _allreduce(self, buf: torch.Tensor) -> None:
        self._segment.allreduce(buf.numpy())

    def _allreduce_array(self, buf: np.ndarray) -> None:
        self._segment.allreduce(buf)


class Segment:
    """A shared-memory segment, its sequence counter and the base communicator."""

    def __init__(
        self, base: Communicator, capacity: int, timeout: float | None, hosts: Sequence[float] | None = None
    ) -> None:
        from multiprocessing import shared_memory

        self.base = base
        self.capacity = int(capacity)
        if self.capacity < 1:
            raise ValueError(f"SharedMemoryCommunicator: capacity must be >= 1 (got {capacity})")
        self.timeout = float(os.environ.get("SYNCBN_SHM_TIMEOUT", 300) if timeout is None else timeout)
        self.rank, self.size = base.rank, base.size
        # Every step below ends in a collective of ``base`` that every rank
        # reaches, whatever failed where, and every decision is taken from
        # its result: the ranks use the segment together or raise together.
        # ``hosts``: every rank's host_id(), when the caller has gathered them already
        known = gather_values(base, [host_id()])[:, 0].tolist() if hosts is None else list(hosts)
        if len(set(known)) != 1:
            raise ShmUnavailable(
                "shared memory needs every rank on one host, but the ranks run on "
                f"{len(set(known))} hosts: use 'torch' or 'mpi' instead"
            )
        nbytes = 8 * self.size * (1 + 2 * self.capacity)
        msg = torch.zeros(_NAME_LEN + 1, dtype=torch.float64)  # name, then rank 0's failure flag
        shm, error = None, None
        if self.rank == 0:
            try:
                shm = shared_memory.SharedMemory(
                    create=True, size=nbytes, name="syncbn_" + secrets.token_hex(8)
                )
                _reserve(shm, nbytes)
                msg[: len(shm.name)] = torch.tensor([float(ord(c)) for c in shm.name], dtype=torch.float64)
            except Exception as exc:  # OSError mostly (/dev/shm absent or full): fall back together
                error, msg[-1] = exc, 1.0
                if shm is not None:
                    _release_segment(shm, True)
                    shm = None
        base.allreduce_(msg)
        if msg[-1]:
            raise ShmUnavailable(
                f"rank 0 could not create a {nbytes}-byte shared-memory segment"
                + (f" ({error})" if error else "")
            ) from error
        if self.rank != 0:
            try:
                shm = shared_memory.SharedMemory(name="".join(chr(int(v)) for v in msg[:-1].tolist() if v))
                # Python < 3.13 registers attached segments too, and the tracker
                # would unlink the segment (and warn) when this process exits.
                _untrack(shm)
            except Exception as exc:  # e.g. another /dev/shm (a container) on the same host
                error = exc
        failed = torch.tensor([float(shm is None)], dtype=torch.float64)
        base.allreduce_(failed)
        # every rank has attached or given up: the name is no longer needed
        if self.rank == 0 and shm is not None:
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
        if failed.item():
            if shm is not None:
                _release_segment(shm, False)
            raise ShmUnavailable(
                f"{int(failed.item())} rank(s) could not attach the shared-memory segment"
                + (f" ({error})" if error else "")
            ) from error
        assert shm is not None
        self.name: str = shm.name
        self._flags: np.ndarray | None = np.ndarray((self.size,), np.int64, shm.buf)
        self._data: np.ndarray | None = np.ndarray(
            (2, self.size, self.capacity), np.float64, shm.buf, offset=8 * self.size
        )
        self._seq = 0
        self._finalizer = weakref.finalize(self, _release_segment, shm, False)

    @property
    def closed(self) -> bool:
        return self._flags is None

    def close(self) -> None:
        self._flags = self._data = None
        self._finalizer()

    def allreduce(self, buf: np.ndarray) -> None:
        n = buf.shape[0]
        if n > self.capacity:  # the same decision on every rank: sizes match
            self.base.allreduce_array_(buf)
            return
        flags, data = self._flags, self._data
        if flags is None or data is None:
            raise RuntimeError("SharedMemoryCommunicator: used after close()")
        self._seq = k = self._seq + 1
        late = _shm.allreduce(flags, data, self.rank, k, buf, self.timeout)
        if late:
            raise RuntimeError(
                f"SharedMemoryCommunicator: rank {self.rank} waited {self.timeout:g} s "
                f"in call {k}; ranks {late} did not arrive"
            )


_NAME_LEN = 32

SEGMENT_CAPACITY = 65536
"""Values per rank per slot of a group's segment (:func:`group_segment`): larger
buffers go through the group's base communicator."""


def host_id() -> float:
    """This host's identity, hashed to an integer exact in float64.

    ``$SYNCBN_HOST`` when set (containers that share a host name, tests that
    pretend to be several hosts); else the host name and the kernel's boot
    id. Ranks with equal identities are taken to share ``/dev/shm``; if they
    do not, attaching the segment fails on every rank alike and the group
    falls back to its base communicator.
    """
    ident = os.environ.get("SYNCBN_HOST", "")
    if not ident:
        ident = socket.gethostname()
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                ident += "/" + f.read().strip()
        except OSError:
            pass
    return float(int.from_bytes(hashlib.sha256(ident.encode()).digest()[:6], "little"))


def _reserve(shm: Any, nbytes: int) -> None:
    """Allocate the segment's pages now, so that a full /dev/shm is an OSError
    here (ENOSPC) rather than a SIGBUS at the first write to a missing page."""
    fd = getattr(shm, "_fd", -1)
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, nbytes)


def _untrack(shm: Any) -> None:
    from multiprocessing import resource_tracker

    resource_tracker.unregister(shm._name, "shared_memory")


def _release_segment(shm: Any, owner: bool) -> None:
    if owner:
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()
    # BufferError: NumPy views still alive (at interpreter exit): the OS unmaps
    with contextlib.suppress(BufferError):
        shm.close()


def shm_enabled() -> bool:
    """False when ``$SYNCBN_SHM`` turns shared memory off (``0``, ``false``, ``no``, ``off``)."""
    return not switched_off("SYNCBN_SHM")


@dataclass(frozen=True)
class _Registration:
    """A group's entry in the registry: its segment, or why it has none."""

    group: Any  # held so that its id cannot be reused while the entry lives
    segment: Segment | None
    failure: str


# id(group) -> its registration. Groups live as long as the job, as a rule.
# Failures are kept too: later layers on the group then take the same
# decision without repeating the set-up collectives.
_REGISTRY: dict[int, _Registration] = {}


@atexit.register
def _forget_groups() -> None:
    # Let go of the groups before the interpreter shuts down: a torch
    # ProcessGroup that outlives destroy_process_group() and is only freed
    # during interpreter finalization can abort the process on exit
    # ("terminate called without an active exception").
    _REGISTRY.clear()


def group_segment(group: Any, base: Communicator, hosts: Sequence[float] | None = None) -> Segment:
    """The shared segment of ``group`` (set up over ``base`` on first use), or ShmUnavailable.

    Every rank of the group asks for it at the same point of its sequence of
    collectives (layers resolve their communicator in the same order), so
    every rank finds the same registration or joins the same set-up.
    ``hosts``: every rank's :func:`host_id`, if the caller has gathered them
    (saves the set-up's first collective).
    """
    entry = _REGISTRY.get(id(group))
    if entry is None or (entry.segment is not None and entry.segment.closed):
        try:
            entry = _Registration(group, Segment(base, SEGMENT_CAPACITY, None, hosts), "")
        except ShmUnavailable as exc:
            entry = _Registration(group, None, str(exc))
        _REGISTRY[id(group)] = entry
    if entry.segment is None:
        raise ShmUnavailable(entry.failure)
    return entry.segment


def shared_or_base(group: Any, base: Communicator, hosts: Sequence[float] | None = None) -> Communicator:
    """Shared memory over ``group`` (:func:`group_segment`), else ``base`` if it cannot
    serve it: decided alike on every rank of the group."""
    try:
        return SharedMemoryCommunicator._over(group_segment(group, base, hosts))
    except ShmUnavailable:
        return base


def default_base() -> Communicator:
    """The communicator ``"auto"`` names without shared memory."""
    from . import plain_auto  # (the factory imports this module)

    return plain_auto().communicator
