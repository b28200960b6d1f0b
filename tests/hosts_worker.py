"""Multi-process worker of tests/test_hosts.py: 4 ranks as 2 pretend hosts x 2 ranks.

    torchrun --standalone --nproc_per_node 4 tests/hosts_worker.py torch
    mpiexec -n 4 --oversubscribe python -m mpi4py tests/hosts_worker.py mpi-torch
    mpiexec -n 4 --oversubscribe python -m mpi4py tests/hosts_worker.py mpi

Before syncbn is used, each rank sets ``SYNCBN_HOST`` from its rank
(``pretend-{rank // 2}``): ranks 0-1 and 2-3 then take themselves for two
hosts. ``torch``: torchrun, torch.distributed over gloo; ``mpi-torch``:
mpirun with torch.distributed started by ``syncbn.init_process_group_from_mpi``;
``mpi``: mpirun and mpi4py alone.

Every rank builds the same global batch from one seed and takes its shard;
the layer is compared with ``torch.nn.BatchNorm2d`` run here on the batch of
the ranks it sums over (outputs, input grads, weight/bias grads summed over
those ranks, running statistics, several steps), with a negative control
(batch norm over another set of ranks must differ). Prints ``rank R case
NAME ok`` or ``... FAIL <what>``, ``rank R segment NAME`` for every segment
it used (the test checks /dev/shm afterwards) and ``rank R done failed=F``.
Checks never raise between collectives.
"""
from __future__ import annotations

import errno
import os
import sys
import zlib
from collections.abc import Sequence
from multiprocessing import shared_memory
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from batchnorm_data import batch, set_random_affine
from rank_output import leave, say
import syncbn
from syncbn.comm import (
    Communicator,
    HierarchicalCommunicator,
    MPICommunicator,
    SharedMemoryCommunicator,
    TorchCommunicator,
    detect_launcher,
    gather_values,
    get_communicator,
    new_groups,
)
from syncbn.comm.hierarchical import path_of

WORLD = 4
RANKS_PER_HOST = 2
C = 3
STEPS = 3
TOL = dict(atol=1e-9, rtol=1e-9)


class NetworkCollectives:
    """Counts ``torch.distributed.all_reduce`` calls (TorchCommunicator looks it up at each call)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.count = 0
        real = dist.all_reduce

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        dist.all_reduce = counted


class Job:
    """This rank, the world's plain communicator (the test's own collectives) and the counter."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.torch = kind in ("torch", "mpi-torch")
        if kind == "torch":
            import torch.distributed as dist

            dist.init_process_group("gloo")
        elif kind == "mpi-torch":
            syncbn.init_process_group_from_mpi("gloo")
        self.world: Communicator = TorchCommunicator() if self.torch else MPICommunicator()
        self.rank = self.world.rank
        self.network = NetworkCollectives() if self.torch else None
        self.segments: set[str] = set()

    def network_count(self) -> int:
        return self.network.count if self.network is not None else 0

    def same_everywhere(self, data: bytes) -> bool:
        digests = gather_values(self.world, [float(zlib.crc32(data))])[:, 0]
        return bool((digests == digests[0]).all())


def counts() -> list[int]:
    """Uneven shards: rank r holds 2 + r samples."""
    return [2 + r for r in range(WORLD)]


def rows_of(ranks: Sequence[int]) -> torch.Tensor:
    """The global batch's rows that ``ranks`` hold, in rank order."""
    starts = [sum(counts()[:r]) for r in range(WORLD)]
    return torch.cat([torch.arange(starts[r], starts[r] + counts()[r]) for r in ranks])


