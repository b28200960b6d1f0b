"""SharedMemoryCommunicator: one process here, 3 ranks under torchrun and under mpiexec.

The multi-process launches run tests/shm_worker.py as a subprocess (own
session, timeout); each rank prints one line per case and the names of the
segments it used, which must all be gone from /dev/shm after the job.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch

from launch import job_env, mpiexec_command, run_job, torchrun_command

import syncbn
from syncbn import SyncBatchNorm
from syncbn.comm import LocalCommunicator, SharedMemoryCommunicator, ShmUnavailable, get_communicator

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "shm_worker.py"
TIMEOUT = 180
SHM = Path("/dev/shm")


CASES = {
    "mpi": ["allreduce", "batchnorm", "default"],
    "torch": ["allreduce", "batchnorm", "default", "opt_out", "create_fails", "attach_fails",
              "hosts_differ"],
}


def _run(cmd: list[str], ranks: int) -> None:
    env = job_env(SYNCBN_SHM_TIMEOUT="60")
    env.pop("SYNCBN_SHM", None)  # the worker checks the automatic choice
    job = run_job(cmd, TIMEOUT, env)
    out = job.output
    assert job.returncode is not None, f"timed out after {TIMEOUT} s:\n{out[-4000:]}"
    assert job.returncode == 0, f"exit code {job.returncode}:\n{out[-4000:]}"
    for case in CASES[cmd[-1]]:
        ok = re.findall(rf"^rank (\d+) case {case} ok$", out, re.MULTILINE)
        assert sorted(map(int, ok)) == list(range(ranks)), f"case {case}:\n{out[-4000:]}"
    done = re.findall(r"^rank (\d+) done failed=0$", out, re.MULTILINE)
    assert sorted(map(int, done)) == list(range(ranks)), f"done lines:\n{out[-4000:]}"
    assert "resource_tracker" not in out, f"resource_tracker warning:\n{out[-4000:]}"
    # two segments: the worker's own SharedMemoryCommunicator, and the one
    # of the default group that every layer ("shm" and, under torchrun, None) shares
    segments = set(re.findall(r"^rank \d+ segment (\S+)$", out, re.MULTILINE))
    assert len(segments) == 2, f"segments {sorted(segments)}:\n{out[-4000:]}"
    if SHM.is_dir():
        assert not [s for s in segments if (SHM / s).exists()], "segments left in /dev/shm"


@pytest.mark.launcher
def test_torchrun_3_ranks() -> None:
    _run([*torchrun_command(3), str(WORKER), "torch"], 3)


@pytest.mark.launcher
def test_mpiexec_3_ranks() -> None:
    _run([*mpiexec_command(3), str(WORKER), "mpi"], 3)


def test_single_process() -> None:
    comm = SharedMemoryCommunicator(LocalCommunicator(), capacity=8)
    setup_calls = comm.base.calls
    path = SHM / comm.segment_name
    assert (comm.rank, comm.size) == (0, 1)
    for n in (0, 3, 8, 9):  # 9: the base's allreduce
        buf = torch.arange(n, dtype=torch.float64)
        assert torch.equal(comm.allreduce_(buf), torch.arange(n, dtype=torch.float64))
    assert comm.calls == 4 and comm.base.calls == setup_calls + 1
    comm.close()
    assert not path.exists()
    with pytest.raises(RuntimeError, match="after close"):
        comm.allreduce_(torch.zeros(2, dtype=torch.float64))


def test_get_communicator_and_layer(no_launcher: None) -> None:
    comm = get_communicator("shm")
    assert isinstance(comm, SharedMemoryCommunicator) and isinstance(comm.base, LocalCommunicator)
    # unlinked as soon as every rank attached: nothing to leak if the job is killed
    assert not (SHM / comm.segment_name).exists()
    layer = SyncBatchNorm(3, process_group="shm").double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(3).double()
    assert torch.allclose(layer(x), ref(x), atol=1e-12)
    # a segment of one row: no one to wait for, no collective
    assert layer.communicator.size == 1 and layer.communicator.calls == 0
    buf = torch.ones(4, dtype=torch.float64)
    assert layer.communicator.allreduce_(buf).tolist() == [1.0] * 4 and layer.communicator.calls == 1


def test_one_segment_per_group(no_launcher: None) -> None:
    """Every "shm" communicator of a group shares its segment; each counts its own calls."""
    a, b = get_communicator("shm"), get_communicator("shm")
    assert a is not b and a.segment_name == b.segment_name  # type: ignore[attr-defined]
    a.allreduce_(torch.ones(3, dtype=torch.float64))
    assert (a.calls, b.calls) == (1, 0)
    assert torch.equal(b.allreduce_(torch.ones(2, dtype=torch.float64)), torch.ones(2, dtype=torch.float64))
    # a communicator built by hand has a segment of its own
    own = SharedMemoryCommunicator(capacity=4)
    assert own.segment_name != a.segment_name and own.capacity == 4  # type: ignore[attr-defined]
    own.close()
    assert b.allreduce_(torch.ones(1, dtype=torch.float64)).item() == 1.0
    # closing the group's segment closes it for all; the next request makes a new one
    a.close()  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="after close"):
        b.allreduce_(torch.zeros(1, dtype=torch.float64))
    c = get_communicator("shm")
    assert c.segment_name != a.segment_name  # type: ignore[attr-defined]
    assert c.allreduce_(torch.ones(1, dtype=torch.float64)).item() == 1.0


def test_auto_never_picks_shm_for_one_process(no_launcher: None) -> None:
    assert type(get_communicator(None)) is LocalCommunicator


@pytest.mark.parametrize("value, enabled", [("", True), ("1", True), ("0", False), ("off", False),
                                            ("False", False), ("no", False)])
def test_syncbn_shm_variable(monkeypatch: pytest.MonkeyPatch, value: str, enabled: bool) -> None:
    monkeypatch.setenv("SYNCBN_SHM", value)
    assert syncbn.comm.shm.shm_enabled() is enabled


def test_hosts_differ() -> None:  # (auto falls back instead: tests/shm_worker.py)
    class TwoHosts(LocalCommunicator):
        """Rank 0 of 2 whose peer reports another host in gather_values."""

        @property
        def size(self) -> int:
            return 2

        def _allreduce(self, buf: torch.Tensor) -> None:
            buf[1:] += 12345.0

    with pytest.raises(RuntimeError, match="one host.*'torch' or 'mpi'"):
        SharedMemoryCommunicator(TwoHosts())


def test_timeout_names_missing_ranks() -> None:
    class Alone(LocalCommunicator):
        """Rank 0 of 2 whose peer never arrives (after agreeing on the host in set-up)."""

        @property
        def size(self) -> int:
            return 2

        def _allreduce(self, buf: torch.Tensor) -> None:
            if buf.numel() == 2:  # gather_values of the host id
                buf[1] = buf[0]

    comm = SharedMemoryCommunicator(Alone(), capacity=4, timeout=0.2)
    with pytest.raises(RuntimeError, match=r"ranks \[1\] did not arrive"):
        comm.allreduce_(torch.ones(2, dtype=torch.float64))
    comm.close()


def test_full_dev_shm_is_an_error_not_a_sigbus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pages are reserved at creation: a full /dev/shm raises there (and
    leaves nothing behind) instead of killing a rank at its first write."""
    from multiprocessing import shared_memory

    real, created = shared_memory.SharedMemory, []

    def recording(*args: object, **kwargs: object) -> object:
        shm = real(*args, **kwargs)  # type: ignore[arg-type]
        created.append(shm.name)
        return shm

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shared_memory, "SharedMemory", recording)
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ShmUnavailable, match="rank 0 could not create") as info:
        SharedMemoryCommunicator(LocalCommunicator())
    assert isinstance(info.value.__cause__, OSError)
    assert len(created) == 1 and not (SHM / created[0]).exists()


def test_kernel_sums_rows_in_rank_order_and_checks_its_arguments() -> None:
    """syncbn._shm.allreduce on plain arrays: rank 1 of 3, ranks 0 and 2 already arrived."""
    import numpy as np

    from syncbn import _shm

    flags = np.array([1, 0, 2], dtype=np.int64)
    data = np.zeros((2, 3, 4))
    data[1, 0, :3] = [1e16, 1.0, -1.0]
    data[1, 2, :3] = [-1e16, 2.0, 3.0]
    buf = np.array([1.0, 0.5, 0.25])
    assert _shm.allreduce(flags, data, 1, 1, buf, 1.0) == []
    assert buf.tolist() == [(1e16 + 1.0) - 1e16, 3.5, 2.25]  # left to right: 1.0 is lost
    assert flags.tolist() == [1, 1, 2] and data[1, 1, :3].tolist() == [1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="do not fit"):
        _shm.allreduce(flags, data, 1, 3, np.zeros(5), 1.0)
    with pytest.raises(ValueError, match="one segment"):
        _shm.allreduce(flags, data, 3, 3, np.zeros(1), 1.0)
    assert _shm.allreduce(flags, data, 1, 3, np.zeros(1), 0.05) == [0, 2]  # timeout
