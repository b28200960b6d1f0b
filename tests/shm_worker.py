"""Multi-process worker of tests/test_shm.py: SharedMemoryCommunicator on 2-3 ranks.

    torchrun --standalone --nproc_per_node 3 tests/shm_worker.py torch
    mpiexec -n 2 python -m mpi4py tests/shm_worker.py mpi

Prints ``rank R case NAME ok ...`` or ``... FAIL <what>`` per case, then
``rank R segment NAME`` (so the test can check /dev/shm afterwards) and
``rank R done failed=F``. Checks never raise between collectives.

Under torchrun it also checks the automatic choice: ``process_group=None``
is shared memory over the default group (one segment for every layer),
``SYNCBN_SHM=0`` keeps torch.distributed, and a group whose segment cannot
be made (rank 0's creation or one rank's attach raising, simulated by
patching ``SharedMemory`` on that rank) or whose ranks report different
hosts falls back to torch.distributed on every rank.
"""
from __future__ import annotations

import errno
import os
import sys
import zlib
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from rank_output import leave, say
import syncbn
from syncbn.comm import (
    Communicator,
    MPICommunicator,
    SharedMemoryCommunicator,
    TorchCommunicator,
    gather_values,
    get_communicator,
)

CAPACITY = 4096


def values(k: int, n: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * k + rank)
    return torch.randn(n, generator=gen, dtype=torch.float64) * 10 ** (k % 7)


def case_allreduce(comm: SharedMemoryCommunicator) -> list[str]:
    """Exact sums in rank order, bit-identical on every rank, across many sizes and the fallback."""
    errors = []
    sizes = [1, 0, 7, 1025, CAPACITY, CAPACITY + 1, 3] + [(37 * k) % 2000 for k in range(200)]
    digest = 0
    base_calls = comm.base.calls
    for k, n in enumerate(sizes):
        buf = values(k, n, comm.rank)
        expected = values(k, n, 0)
        for r in range(1, comm.size):
            expected += values(k, n, r)
        comm.allreduce_(buf)
        if n > CAPACITY:  # the base's own summation order
            if not torch.allclose(buf, expected, rtol=0, atol=1e-12 * 10 ** (k % 7)):
                errors.append(f"call {k} (n={n}, fallback): wrong sum")
        elif not torch.equal(buf, expected):
            errors.append(f"call {k} (n={n}): not the exact rank-order sum")
        digest = zlib.crc32(buf.numpy().tobytes(), digest)
    if comm.base.calls != base_calls + 1:
        errors.append(f"expected 1 fallback call on the base, got {comm.base.calls - base_calls}")
    digests = gather_values(comm.base, [float(digest)])[:, 0]
    if not bool((digests == digests[0]).all()):
        errors.append(f"results differ across ranks: crc {digests.tolist()}")
    return errors


def case_batchnorm(comm: Communicator) -> list[str]:
    """process_group='shm' against plain BatchNorm2d on the global batch, 3 steps."""
    errors = []
    W, rank, C = comm.size, comm.rank, 5
    counts = [3 + r for r in range(W)]
    gen = torch.Generator().manual_seed(0)
    ref = nn.BatchNorm2d(C).double()
    layer = syncbn.SyncBatchNorm(C, process_group="shm").double()
    with torch.no_grad():
        w = torch.randn(C, generator=gen, dtype=torch.float64)
        ref.weight.copy_(w)
        layer.weight.copy_(w)
    lo = sum(counts[:rank])
    for step in range(3):
        x = torch.randn(sum(counts), C, 4, 3, generator=gen, dtype=torch.float64) * 3 + 1
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        (ref(xr) * g).sum().backward()
        xs = x[lo:lo + counts[rank]].clone().requires_grad_()
        y = layer(xs)
        (y * g[lo:lo + counts[rank]]).sum().backward()
        checks = {
            "input grad": (xs.grad, xr.grad[lo:lo + counts[rank]]),
            "running_mean": (layer.running_mean, ref.running_mean),
            "running_var": (layer.running_var, ref.running_var),
        }
        # the layer sums weight/bias grads over its own shard only: sum them over ranks
        wg = torch.cat([layer.weight.grad, layer.bias.grad]).clone()
        comm.allreduce_(wg)
        checks["weight/bias grad"] = (wg, torch.cat([ref.weight.grad, ref.bias.grad]))
        for what, (a, b) in checks.items():
            if not torch.allclose(a, b, atol=1e-9, rtol=1e-9):
                errors.append(f"step {step}: {what} differs by {(a - b).abs().max().item():.3g}")
        ref.zero_grad()
        layer.zero_grad()
    # outputs, with the statistics of the last batch, against the reference's forward
    x = torch.randn(sum(counts), C, 4, 3, generator=gen, dtype=torch.float64)
    ref_out = nn.functional.batch_norm(x, None, None, ref.weight, ref.bias, True, 0.0, ref.eps)
    out = layer(x[lo:lo + counts[rank]]).detach()
    if not torch.allclose(out, ref_out[lo:lo + counts[rank]], atol=1e-9, rtol=1e-9):
        errors.append("output differs from BatchNorm on the global batch")
    plain = nn.functional.batch_norm(x[lo:lo + counts[rank]], None, None, ref.weight, ref.bias, True, 0.0, ref.eps)
    if torch.allclose(out, plain.detach(), atol=1e-6):
        errors.append("negative control: unsynchronized BN gives the same output")
    # left open (its name was unlinked once every rank had attached)
    say(f"rank {rank} segment {layer.communicator.segment_name}")  # type: ignore[attr-defined]
    return errors