def bn_parity(job: Job, spec: Any, members: Sequence[int], control: Sequence[int],
              flat_spec: Any = None) -> tuple[list[str], list[int]]:
    """``SyncBatchNorm(process_group=spec)`` against BatchNorm2d over the batch of
    ``members``, STEPS steps; the output must differ from batch norm over
    ``control``'s batch. With ``flat_spec``, also against a layer on that group
    (same batch). Returns the errors and the network collectives of each step's
    forward and backward (the layer's own only)."""
    errors: list[str] = []
    rank = job.rank
    gen = torch.Generator().manual_seed(1234)
    ref = nn.BatchNorm2d(C).double()
    layer = syncbn.SyncBatchNorm(C, process_group=spec).double()
    other = syncbn.SyncBatchNorm(C, process_group=flat_spec).double() if flat_spec is not None else None
    for m in (ref, layer, other):
        if m is not None:
            set_random_affine(m, 5)
    mine = rows_of([rank])
    group_rows = rows_of(members)
    where = torch.cat([torch.nonzero(group_rows == i) for i in mine]).view(-1)  # my rows in the group's batch
    network = []
    for step in range(STEPS):
        x, g = batch((sum(counts()), C, 4, 3), gen, torch.float64)
        xr = x[group_rows].clone().requires_grad_()
        out_ref = ref(xr)
        (out_ref * g[group_rows]).sum().backward()
        xs = x[mine].clone().requires_grad_()
        before = job.network_count()
        y = layer(xs)
        (y * g[mine]).sum().backward()
        network.append(job.network_count() - before)
        # weight/bias grads are this rank's sums: add them up over the members
        grads = gather_values(job.world, torch.cat([layer.weight.grad, layer.bias.grad]).tolist())
        checks = {
            "output": (y.detach(), out_ref.detach()[where]),
            "input grad": (xs.grad, xr.grad[where]),
            "weight/bias grad": (grads[list(members)].sum(0), torch.cat([ref.weight.grad, ref.bias.grad])),
            "running_mean": (layer.running_mean, ref.running_mean),
            "running_var": (layer.running_var, ref.running_var),
        }
        if other is not None:
            xo = x[mine].clone().requires_grad_()
            yo = other(xo)
            (yo * g[mine]).sum().backward()
            checks.update({
                "output vs flat": (y.detach(), yo.detach()),
                "input grad vs flat": (xs.grad, xo.grad),
                "running stats vs flat": (torch.cat([layer.running_mean, layer.running_var]),
                                          torch.cat([other.running_mean, other.running_var])),
            })
        for what, (a, b) in checks.items():
            if not torch.allclose(a, b, **TOL):
                errors.append(f"step {step}: {what} differs by {(a - b).abs().max().item():.3g}")
        if step == 0:  # negative control: batch norm over another set of ranks
            control_rows = rows_of(control)
            out = F.batch_norm(x[control_rows], None, None, ref.weight, ref.bias, True, 0.0, ref.eps)
            at = torch.cat([torch.nonzero(control_rows == i) for i in mine]).view(-1)
            if torch.allclose(out.detach()[at], y.detach(), atol=1e-6):
                errors.append(f"negative control: batch norm over ranks {list(control)} gives the same output")
        ref.zero_grad()
        layer.zero_grad()
        if other is not None:
            other.zero_grad()
    stats = torch.cat([layer.running_mean, layer.running_var]).numpy().tobytes()
    same = job.same_everywhere(stats if len(members) == WORLD else b"")
    if not same:
        errors.append("running statistics differ in their bits across ranks")
    return errors, network


def host_of(rank: int) -> list[int]:
    first = rank - rank % RANKS_PER_HOST
    return list(range(first, first + RANKS_PER_HOST))


def exact_sums(job: Job, comm: Communicator) -> list[str]:
    """Integer-valued buffers sum exactly in any order; random ones give the same bits everywhere."""
    errors = []
    digest = 0
    for k, n in enumerate([1, 7, 2 * C + 1, 1000, 65536]):
        buf = torch.arange(n, dtype=torch.float64) * (job.rank + 1) + k
        comm.allreduce_(buf)
        expected = torch.arange(n, dtype=torch.float64) * sum(r + 1 for r in range(WORLD)) + WORLD * k
        if not torch.equal(buf, expected):
            errors.append(f"n={n}: not the exact sum")
        noise = torch.randn(n, generator=torch.Generator().manual_seed(10 * k + job.rank), dtype=torch.float64)
        comm.allreduce_(noise)
        digest = zlib.crc32(noise.numpy().tobytes(), digest)
    if not job.same_everywhere(digest.to_bytes(4, "little")):
        errors.append("sums differ in their bits across ranks")
    return errors


