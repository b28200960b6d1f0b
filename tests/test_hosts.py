"""Groups across hosts: the two-level communicator, process_group="host" and new_groups.

In one process: the host table, the single-process answers, and the
two-level allreduce on simulated ranks (threads, tests/simulated.py) with
real shared-memory segments. Under torchrun and mpiexec: 4 ranks as 2
pretend hosts x 2 ranks (tests/hosts_worker.py sets SYNCBN_HOST from the
rank), against torch's BatchNorm2d and the flat path.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from batchnorm_data import batch, set_random_affine
from hosts_worker import CASES
from launch import job_env, mpiexec_command, run_job, torchrun_command
from simulated import SimulatedCommunicator, SimulatedWorld, run_ranks
import syncbn
from syncbn.comm import HierarchicalCommunicator, LocalCommunicator, get_communicator, new_groups
from syncbn.comm.groups import HostLayout
from syncbn.comm.hierarchical import TwoLevels
from syncbn.comm.shm import Segment

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "hosts_worker.py"
TIMEOUT = 300
SHM = Path("/dev/shm")


# --- the host table ---------------------------------------------------------------


def test_host_layout_orders_hosts_by_their_lowest_rank() -> None:
    layout = HostLayout.from_ids(3, [7.0, 5.0, 7.0, 5.0, 9.0])
    assert layout.hosts == ((0, 2), (1, 3), (4,))
    assert layout.host == (1, 3) and layout.host_ids == (5.0, 5.0)
    assert layout.leaders == (0, 1, 4) and not layout.is_leader
    assert layout.shared_hosts == ((0, 2), (1, 3))
    assert HostLayout.from_ids(4, [7.0, 5.0, 7.0, 5.0, 9.0]).is_leader
    assert HostLayout.from_ids(0, [1.0, 2.0]).shared_hosts == ()


# --- one process ------------------------------------------------------------------


def test_new_groups_in_one_process(no_launcher: None) -> None:
    assert type(new_groups(1)) is LocalCommunicator
    for size in (2, 0, True, 1.0):
        with pytest.raises(ValueError, match=rf"expected a group size that divides the world size 1 \(got {size!r}\)"):
            new_groups(size)  # type: ignore[arg-type]


def test_host_in_one_process(no_launcher: None) -> None:
    assert type(get_communicator("host")) is LocalCommunicator
    layer = syncbn.SyncBatchNorm(2, process_group="host")
    x = torch.randn(5, 2)
    assert torch.allclose(layer(x), nn.BatchNorm1d(2)(x), atol=1e-6)


@pytest.fixture
def gloo_one_rank(no_launcher: None) -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_torch_rank(gloo_one_rank: None) -> None:
    group = new_groups(1)
    assert isinstance(group, dist.ProcessGroup) and dist.get_world_size(group) == 1
    assert type(get_communicator("host")) is LocalCommunicator
    with pytest.raises(ValueError, match=r"divides the world size 1 \(got 2\)"):
        new_groups(2)


# --- two levels on simulated ranks ---------------------------------------------------


def two_level_ranks(hosts: Sequence[Sequence[int]], capacity: int, fn: Any) -> list[Any]:
    """Run ``fn(rank, comm)`` on simulated ranks, ``comm`` a HierarchicalCommunicator over
    ``hosts``: real segments per host, simulated worlds for the set-up and the leaders."""
    size = sum(len(h) for h in hosts)
    ids = [float(next(i for i, h in enumerate(hosts) if r in h)) for r in range(size)]
    host_worlds = [SimulatedWorld(len(h)) for h in hosts]
    leaders_world = SimulatedWorld(len(hosts))

    def rank_fn(rank: int, flat: SimulatedCommunicator) -> Any:
        layout = HostLayout.from_ids(rank, ids)
        index = layout.hosts.index(layout.host)
        segment = None
        if len(layout.host) > 1:
            local = host_worlds[index].comms[layout.host.index(rank)]
            segment = Segment(local, capacity, 30.0, layout.host_ids)
        leaders = leaders_world.comms[index] if layout.is_leader else None
        comm = HierarchicalCommunicator(TwoLevels(flat, layout, segment, leaders, capacity))
        try:
            return fn(rank, comm)
        finally:
            if segment is not None:
                segment.close()

    return run_ranks(size, rank_fn)


@pytest.mark.parametrize("hosts", [[[0, 1], [2, 3]], [[0], [1, 2, 3]], [[0, 2], [1], [3]]])
def test_two_levels_sum_exactly_with_one_collective_among_leaders(hosts: list[list[int]]) -> None:
    def fn(rank: int, comm: HierarchicalCommunicator) -> tuple[list[float], bytes, int, int]:
        flat = comm.flat.calls
        buf = torch.arange(5, dtype=torch.float64) * (rank + 1)
        comm.allreduce_(buf)
        noise = torch.randn(8, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        comm.allreduce_(noise)
        big = torch.full((9,), float(rank), dtype=torch.float64)  # more than the capacity: flat
        comm.allreduce_(big)
        assert big.tolist() == [6.0] * 9 and comm.flat.calls == flat + 1
        leader_calls = comm.leaders.calls if comm.leaders is not None else -1
        return buf.tolist(), noise.numpy().tobytes(), leader_calls, comm.calls

    results = two_level_ranks(hosts, 8, fn)
    leaders = {h[0] for h in hosts}
    for rank, (buf, noise, leader_calls, calls) in enumerate(results):
        assert buf == [10.0 * i for i in range(5)]
        assert noise == results[0][1], "the same bits on every rank"
        assert leader_calls == (2 if rank in leaders else -1) and calls == 3


def test_layer_over_two_levels_matches_batchnorm_on_the_global_batch() -> None:
    counts = [3, 1, 0, 4]  # an empty shard too
    gen = torch.Generator().manual_seed(0)
    x, g = batch((sum(counts), 3, 4, 2), gen, torch.float64)
    ref = nn.BatchNorm2d(3).double()
    set_random_affine(ref, 1)
    xr = x.clone().requires_grad_()
    out = ref(xr)
    (out * g).sum().backward()

    def fn(rank: int, comm: HierarchicalCommunicator) -> tuple[torch.Tensor, ...]:
        layer = syncbn.SyncBatchNorm(3, process_group=comm).double()
        set_random_affine(layer, 1)
        lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
        xs = x[lo:hi].clone().requires_grad_()
        y = layer(xs)
        (y * g[lo:hi]).sum().backward()
        return y.detach(), xs.grad, layer.running_var.clone(), comm.calls

    results = two_level_ranks([[0, 1], [2, 3]], 64, fn)
    assert torch.allclose(torch.cat([r[0] for r in results]), out.detach(), atol=1e-12)
    assert torch.allclose(torch.cat([r[1] for r in results]), xr.grad, atol=1e-12)
    assert all(torch.allclose(r[2], ref.running_var, atol=1e-14) for r in results)
    assert [r[3] for r in results] == [2] * 4
    # negative control: batch norm over rank 0's shard alone differs
    alone = nn.functional.batch_norm(x[:3], None, None, ref.weight, ref.bias, True)
    assert not torch.allclose(alone, results[0][0], atol=1e-6)


# --- 2 pretend hosts x 2 ranks ----------------------------------------------------


def _run(cmd: list[str], kind: str) -> None:
    env = job_env(SYNCBN_SHM_TIMEOUT="60")
    env.pop("SYNCBN_SHM", None)
    env.pop("SYNCBN_HOST", None)  # the worker sets it from the rank
    job = run_job([*cmd, str(WORKER), kind], TIMEOUT, env)
    out = job.describe()
    assert job.returncode == 0, out
    for case, _ in CASES[kind]:
        ok = re.findall(rf"^rank (\d+) case {case} ok$", job.output, re.MULTILINE)
        assert sorted(map(int, ok)) == [0, 1, 2, 3], f"case {case}:\n{out}"
    done = re.findall(r"^rank (\d+) done failed=0$", job.output, re.MULTILINE)
    assert sorted(map(int, done)) == [0, 1, 2, 3], out
    assert "resource_tracker" not in job.output, out
    segments = set(re.findall(r"^rank \d+ segment (\S+)$", job.output, re.MULTILINE))
    assert segments, out
    if SHM.is_dir():
        assert not [s for s in segments if (SHM / s).exists()], "segments left in /dev/shm"


@pytest.mark.launcher
def test_torchrun_two_hosts() -> None:
    _run(torchrun_command(4), "torch")


@pytest.mark.launcher
def test_mpiexec_torch_two_hosts() -> None:
    _run(mpiexec_command(4), "mpi-torch")


@pytest.mark.launcher
def test_mpiexec_two_hosts() -> None:
    _run(mpiexec_command(4), "mpi")
