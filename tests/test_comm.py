"""Communicators: selection, errors, the allreduce contract, gather_values, call counts.

Single process throughout: the MPI path runs against a fake ``mpi4py``
module (importing the real one would initialize MPI in the test process);
torch.distributed runs as a one-rank gloo group; several ranks are
simulated with threads (tests/simulated.py), whose own behaviour is checked
at the end.
"""
from __future__ import annotations

import sys
import threading
import time
import types
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.distributed as dist

from simulated import CollectiveMismatch, RankGone, SimulatedCommunicator, run_ranks
from syncbn import SyncBatchNorm
from syncbn.comm import (
    Communicator,
    Launcher,
    LocalCommunicator,
    MPICommunicator,
    TorchCommunicator,
    auto_backend,
    gather_values,
    get_communicator,
)

@pytest.fixture
def no_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import mpi4py`` fail as if it were not installed."""
    for name in [m for m in sys.modules if m == "mpi4py" or m.startswith("mpi4py.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import raises ImportError


class FakeComm:
    """Stands in for an ``mpi4py.MPI.Comm`` of ``size`` ranks holding identical buffers."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size
        self.allreduce_args: list[tuple[Any, ...]] = []

    def Get_rank(self) -> int:
        return self._rank

    def Get_size(self) -> int:
        return self._size

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Any) -> None:
        self.allreduce_args.append((sendbuf, recvbuf, op))
        recvbuf *= self._size  # every rank holds the same values