def check_levels(job: Job, comm: Communicator, hosts: list[list[int]]) -> list[str]:
    """``comm`` is a HierarchicalCommunicator of ``hosts``, with the right leader and segment."""
    if not isinstance(comm, HierarchicalCommunicator):
        return [f"expected a HierarchicalCommunicator (got {comm!r})"]
    errors = []
    here = next(h for h in hosts if job.rank in h)
    leader = job.rank == here[0]
    levels = comm.levels
    if comm.hosts != len(hosts) or (comm.leaders is not None) != leader:
        errors.append(f"{comm!r} on hosts {hosts}")
    if leader and comm.leaders is not None and comm.leaders.size != len(hosts):
        errors.append(f"leaders' group of {comm.leaders.size} (expected {len(hosts)})")
    if (levels.host is None) != (len(here) == 1):
        errors.append(f"segment {levels.host} on a host of {len(here)} rank(s)")
    if levels.host is not None:
        if levels.host.size != len(here):
            errors.append(f"segment of {levels.host.size} ranks (expected {len(here)})")
        job.segments.add(levels.host.name)
    return errors


def counted_collectives(job: Job, comm: HierarchicalCommunicator, run: Callable[[], list[int]],
                        hosts: list[list[int]]) -> list[str]:
    """``run`` (a parity check returning network collectives per step) costs one
    collective per pass among leaders, none elsewhere; the flat path is not used."""
    leader = any(job.rank == h[0] for h in hosts)
    leader_calls = comm.leaders.calls if comm.leaders is not None else 0
    flat_calls = comm.flat.calls
    per_step = run()
    errors = []
    if per_step != [2 if leader else 0] * STEPS:
        errors.append(f"network collectives per step {per_step} (expected {2 if leader else 0} each)")
    now = comm.leaders.calls if comm.leaders is not None else 0
    if now - leader_calls != (2 * STEPS if leader else 0):
        errors.append(f"leaders' communicator: {now - leader_calls} calls in {STEPS} steps")
    if comm.flat.calls != flat_calls:
        errors.append(f"the flat path took {comm.flat.calls - flat_calls} calls")
    return errors


# --------------------------------------------------------------------------- #
# cases                                                                        #
# --------------------------------------------------------------------------- #

def case_two_levels(job: Job) -> list[str]:
    """None on 2 hosts x 2 ranks: two levels, parity with 'torch' and with BatchNorm2d,
    one network collective per pass on leaders, none on the others."""
    import torch.distributed as dist

    hosts = [[0, 1], [2, 3]]
    comm = get_communicator(None)
    errors = check_levels(job, comm, hosts)
    if errors:
        return errors
    assert isinstance(comm, HierarchicalCommunicator)
    if path_of(dist.group.WORLD) != "two levels":
        errors.append(f"path {path_of(dist.group.WORLD)!r}")
    again = get_communicator(dist.group.WORLD)
    if not isinstance(again, HierarchicalCommunicator) or again.levels is not comm.levels or again is comm:
        errors.append(f"the world group resolved again to {again!r} (expected its own object, same levels)")
    found: list[str] = []

    def run() -> list[int]:
        errs, network = bn_parity(job, None, range(WORLD), [job.rank], flat_spec="torch")
        found.extend(errs)
        return network

    errors += counted_collectives(job, comm, run, hosts) + found
    errors += exact_sums(job, comm)
    # more than a segment holds: the whole group, on every rank alike
    flat_calls, leader_calls = comm.flat.calls, comm.leaders.calls if comm.leaders is not None else 0
    big = torch.full((comm.capacity + 1,), float(job.rank + 1), dtype=torch.float64)
    comm.allreduce_(big)
    if not bool((big == 10.0).all()) or comm.flat.calls != flat_calls + 1:
        errors.append(f"large buffer: sum {big[:2].tolist()}, flat calls +{comm.flat.calls - flat_calls}")
    if comm.leaders is not None and comm.leaders.calls != leader_calls:
        errors.append("large buffer went through the leaders")
    return errors


