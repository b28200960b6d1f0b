"""Multi-process worker of tests/test_compile.py (2 ranks): SyncBatchNorm under torch.compile.

    mpiexec -n 2 --oversubscribe python -m mpi4py tests/compile_worker.py mpi
    torchrun --standalone --nproc_per_node 2 tests/compile_worker.py torch

Every rank builds the same network and global batch from one seed and
takes its (uneven) shard. Three copies train side by side for a few SGD
steps: ``torch.compile(model, fullgraph=True)`` of the converted network,
the same network eager, and plain ``torch.nn.BatchNorm2d`` on the whole
global batch in this one process (the reference). Under torchrun both
synchronized copies are wrapped as users do, ``DDP(torch.compile(model))``
over gloo; under mpiexec the test sums the parameter gradients itself.
Compared at every step: outputs, input and parameter gradients, running
statistics and batch counters, and the number of collectives; then one
eval-mode forward. Negative control: plain BatchNorm2d on the shard must
differ from the reference. One line per rank and case::

    rank 1 case shm ok max_err=2.4e-07 neg_diff=0.52

Failures are collected and printed after the case's collectives are done.
"""
from __future__ import annotations

import copy
import datetime
import os
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from rank_output import leave
import syncbn
from syncbn.comm import MPICommunicator, SharedMemoryCommunicator, TorchCommunicator

WORLD = 2
SIZES = [2, 4]  # uneven shards of the global batch
STEPS = 3
TOL = dict(atol=1e-4, rtol=1e-4)  # float32 through two convolutions


class Context:
    rank: int
    size: int
    kind: str

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The test's own sum over ranks (not the layer's communicator)."""
        raise NotImplementedError


class MPIContext(Context):
    kind = "mpi"

    def __init__(self) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        buf = t.detach().double().contiguous().clone()
        self.comm.Allreduce(self.MPI.IN_PLACE, buf.numpy(), op=self.MPI.SUM)
        return buf.to(t.dtype)


class TorchContext(Context):
    kind = "torch"

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        buf = t.detach().clone()
        self.dist.all_reduce(buf)
        return buf


class Checker:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.max_err = 0.0
        self.neg_diff: Optional[float] = None

    def close(self, what: str, actual: Optional[torch.Tensor], expected: Optional[torch.Tensor]) -> None:
        if actual is None or expected is None:
            self.failures.append(f"{what}: missing ({actual is None}/{expected is None})")
            return
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            self.failures.append(f"{what}: {tuple(actual.shape)} {actual.dtype} "
                                 f"(expected {tuple(expected.shape)} {expected.dtype})")
            return
        a, e = actual.detach().double(), expected.detach().double()
        err = float((a - e).abs().max()) if a.numel() else 0.0
        self.max_err = max(self.max_err, err)
        if not torch.allclose(a, e, **TOL):
            self.failures.append(f"{what}: max_err={err:.3g}")

    def check(self, what: str, ok: bool) -> None:
        if not ok:
            self.failures.append(what)


def network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output weights (the loss is ``sum(y * w)``) of the whole batch."""
    g = torch.Generator().manual_seed(100 + step)
    x = 1 + 2 * torch.randn(sum(SIZES), 3, 5, 5, generator=g)
    if step == STEPS - 1:  # channels-last: read in place, kept in the output
        x = x.to(memory_format=torch.channels_last)
    return x, torch.randn(sum(SIZES), 4, 5, 5, generator=g)


EXPECTED_COMM = {"mpi": MPICommunicator, "shm": SharedMemoryCommunicator, "torch": TorchCommunicator}