def _same_on_all_ranks(comm: Communicator, text: str) -> bool:
    digests = gather_values(comm, [float(zlib.crc32(text.encode()))])[:, 0]
    return bool((digests == digests[0]).all())


def case_default(base: Communicator) -> list[str]:
    """Under torchrun, None is shared memory over the default group, one segment
    for every layer and for "shm", with the results of plain torch.distributed."""
    import torch.distributed as dist

    errors = []
    C, steps = 4, 3
    layers = [syncbn.SyncBatchNorm(C).double() for _ in range(2)]
    plain = syncbn.SyncBatchNorm(C, process_group="torch").double()
    comms = [layer.communicator for layer in layers]
    if not all(type(c) is SharedMemoryCommunicator for c in comms):
        errors.append(f"default communicators: {comms}")
        return errors
    if type(plain.communicator) is not TorchCommunicator:
        errors.append(f"'torch' resolved to {plain.communicator!r}")
    names = {c.segment_name for c in comms}
    names |= {get_communicator(spec).segment_name  # type: ignore[attr-defined]
              for spec in ("shm", "auto", dist.group.WORLD)}
    if len(names) != 1:
        errors.append(f"more than one segment on the default group: {sorted(names)}")
    if comms[0] is comms[1]:
        errors.append("the layers share one communicator object (their calls would mix)")
    gen = torch.Generator().manual_seed(7)
    for step in range(steps):
        x = torch.randn(2 + base.rank, C, 3, generator=gen, dtype=torch.float64) * 4 - 1
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        results = []
        for layer in (layers[0], plain):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            (y * g).sum().backward()
            results.append((y.detach(), xi.grad, layer.running_mean.clone(), layer.running_var.clone()))
        layers[1](x)  # the second layer takes its turns on the same segment
        for what, a, b in zip(("output", "input grad", "running_mean", "running_var"), *results):
            if not torch.allclose(a, b, rtol=0, atol=1e-12):
                errors.append(f"step {step}: {what} differs from 'torch' by {(a - b).abs().max().item():.3g}")
    calls = [c.calls for c in comms]
    if calls != [2 * steps, steps]:
        errors.append(f"calls per layer {calls} (expected {[2 * steps, steps]})")
    if not _same_on_all_ranks(base, comms[0].segment_name):
        errors.append("ranks use different segments")
    say(f"rank {base.rank} segment {comms[0].segment_name}")
    return errors


def case_default_mpi(base: Communicator) -> list[str]:
    """Under mpiexec the default stays MPI (its own shared-memory transport)."""
    comm = get_communicator(None)
    return [] if type(comm) is MPICommunicator else [f"default is {comm!r}"]