def case_mixed_hosts(job: Job) -> list[str]:
    """A host of one rank (rank 0, its own leader, no segment) and a host of three."""
    import torch.distributed as dist

    hosts = [[0], [1, 2, 3]]
    os.environ["SYNCBN_HOST"] = "mixed-a" if job.rank == 0 else "mixed-b"
    try:
        group = dist.new_group(list(range(WORLD)))
        comm = get_communicator(group)
    finally:
        os.environ["SYNCBN_HOST"] = pretend_host(job.rank)
    errors = check_levels(job, comm, hosts)
    if errors:
        return errors
    assert isinstance(comm, HierarchicalCommunicator)
    found: list[str] = []

    def run() -> list[int]:
        errs, network = bn_parity(job, group, range(WORLD), [job.rank], flat_spec="torch")
        found.extend(errs)
        return network

    errors += counted_collectives(job, comm, run, hosts) + found
    errors += exact_sums(job, comm)
    big = torch.ones(comm.capacity + 5, dtype=torch.float64)  # rank 0 has no segment, still goes flat
    comm.allreduce_(big)
    if not bool((big == WORLD).all()):
        errors.append("large buffer: wrong sum")
    return errors


def case_host(job: Job) -> list[str]:
    """process_group="host": the two ranks of this pretend host, through shared memory."""
    comm = get_communicator("host")
    errors = []
    if type(comm) is not SharedMemoryCommunicator or comm.size != RANKS_PER_HOST:
        return [f"'host' resolved to {comm!r}"]
    job.segments.add(comm.segment_name)
    expected_base = TorchCommunicator if job.torch else MPICommunicator
    if type(comm.base) is not expected_base or comm.base.size != RANKS_PER_HOST:
        errors.append(f"'host' over {comm.base!r}")
    errs, network = bn_parity(job, "host", host_of(job.rank), range(WORLD))
    errors += errs
    if any(network):
        errors.append(f"network collectives per step {network} (expected none)")
    return errors


def case_new_groups(job: Job) -> list[str]:
    """new_groups(2): ranks {0, 1} and {2, 3}; a size that does not divide 4 fails on every rank."""
    errors = []
    try:
        new_groups(3)
        errors.append("new_groups(3) did not raise")
    except ValueError as exc:
        if "expected a group size that divides the world size 4 (got 3)" not in str(exc):
            errors.append(f"new_groups(3): {exc}")
    group = new_groups(2)
    if job.torch:
        import torch.distributed as dist

        if not isinstance(group, dist.ProcessGroup) or dist.get_process_group_ranks(group) != host_of(job.rank):
            errors.append(f"new_groups(2) gave {group!r}")
        comm = get_communicator(group)
        if type(comm) is not SharedMemoryCommunicator:  # its ranks share a pretend host
            errors.append(f"a group on one host resolved to {comm!r}")
        else:
            job.segments.add(comm.segment_name)
    else:
        from mpi4py import MPI

        if not isinstance(group, MPI.Comm) or group.Get_size() != 2 or group.Get_rank() != job.rank % 2:
            errors.append(f"new_groups(2) gave {group!r}")
        comm = get_communicator(group)
        if type(comm) is not MPICommunicator:
            errors.append(f"an MPI group resolved to {comm!r}")
    errs, _ = bn_parity(job, group, host_of(job.rank), range(WORLD))
    errors += errs
    if job.torch:  # a group of every rank is the world: two levels
        whole = new_groups(WORLD)
        errors += check_levels(job, get_communicator(whole), [[0, 1], [2, 3]])
    return errors


def case_subgroup_across_hosts(job: Job) -> list[str]:
    """A group of ranks 0-2 spans both hosts but not the job: flat (new_group would need rank 3)."""
    import torch.distributed as dist

    group = dist.new_group([0, 1, 2])
    if job.rank == 3:
        return []
    comm = get_communicator(group)
    errors = []
    if type(comm) is not TorchCommunicator:
        errors.append(f"resolved to {comm!r}")
    if not (path_of(group) or "").startswith("a subgroup of the job"):
        errors.append(f"path {path_of(group)!r}")
    buf = torch.full((3,), float(job.rank + 1), dtype=torch.float64)
    comm.allreduce_(buf)
    if buf.tolist() != [6.0] * 3:
        errors.append(f"sum {buf.tolist()}")
    return errors


