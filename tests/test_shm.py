"""SharedMemoryCommunicator: one process here, 3 ranks under torchrun and under mpiexec.

The multi-process launches run tests/shm_worker.py as a subprocess (own
session, timeout); each rank prints one line per case and the names of the
segments it used, which must all be gone from /dev/shm after the job.
"""
from __future__ import annotations

import gc
import re
import sys
from pathlib import Path

import pytest
import torch

from launch import job_env, run_job, tool

from syncbn import SyncBatchNorm
from syncbn.comm import LocalCommunicator, SharedMemoryCommunicator, get_communicator

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "shm_worker.py"
TIMEOUT = 180
SHM = Path("/dev/shm")


def _run(cmd: list[str], ranks: int) -> None:
    job = run_job(cmd, TIMEOUT, job_env(SYNCBN_SHM_TIMEOUT="60"))
    out = job.output
    assert job.returncode is not None, f"timed out after {TIMEOUT} s:\n{out[-4000:]}"
    assert job.returncode == 0, out[-4000:]
    for case in ("allreduce", "batchnorm"):
        ok = re.findall(rf"^rank (\d+) case {case} ok$", out, re.MULTILINE)
        assert sorted(map(int, ok)) == list(range(ranks)), f"case {case}:\n{out[-4000:]}"
    done = re.findall(r"^rank (\d+) done failed=0$", out, re.MULTILINE)
    assert sorted(map(int, done)) == list(range(ranks)), out[-4000:]
    assert "resource_tracker" not in out, out[-4000:]
    segments = set(re.findall(r"^rank \d+ segment (\S+)$", out, re.MULTILINE))
    assert len(segments) == 2, out[-4000:]
    if SHM.is_dir():
        assert not [s for s in segments if (SHM / s).exists()], "segments left in /dev/shm"


def test_torchrun_3_ranks() -> None:
    torchrun = tool("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    _run([torchrun, "--standalone", "--nproc_per_node", "3", str(WORKER), "torch"], 3)


def test_mpiexec_3_ranks() -> None:
    mpiexec = tool("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    pytest.importorskip("mpi4py")
    _run([mpiexec, "-n", "3", "--oversubscribe", sys.executable, "-m", "mpi4py", str(WORKER), "mpi"], 3)


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


def test_get_communicator_and_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        monkeypatch.delenv(var, raising=False)
    comm = get_communicator("shm")
    assert isinstance(comm, SharedMemoryCommunicator) and isinstance(comm.base, LocalCommunicator)
    path = SHM / comm.segment_name
    del comm
    gc.collect()
    assert not path.exists()  # garbage collection unlinks
    layer = SyncBatchNorm(3, process_group="shm").double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(3).double()
    assert torch.allclose(layer(x), ref(x), atol=1e-12)
    assert layer.communicator.calls == 1


def test_hosts_differ() -> None:
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
