"""Multi-process worker of tests/test_shm.py: SharedMemoryCommunicator on 2-3 ranks.

    torchrun --standalone --nproc_per_node 3 tests/shm_worker.py torch
    mpiexec -n 2 python -m mpi4py tests/shm_worker.py mpi

Prints ``rank R case NAME ok ...`` or ``... FAIL <what>`` per case, then
``rank R segment NAME`` (so the test can check /dev/shm afterwards) and
``rank R done failed=F``. Checks never raise between collectives.
"""
from __future__ import annotations

import os
import sys
import zlib

import torch
import torch.nn as nn

import syncbn
from syncbn.comm import Communicator, SharedMemoryCommunicator, gather_values

CAPACITY = 4096


def _say(line: str) -> None:
    # one write per line: ranks share the launcher's stdout, and print()'s
    # separate writes of text and newline interleave between processes
    os.write(sys.stdout.fileno(), (line + "\n").encode())


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
    # left open: rank 0 unlinks it at interpreter exit
    _say(f"rank {rank} segment {layer.communicator.segment_name}")  # type: ignore[attr-defined]
    return errors


def main(kind: str) -> int:
    if kind == "torch":
        import torch.distributed as dist

        dist.init_process_group("gloo")
    base = syncbn.comm.get_communicator(kind)
    comm = SharedMemoryCommunicator(base, capacity=CAPACITY)
    failed = 0
    for name, fn in (("allreduce", lambda: case_allreduce(comm)),
                     ("batchnorm", lambda: case_batchnorm(base))):
        errors = fn()
        failed += bool(errors)
        _say(f"rank {comm.rank} case {name} " + ("FAIL " + "; ".join(errors) if errors else "ok"))
    _say(f"rank {comm.rank} segment {comm.segment_name}")
    del comm  # garbage collection unlinks (rank 0)
    _say(f"rank {base.rank} done failed={failed}")
    if kind == "torch":
        dist.destroy_process_group()
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