def case_fallback(job: Job) -> list[str]:
    """Host 1's segment cannot be made (rank 2's SharedMemory creation fails):
    every rank falls back to the flat path together, with correct results."""
    import torch.distributed as dist

    group = dist.new_group(list(range(WORLD)))
    real = shared_memory.SharedMemory

    def failing(name: Any = None, create: bool = False, size: int = 0) -> Any:
        if create:
            raise OSError(errno.ENOSPC, "simulated: no space left in /dev/shm")
        return real(name=name, create=create, size=size)

    if job.rank == 2:  # the rank that creates host 1's segment
        shared_memory.SharedMemory = failing  # type: ignore[misc, assignment]
    try:
        comm = get_communicator(group)
    finally:
        shared_memory.SharedMemory = real  # type: ignore[misc]
    errors = []
    if type(comm) is not TorchCommunicator:
        errors.append(f"resolved to {comm!r}")
    reason = path_of(group) or ""
    if not reason.startswith("shared memory failed on 1 of 2 hosts"):
        errors.append(f"path {reason!r}")
    before = job.network_count()
    again = get_communicator(group)  # decided once: no set-up collective again
    if type(again) is not TorchCommunicator or job.network_count() != before:
        errors.append(f"second resolution: {again!r}, {job.network_count() - before} collectives")
    errs, network = bn_parity(job, group, range(WORLD), [job.rank])
    errors += errs
    if network != [2] * STEPS:
        errors.append(f"flat path: network collectives per step {network} (expected 2 each)")
    return errors


def case_opt_out(job: Job) -> list[str]:
    """SYNCBN_SHM=0: a new group of every rank stays flat; "host" is its host's plain group."""
    import torch.distributed as dist

    errors = []
    os.environ["SYNCBN_SHM"] = "0"
    try:
        group = dist.new_group(list(range(WORLD)))
        comm = get_communicator(group)
        if type(comm) is not TorchCommunicator or path_of(group) is not None:
            errors.append(f"resolved to {comm!r}")
        host = get_communicator("host")
        if type(host) is not TorchCommunicator or host.size != RANKS_PER_HOST:
            errors.append(f"'host' resolved to {host!r}")
    finally:
        del os.environ["SYNCBN_SHM"]
    return errors


def case_default_mpi(job: Job) -> list[str]:
    """Under mpirun without torch.distributed, None stays MPI COMM_WORLD (MPI's own hierarchy)."""
    comm = get_communicator(None)
    return [] if type(comm) is MPICommunicator and comm.size == WORLD else [f"default is {comm!r}"]


CASES: dict[str, list[tuple[str, Callable[[Job], list[str]]]]] = {
    "torch": [
        ("two_levels", case_two_levels),
        ("mixed_hosts", case_mixed_hosts),
        ("host", case_host),
        ("new_groups", case_new_groups),
        ("subgroup_across_hosts", case_subgroup_across_hosts),
        ("fallback", case_fallback),
        ("opt_out", case_opt_out),
    ],
    "mpi-torch": [
        ("two_levels", case_two_levels),
        ("host", case_host),
        ("new_groups", case_new_groups),
        ("fallback", case_fallback),
    ],
    "mpi": [
        ("default", case_default_mpi),
        ("host", case_host),
        ("new_groups", case_new_groups),
    ],
}


def pretend_host(rank: int) -> str:
    return f"pretend-{rank // RANKS_PER_HOST}"


def main(kind: str) -> int:
    # before syncbn reads it: the first host identity is taken at the first set-up
    os.environ["SYNCBN_HOST"] = pretend_host(detect_launcher().rank)
    job = Job(kind)
    failed = 0
    for name, case in CASES[kind]:
        errors = case(job)
        failed += bool(errors)
        say(f"rank {job.rank} case {name} " + ("FAIL " + "; ".join(errors) if errors else "ok"))
    for segment in sorted(job.segments):
        say(f"rank {job.rank} segment {segment}")
    say(f"rank {job.rank} done failed={failed}")
    if job.torch:
        import torch.distributed as dist

        dist.destroy_process_group()
    return int(failed > 0)


if __name__ == "__main__":
    leave(main(sys.argv[1]))