@pytest.fixture
def fake_mpi4py(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A fake ``mpi4py.MPI`` with a 3-rank COMM_WORLD."""
    MPI = types.ModuleType("mpi4py.MPI")
    FakeComm.__module__ = "mpi4py.MPI"
    MPI.Comm = FakeComm  # type: ignore[attr-defined]
    MPI.COMM_WORLD = FakeComm(1, 3)  # type: ignore[attr-defined]
    MPI.IN_PLACE = object()  # type: ignore[attr-defined]
    MPI.SUM = object()  # type: ignore[attr-defined]
    pkg = types.ModuleType("mpi4py")
    pkg.MPI = MPI  # type: ignore[attr-defined]
    for name in [m for m in sys.modules if m == "mpi4py" or m.startswith("mpi4py.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mpi4py", pkg)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", MPI)
    return MPI


@pytest.fixture
def gloo_one_rank() -> Iterator[None]:
    """torch.distributed initialized in this process: one gloo rank."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# --- selection ---------------------------------------------------------------


def test_a_subclass_of_an_mpi4py_communicator_is_accepted(fake_mpi4py: types.ModuleType) -> None:
    class UserComm(fake_mpi4py.Comm):  # type: ignore[name-defined,misc]
        """A communicator class defined outside mpi4py, as a user or a library writes one."""

    UserComm.__module__ = __name__
    user_comm = UserComm(0, 2)
    comm = SyncBatchNorm(2, process_group=user_comm).communicator
    assert type(comm) is MPICommunicator and comm.comm is user_comm
    assert (comm.rank, comm.size) == (0, 2)


def test_an_object_of_another_class_is_not_an_mpi_communicator(fake_mpi4py: types.ModuleType) -> None:
    class NotAComm:
        __module__ = "mpi4py.MPI"  # the module name alone does not make a communicator

    with pytest.raises(TypeError, match="process_group: expected .* \\(got NotAComm\\)"):
        get_communicator(NotAComm())


@pytest.mark.parametrize("spec", [None, "auto"])
def test_auto_with_nothing_initialized_is_local(spec: Any, no_launcher: None) -> None:
    comm = get_communicator(spec)
    assert type(comm) is LocalCommunicator
    assert (comm.rank, comm.size) == (0, 1)


def test_auto_without_launcher_does_not_import_mpi4py(no_launcher: None, no_mpi4py: None) -> None:
    assert type(get_communicator(None)) is LocalCommunicator


def test_local_and_instance() -> None:
    assert type(get_communicator("local")) is LocalCommunicator
    mine = LocalCommunicator()
    assert get_communicator(mine) is mine


@pytest.mark.parametrize("spec", ["MPI", "nccl", "", "gloo"])
def test_bad_string_names_accepted_values(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        get_communicator(spec)
    for accepted in ("'auto'", "'mpi'", "'torch'", "'local'", repr(spec)):
        assert accepted in str(info.value)


@pytest.mark.parametrize("spec", [42, 1.5, object(), ["mpi"], torch.zeros(1)])
def test_bad_object_is_type_error(spec: Any) -> None:
    with pytest.raises(TypeError, match="process_group: expected None, 'auto'"):
        get_communicator(spec)


def test_bad_spec_in_layer_raises_at_first_forward_before_any_collective() -> None:
    bn = SyncBatchNorm(2, process_group="gloo")
    with pytest.raises(ValueError, match="got 'gloo'"):
        bn(torch.randn(4, 2))


@pytest.mark.parametrize("torch_size, launcher, shm, expected", [
    (None, Launcher("none", 1, 0), True, "local"),
    (None, Launcher("mpirun", 1, 0), True, "local"),       # one rank never imports mpi4py
    (None, Launcher("mpirun", 3, 1), True, "mpi"),
    (None, Launcher("mpirun", 3, 1), False, "mpi"),
    (None, Launcher("torchrun", 2, 0), True, "local"),     # torchrun without init_process_group
    (2, Launcher("torchrun", 2, 0), True, "shm"),
    (2, Launcher("torchrun", 2, 0), False, "torch"),       # SYNCBN_SHM=0
    (1, Launcher("none", 1, 0), True, "torch"),            # one rank: nothing to share
    (3, Launcher("mpirun", 3, 0), True, "shm"),            # torch.distributed started from MPI wins
])
def test_auto_backend(torch_size: Any, launcher: Launcher, shm: bool, expected: str) -> None:
    assert auto_backend(torch_size, launcher, shm) == expected


def test_torch_without_init_says_what_to_do(no_launcher: None) -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        get_communicator("torch")


def test_torch_selected_when_initialized(no_launcher: None, gloo_one_rank: None) -> None:
    # one rank: nothing to share, so no shared-memory segment (tests/test_shm.py
    # checks the choice of shared memory on several ranks)
    comm = get_communicator(None)
    assert type(comm) is TorchCommunicator and (comm.rank, comm.size) == (0, 1)
    group = dist.new_group([0])
    comm = get_communicator(group)
    assert type(comm) is TorchCommunicator and comm.group is group
    buf = torch.arange(4, dtype=torch.float64)
    comm.allreduce_(buf)
    assert buf.tolist() == [0.0, 1.0, 2.0, 3.0] and comm.calls == 1
    # the layer resolves "auto" to torch.distributed too; in a group of one
    # it has no one to wait for and issues no collective
    bn = SyncBatchNorm(3)
    bn(torch.randn(4, 3))
    assert type(bn.communicator) is TorchCommunicator and bn.communicator.calls == 0


# --- mpi4py: missing, and through a fake --------------------------------------

@pytest.mark.parametrize("spec", ["mpi"])
def test_missing_mpi4py_says_what_to_install(spec: str, no_mpi4py: None) -> None:
    with pytest.raises(ImportError, match=r"pip install .*mpi4py") as info:
        get_communicator(spec)
    assert isinstance(info.value.__cause__, ImportError)
    bn = SyncBatchNorm(2, process_group=spec)
    with pytest.raises(ImportError, match="mpi4py"):
        bn(torch.randn(3, 2))


def test_missing_mpi4py_via_import_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same error when the import machinery itself refuses (builtins.__import__)."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "mpi4py" or name.startswith("mpi4py."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"syncbn\[mpi\]"):
        MPICommunicator()


def test_mpi_communicator_over_fake_mpi(fake_mpi4py: types.ModuleType, no_launcher: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    comm = get_communicator("mpi")
    assert type(comm) is MPICommunicator and comm.comm is fake_mpi4py.COMM_WORLD
    assert (comm.rank, comm.size) == (1, 3)
    buf = torch.ones(5, dtype=torch.float64)
    assert comm.allreduce_(buf) is buf
    assert buf.tolist() == [3.0] * 5 and comm.calls == 1
    sendbuf, recvbuf, op = fake_mpi4py.COMM_WORLD.allreduce_args[-1]
    assert sendbuf is fake_mpi4py.IN_PLACE and op is fake_mpi4py.SUM
    assert isinstance(recvbuf, np.ndarray) and np.shares_memory(recvbuf, buf.numpy())
    # an mpi4py communicator object (e.g. from Split) is wrapped as is
    sub = FakeComm(0, 2)
    comm = get_communicator(sub)
    assert type(comm) is MPICommunicator and comm.comm is sub and comm.size == 2
    # "auto" picks MPI only when a launcher says there is more than one rank
    assert type(get_communicator("auto")) is LocalCommunicator
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    assert type(get_communicator("auto")) is MPICommunicator
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert type(get_communicator("auto")) is LocalCommunicator


def test_one_rank_mpi_does_not_call_mpi(fake_mpi4py: types.ModuleType) -> None:
    comm = MPICommunicator(FakeComm(0, 1))
    buf = torch.ones(2, dtype=torch.float64)
    comm.allreduce_(buf)
    assert comm.comm.allreduce_args == [] and comm.calls == 1


# --- the allreduce_ contract --------------------------------------------------

@pytest.mark.parametrize("bad", [
    torch.zeros(3, dtype=torch.float32),
    torch.zeros(3, dtype=torch.int64),
    torch.zeros(2, 3, dtype=torch.float64),
    torch.zeros((), dtype=torch.float64),
    torch.zeros(6, dtype=torch.float64)[::2],
], ids=["float32", "int64", "2-D", "0-D", "strided"])
def test_allreduce_type_checks(bad: torch.Tensor) -> None:
    world_comm = run_ranks(1, lambda rank, comm: comm)[0]
    for comm in (LocalCommunicator(), world_comm):
        with pytest.raises(TypeError, match="expected a contiguous 1-D float64 tensor"):
            comm.allreduce_(bad)
        assert comm.calls == 0  # a refused buffer is not a collective


def test_local_allreduce_is_identity_and_counts() -> None:
    comm = LocalCommunicator()
    buf = torch.tensor([1.5, -2.0], dtype=torch.float64)
    for k in range(1, 4):
        assert comm.allreduce_(buf) is buf
        assert comm.calls == k
    assert buf.tolist() == [1.5, -2.0]
    assert repr(comm) == "LocalCommunicator(rank=0, size=1)"


def test_abstract_communicator() -> None:
    comm = Communicator()
    with pytest.raises(NotImplementedError):
        comm.allreduce_(torch.zeros(1, dtype=torch.float64))
    # rank and size default to a single process; backends set their own
    assert (comm.rank, comm.size) == (0, 1)


def test_allreduce_array_through_a_tensor_only_backend() -> None:
    # a backend that implements only _allreduce (a tensor) serves the layer's
    # NumPy path through a view of the same memory, and counts it
    seen = []

    class Doubling(Communicator):
        def _allreduce(self, buf: torch.Tensor) -> None:
            seen.append(buf)
            buf.mul_(2)

    comm = Doubling()
    a = np.array([1.0, -3.0, 0.5])
    comm.allreduce_array_(a)
    assert a.tolist() == [2.0, -6.0, 1.0] and comm.calls == 1
    assert isinstance(seen[0], torch.Tensor) and np.shares_memory(seen[0].numpy(), a)
    local = LocalCommunicator()
    local.allreduce_array_(a)
    assert a.tolist() == [2.0, -6.0, 1.0] and local.calls == 1


# --- gather_values ------------------------------------------------------------

def test_gather_values_local() -> None:
    comm = LocalCommunicator()
    table = gather_values(comm, [1.0, 2.5])
    assert table.dtype == torch.float64 and table.tolist() == [[1.0, 2.5]]
    assert comm.calls == 1


@pytest.mark.parametrize("world", [2, 5])
def test_gather_values_simulated(world: int) -> None:
    def fn(rank: int, comm: SimulatedCommunicator) -> torch.Tensor:
        table = gather_values(comm, [float(rank), -rank * 0.5, 7.0])
        assert comm.calls == 1 and comm.sizes == [3 * world]
        return table

    tables = run_ranks(world, fn)
    expected = [[float(r), -r * 0.5, 7.0] for r in range(world)]
    for table in tables:
        assert table.shape == (world, 3) and table.tolist() == expected


def test_gather_values_different_lengths_is_an_error() -> None:
    results = run_ranks(2, lambda rank, comm: gather_values(comm, [1.0] * (rank + 1)),
                        return_exceptions=True)
    assert all(isinstance(r, CollectiveMismatch) for r in results)


# --- the simulated communicator itself ----------------------------------------

def test_simulated_sum_is_bit_identical_and_concurrent() -> None:
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(1000, generator=gen, dtype=torch.float64) * 10 ** r for r in range(4)]
    inside = threading.Barrier(4, timeout=30)

    def fn(rank: int, comm: SimulatedCommunicator) -> torch.Tensor:
        inside.wait()  # all four threads alive at once
        buf = data[rank].clone()
        comm.allreduce_(buf)
        return buf

    out = run_ranks(4, fn)
    assert all(torch.equal(o, out[0]) for o in out)
    torch.testing.assert_close(out[0], sum(data), rtol=1e-15, atol=0)


def test_simulated_rank_returning_early_does_not_hang() -> None:
    def fn(rank: int, comm: SimulatedCommunicator) -> int:
        for _ in range(3 if rank else 2):
            comm.allreduce_(torch.zeros(2, dtype=torch.float64))
        return comm.calls

    results = run_ranks(3, fn, return_exceptions=True, timeout=30)
    assert results[0] == 2
    assert isinstance(results[1], RankGone) and isinstance(results[2], RankGone)
    assert "rank 0 returned" in str(results[1])
    with pytest.raises(RankGone, match="rank 0 returned"):
        run_ranks(3, fn, timeout=30)


def test_simulated_first_exception_propagates() -> None:
    def fn(rank: int, comm: SimulatedCommunicator) -> None:
        comm.allreduce_(torch.zeros(1, dtype=torch.float64))
        if rank == 2:
            raise KeyError("boom on rank 2")
        comm.allreduce_(torch.zeros(1, dtype=torch.float64))

    with pytest.raises(KeyError, match="boom on rank 2"):
        run_ranks(4, fn, timeout=30)


def test_simulated_timeout_breaks_a_stuck_collective() -> None:
    def fn(rank: int, comm: SimulatedCommunicator) -> None:
        if rank == 1:
            time.sleep(1.5)  # busy outside any collective, past the timeout
            return
        comm.allreduce_(torch.zeros(1, dtype=torch.float64))

    results = run_ranks(2, fn, return_exceptions=True, timeout=0.5)
    assert isinstance(results[0], RankGone) and "did not arrive" in str(results[0])
