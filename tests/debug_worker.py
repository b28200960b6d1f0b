"""Worker of tests/test_debug.py: ranks that disagree, and a failing rank, under a real launcher.

    mpiexec -n 3 --oversubscribe python -m mpi4py tests/debug_worker.py debug
    torchrun --standalone --nproc_per_node 3 tests/debug_worker.py debug
    torchrun --standalone --nproc_per_node 2 tests/debug_worker.py mistake NAME

``debug``: with ``debug=True``, a sequence of scenarios in which one rank
(rank 1) makes a mistake; every rank must raise the same RuntimeError at the
same collective, so each scenario is caught here and the next one starts in
step. Each rank prints one line per scenario::

    rank R scenario NAME raised RuntimeError: '<message, rank prefix removed>'

then one clean step (rank 2 with no samples) that must succeed everywhere
(``rank R scenario clean ok``), and finally rank 1 raises inside a training
step, between forward and backward, while the others wait in the backward
collective (``rank R failing at <unix time>``): the launcher must end the
whole job with a non-zero exit code.

``mistake NAME`` (no debug mode; what docs/debugging.md describes): rank 1
makes mistake NAME (``num_features``, ``eval``, ``skip``) in step 0 of three
training steps; every rank prints, per step, whether its output matches
plain batch norm of the global batch (``rank R step K ok|WRONG ...``).
Under mpiexec, ``eval`` and ``skip`` end in a collective that waits forever.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

import torch

from rank_output import leave, normalized, say
from syncbn import SyncBatchNorm
from syncbn.comm import detect_launcher

WORLD_MIN = 2
C = 4


def setup() -> tuple[Any, int, int, str]:
    """(process_group spec, rank, size, backend name) from the launcher's environment."""
    if detect_launcher().name == "torchrun":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        return "torch", dist.get_rank(), dist.get_world_size(), "torch"
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return "mpi", comm.Get_rank(), comm.Get_size(), "mpi"


def global_batch(step: int, n: int, channels: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, channels, 3, 3, generator=gen) * 2 + 1
    return x, torch.randn(x.shape, generator=gen)


def debug_scenarios(pg: Any, rank: int, size: int) -> list[tuple[str, Callable[[], None]]]:
    x = torch.randn(2, C, 3, 3)

    def num_features() -> None:
        bn = SyncBatchNorm(C + (rank == 1), process_group=pg, debug=True)
        bn(torch.randn(2, bn.num_features, 3, 3))

    def eval_on_one_rank() -> None:
        bn = SyncBatchNorm(C, process_group=pg, debug=True)
        if rank == 1:
            bn.eval()
        bn(x)

    def skip_then_other_layer() -> None:
        bn1 = SyncBatchNorm(3, process_group=pg, debug=True)
        bn2 = SyncBatchNorm(5, process_group=pg, debug=True)
        if rank != 1:  # rank 1 calls bn1 one time fewer
            bn1(torch.randn(2, 3, 4))
        bn2(torch.randn(2, 5, 4))

    def wrong_channels() -> None:
        bn = SyncBatchNorm(C, process_group=pg, debug=True)
        bn(torch.randn(2, C - (rank == 1), 3, 3))

    def integer_input() -> None:
        bn = SyncBatchNorm(C, process_group=pg, debug=True)
        bn(torch.ones(2, C, 3, dtype=torch.int64 if rank == 1 else torch.float32))

    def one_dim_input() -> None:
        bn = SyncBatchNorm(C, process_group=pg, debug=True)
        bn(torch.randn(C) if rank == 1 else torch.randn(2, C))

    return [("num_features", num_features), ("eval", eval_on_one_rank),
            ("skip", skip_then_other_layer), ("channels", wrong_channels),
            ("dtype", integer_input), ("one_dim", one_dim_input)]


def run_debug(pg: Any, rank: int, size: int) -> None:
    for name, scenario in debug_scenarios(pg, rank, size):
        try:
            scenario()
        except Exception as exc:  # noqa: BLE001 - reported, then the next scenario
            say(f"rank {rank} scenario {name} raised {type(exc).__name__}: {normalized(exc)!r}")
        else:
            say(f"rank {rank} scenario {name} no error")

    # in step again: a clean training step, rank 2 without samples
    x, dy = global_batch(0, 6)
    lo, hi = [(0, 3), (3, 6), (6, 6)][rank] if size == 3 else (rank * 6 // size,
                                                                  (rank + 1) * 6 // size)
    bn = SyncBatchNorm(C, process_group=pg, debug=True)
    xs = x[lo:hi].clone().requires_grad_()
    y = bn(xs)
    y.backward(dy[lo:hi])
    ref = torch.nn.functional.batch_norm(x.double(), None, None, training=True)[lo:hi]
    ok = torch.allclose(y.double(), ref, atol=1e-5) and xs.grad is not None
    say(f"rank {rank} scenario clean {'ok' if ok else 'WRONG'}")

    # a failing rank: rank 1 raises between forward and backward
    bn = SyncBatchNorm(C, process_group=pg)
    for step in range(3):
        xs = torch.randn(2, C, 3, 3, requires_grad=True)
        y = bn(xs)
        if step == 2 and rank == 1:
            say(f"rank {rank} failing at {time.time():.3f}")
            raise RuntimeError("deliberate failure on rank 1 inside a training step")
        y.square().sum().backward()
    say(f"rank {rank} not aborted")  # rank 0 must never get here: it waits in backward


def run_mistake(name: str, pg: Any, rank: int, size: int) -> None:
    n = 2 * size
    bn = SyncBatchNorm(C + (name == "num_features" and rank == 1), process_group=pg)
    for step in range(3):
        x, dy = global_batch(step, n, bn.num_features)
        xs = x[2 * rank:2 * rank + 2].clone().requires_grad_()
        if step == 0 and name == "skip" and rank == 1:
            say(f"rank {rank} step {step} skipped the layer")
            continue
        bn.train(not (step == 0 and name == "eval" and rank == 1))
        start = time.monotonic()
        y = bn(xs)
        y.backward(dy[2 * rank:2 * rank + 2])
        ref = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
        ref = ref[2 * rank:2 * rank + 2]
        diff = float((y.double() - ref).abs().max())
        say(f"rank {rank} step {step} {'ok' if diff < 1e-4 else 'WRONG'} max|y - ref| = {diff:.3g} "
            f"({time.monotonic() - start:.1f} s)")
    say(f"rank {rank} finished")


def main() -> None:
    torch.set_num_threads(1)
    pg, rank, size, backend = setup()
    if size < WORLD_MIN:
        raise SystemExit(f"debug_worker: needs at least {WORLD_MIN} ranks (got {size})")
    mode = sys.argv[1] if len(sys.argv) > 1 else "debug"
    say(f"rank {rank} started backend={backend} size={size} mode={' '.join(sys.argv[1:])}")
    if mode == "debug":
        run_debug(pg, rank, size)
    elif mode == "mistake":
        run_mistake(sys.argv[2], pg, rank, size)
    else:
        raise SystemExit(f"debug_worker: unknown mode {mode!r}")


if __name__ == "__main__":
    main()
    leave(0)