def case_opt_out(base: Communicator) -> list[str]:
    """SYNCBN_SHM=0 (on every rank) keeps torch.distributed; "shm" still works."""
    import torch.distributed as dist

    errors = []
    os.environ["SYNCBN_SHM"] = "0"
    try:
        for spec in (None, "auto", dist.group.WORLD, "torch"):
            comm = get_communicator(spec)
            if type(comm) is not TorchCommunicator:
                errors.append(f"{spec!r} resolved to {comm!r}")
        if type(get_communicator("shm")) is not SharedMemoryCommunicator:
            errors.append("explicit 'shm' disabled too")
    finally:
        del os.environ["SYNCBN_SHM"]
    return errors


def _patched_segments(fail: str) -> tuple[Callable[[], None], list[str]]:
    """Make this rank's ``SharedMemory`` creation (fail="create") or attach
    (fail="attach") raise; returns the undo and the names it created."""
    real = shared_memory.SharedMemory
    created: list[str] = []

    def fake(name: Any = None, create: bool = False, size: int = 0) -> Any:
        if fail == ("create" if create else "attach"):
            raise OSError(errno.ENOSPC if create else errno.ENOENT, f"simulated {fail} failure")
        shm = real(name=name, create=create, size=size)
        if create:
            created.append(shm.name)
        return shm

    shared_memory.SharedMemory = fake  # type: ignore[misc, assignment]

    def undo() -> None:
        shared_memory.SharedMemory = real  # type: ignore[misc]
    return undo, created


def case_fallback(base: Communicator, failure: str) -> list[str]:
    """A new group whose shared memory fails on one rank: torch.distributed on every rank."""
    import torch.distributed as dist

    errors = []
    group = dist.new_group(list(range(base.size)))
    undo: Callable[[], None] = lambda: None
    created: list[str] = []
    if failure == "create_fails" and base.rank == 0:
        undo, created = _patched_segments("create")
    elif failure == "attach_fails" and base.rank == base.size - 1:
        undo, _ = _patched_segments("attach")
    elif failure == "attach_fails" and base.rank == 0:
        undo, created = _patched_segments("")  # only records the name it creates
    elif failure == "hosts_differ":  # every rank on a host of its own (else: two levels)
        real_host_id = syncbn.comm.shm.host_id
        syncbn.comm.shm.host_id = lambda: real_host_id() + 1.0 + base.rank

        def undo() -> None:
            syncbn.comm.shm.host_id = real_host_id
    try:
        comms = [get_communicator(group), syncbn.SyncBatchNorm(3, process_group=group).communicator]
    finally:
        undo()
    for comm in comms:
        if type(comm) is not TorchCommunicator:
            errors.append(f"resolved to {comm!r}")
    buf = torch.full((5,), float(base.rank + 1), dtype=torch.float64)
    comms[1].allreduce_(buf)
    if buf.tolist() != [base.size * (base.size + 1) / 2] * 5:
        errors.append(f"fallback sum {buf.tolist()}")
    if failure == "attach_fails" and base.rank == 0 and len(created) != 1:
        errors.append(f"rank 0 created {created}")
    left = [n for n in created if (Path("/dev/shm") / n).exists()]
    if left:
        errors.append(f"segments left in /dev/shm: {left}")
    return errors


def main(kind: str) -> int:
    if kind == "torch":
        import torch.distributed as dist

        dist.init_process_group("gloo")
    base = get_communicator(kind)
    comm = SharedMemoryCommunicator(base, capacity=CAPACITY)
    cases: list[tuple[str, Callable[[], list[str]]]] = [
        ("allreduce", lambda: case_allreduce(comm)),
        ("batchnorm", lambda: case_batchnorm(base)),
    ]
    if kind == "torch":
        cases += [("default", lambda: case_default(base)), ("opt_out", lambda: case_opt_out(base))]
        cases += [(f, lambda f=f: case_fallback(base, f))  # type: ignore[misc]
                  for f in ("create_fails", "attach_fails", "hosts_differ")]
    else:
        cases += [("default", lambda: case_default_mpi(base))]
    failed = 0
    for name, fn in cases:
        errors = fn()
        failed += bool(errors)
        say(f"rank {comm.rank} case {name} " + ("FAIL " + "; ".join(errors) if errors else "ok"))
    say(f"rank {comm.rank} segment {comm.segment_name}")
    comm.close()
    say(f"rank {base.rank} done failed={failed}")
    if kind == "torch":
        dist.destroy_process_group()
    return int(failed > 0)


if __name__ == "__main__":
    leave(main(sys.argv[1]))