def run_case(ctx: Context, name: str, spec: Any) -> Checker:
    chk = Checker()
    torch.manual_seed(0)
    base = network()
    rows = slice(sum(SIZES[:ctx.rank]), sum(SIZES[:ctx.rank + 1]))

    reference = copy.deepcopy(base)
    compiled_model = syncbn.convert_sync_batchnorm(copy.deepcopy(base), process_group=spec)
    eager_model = syncbn.convert_sync_batchnorm(copy.deepcopy(base), process_group=spec)
    compiled: Callable[[torch.Tensor], torch.Tensor] = torch.compile(compiled_model, fullgraph=True)
    eager: Callable[[torch.Tensor], torch.Tensor] = eager_model
    scale = 1.0
    if ctx.kind == "torch":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP averages the gradients; the reference's loss is the sum over the global batch
        compiled, eager, scale = DDP(compiled), DDP(eager_model), float(ctx.size)
    models = {"compiled": compiled_model, "eager": eager_model}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    layers = {k: [m for m in models[k].modules() if isinstance(m, syncbn.SyncBatchNorm)] for k in models}

    for step in range(STEPS):
        x, w = global_batch(step)
        xr = x.clone().requires_grad_()
        y_ref = reference(xr)
        (y_ref * w).sum().backward()
        if step == 0:  # negative control: plain BatchNorm2d on this rank's shard
            plain = copy.deepcopy(base)(x[rows])
            chk.neg_diff = float((plain - y_ref[rows]).detach().abs().max())
            chk.check(f"negative control differs by only {chk.neg_diff:.3g}", chk.neg_diff > 1e-2)
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, model in (("compiled", compiled), ("eager", eager)):
            xs = x[rows].clone().requires_grad_()
            y = model(xs)
            (y * w[rows]).sum().mul(scale).backward()
            assert xs.grad is not None
            grad_x = xs.grad / scale  # (the loss scale is for DDP's average of parameter gradients)
            seen[key] = (y.detach(), grad_x)
            chk.close(f"{key} step {step} output", y, y_ref[rows])
            chk.check(f"{key} step {step} memory format", y.stride() == y_ref[rows].stride())
            chk.close(f"{key} step {step} input grad", grad_x, xr.grad[rows])
            params = models[key].named_parameters()
            for (pname, p), q in zip(params, reference.parameters()):
                grad = p.grad if ctx.kind == "torch" else ctx.sum(p.grad)  # (mpi: sum them here)
                chk.close(f"{key} step {step} {pname}.grad", grad, q.grad)
                p.grad = grad
            optimizers[key].step()
            optimizers[key].zero_grad()
            for (bname, b), c in zip(models[key].named_buffers(), reference.buffers()):
                chk.close(f"{key} step {step} {bname}", b, c)
        opt_ref.step()
        opt_ref.zero_grad()
        chk.close(f"step {step} compiled vs eager output", seen["compiled"][0], seen["eager"][0])
        chk.close(f"step {step} compiled vs eager input grad", seen["compiled"][1], seen["eager"][1])
        calls = [[layer.communicator.calls for layer in layers[k]] for k in ("compiled", "eager")]
        chk.check(f"step {step}: collectives compiled {calls[0]} != eager {calls[1]}", calls[0] == calls[1])

    for key in models:
        comm = layers[key][0].communicator
        chk.check(f"{key} communicator {type(comm).__name__} (expected {EXPECTED_COMM[name].__name__})",
                  type(comm) is EXPECTED_COMM[name] and comm.size == ctx.size)

    # eval: the running statistics, no communication
    x, _ = global_batch(STEPS)
    reference.eval()
    y_ref = reference(x)
    for key, model in (("compiled", compiled), ("eager", eager)):
        models[key].eval()
        with torch.no_grad():
            chk.close(f"{key} eval output", model(x[rows]), y_ref[rows])
    return chk


CASES: dict[str, dict[str, Any]] = {"mpi": {"mpi": "mpi"}, "torch": {"shm": None, "torch": "torch"}}


def say(line: str) -> None:
    """One line in one write: the ranks share the launcher's pipe."""
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def main(kind: str) -> int:
    torch.set_num_threads(1)
    ctx: Context = MPIContext() if kind == "mpi" else TorchContext()
    if ctx.size != WORLD:
        raise SystemExit(f"compile_worker: expected {WORLD} ranks (got {ctx.size})")
    failed = 0
    for name, spec in CASES[kind].items():
        torch._dynamo.reset()
        chk = run_case(ctx, name, spec)
        if chk.failures:
            failed += 1
            say(f"rank {ctx.rank} case {name} FAIL " + "; ".join(chk.failures[:8]))
        else:
            say(f"rank {ctx.rank} case {name} ok max_err={chk.max_err:.2g} neg_diff={chk.neg_diff:.2g}")
    if isinstance(ctx, TorchContext):
        ctx.dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CASES:
        raise SystemExit("usage: compile_worker.py {mpi|torch}")
    leave(main(sys.argv[1]))
