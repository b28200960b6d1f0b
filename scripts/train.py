#!/usr/bin/env python
"""Train a small conv net on scikit-learn's digits with synchronized batch norm.

The same script runs under any launcher:

    mpirun -n 4 python scripts/train.py           # SyncBatchNorm over mpi4py, DDP over gloo
    torchrun --nproc_per_node 4 scripts/train.py  # SyncBatchNorm and DDP over torch.distributed
    python scripts/train.py                       # one process

Every step, every rank takes its slice of the same global batch of
``world_size * --batch-size`` images, so a run with N processes follows the
same trajectory as one process training on the global batches.  ``--check``
makes rank 0 verify exactly that: it trains a single-process replica with
plain ``torch.nn.BatchNorm2d`` on the global batches and reports the largest
loss difference.

A checkpoint written with ``--save`` holds the state_dict of the plain
BatchNorm2d network; ``--load PATH --eval-only`` evaluates it in one process.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from tqdm import tqdm

HELD_OUT = 297  # 1,797 digits: 1,500 to train on, 297 held out
SPLIT_SEED = 0  # the split is fixed whatever --seed is, so accuracies compare across runs


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2, help="(default: 2)")
    p.add_argument("--batch-size", type=int, default=8, help="images per process per step (default: 8)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, momentum 0.9 (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and shuffling (default: 0)")
    p.add_argument("--comm", choices=["auto", "mpi", "torch", "local"], default="auto",
                   help="what SyncBatchNorm communicates over; auto: mpi under mpirun, syncbn's default under torchrun (shared memory on one host, else torch); "
                        "local: no synchronization, each rank normalizes its own shard (for comparison)")
    p.add_argument("--threads", type=int, default=1, help="threads per process, torch and syncbn kernels (default: 1)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop each epoch after this many steps (for tests)")
    p.add_argument("--check", action="store_true",
                   help="rank 0 also trains a plain-BatchNorm2d replica on the global batches and compares losses")
    p.add_argument("--save", type=Path, default=None, metavar="PATH", help="write a checkpoint loadable into plain BatchNorm2d")
    p.add_argument("--load", type=Path, default=None, metavar="PATH", help="checkpoint to evaluate (with --eval-only)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --load on the held-out set in one process")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.eval_only != (args.load is not None):
        p.error("--eval-only and --load go together")
    if args.batch_size < 1 or args.epochs < 0 or args.threads < 1:
        p.error("--batch-size and --threads must be positive, --epochs not negative")
    return args


# ----------------------------------------------------------------------------- data and model


def load_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits as (N, 1, 8, 8) float32 in [0, 1]: x_train, y_train, x_held_out, y_held_out."""
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(y)))
    train, held_out = order[:-HELD_OUT], order[-HELD_OUT:]
    return x[train], y[train], x[held_out], y[held_out]


def build_model() -> nn.Sequential:
    """A small conv net with plain BatchNorm2d (converted to SyncBatchNorm for training).

    Smooth on purpose (SiLU, average pooling): with ReLU or max pooling, a
    rounding-level difference can flip a kink or a near-tie and change a
    gradient by far more than the rounding, so the --check replica could drift
    for reasons that have nothing to do with batch-norm synchronization.
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.SiLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.SiLU(),
        nn.AvgPool2d(2),  # 4x4
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.SiLU(),
        nn.AvgPool2d(2),  # 2x2
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 10),
    )


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> float:
    """One optimizer step on the mean cross-entropy of the batch; returns the loss."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def global_batches(n: int, global_batch: int, seed: int, epoch: int) -> Tensor:
    """(steps, global_batch) indices of one epoch; the same on every rank.

    The tail that does not fill a global batch is dropped, so every rank gets
    the same number of samples each step: the mean of the ranks' mean losses
    (which DDP's gradient averaging computes) is then the global mean loss.
    """
    steps = n // global_batch
    order = np.random.default_rng([seed, epoch]).permutation(n)[: steps * global_batch]
    return torch.from_numpy(order).view(steps, global_batch)


@torch.no_grad()
def count_correct(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Correct predictions in eval mode (running statistics: no collectives)."""
    was_training = model.training
    model.eval()
    correct = int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct


# ----------------------------------------------------------------------------- launchers


def resolve_comm(requested: str, launcher: str) -> str:
    """The process_group string for SyncBatchNorm under this launcher."""
    if requested == "auto":
        # under torchrun, syncbn's own default: shared memory when every rank
        # is on this host, else torch.distributed
        return {"mpirun": "mpi", "torchrun": "auto"}.get(launcher, "local")
    if requested == "torch" and launcher == "none":
        sys.exit("--comm torch needs a distributed launch (torchrun or mpirun)")
    if requested == "mpi" and launcher == "torchrun":
        # Each torchrun worker is its own one-process MPI world: nothing would be synchronized.
        sys.exit("--comm mpi needs mpirun (under torchrun every process is its own MPI world)")
    return requested


def import_syncbn(threads: int) -> ModuleType:
    """Import syncbn with its kernels' OpenMP thread count set to ``threads``.

    When the kernels bind to torch's OpenMP runtime (torch's wheel ships a
    libgomp.so.1), torch.set_num_threads covers them; when they load a runtime
    of their own, it reads OMP_NUM_THREADS as it loads, so set that first.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import syncbn
    except ModuleNotFoundError:  # running from a source checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import syncbn
    return syncbn


def setup_distributed(launcher: str) -> tuple[int, int]:
    """Start torch.distributed (gloo) for DDP; returns (rank, world_size)."""
    if launcher == "torchrun":
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    if launcher == "mpirun":
        from syncbn.launch import init_process_group_from_mpi

        return init_process_group_from_mpi("gloo")
    return 0, 1


def wrap_ddp(module: nn.Module) -> nn.Module:
    """DistributedDataParallel without the buffer broadcast before every forward.

    SyncBatchNorm already keeps identical running statistics on every rank.
    """
    ddp = nn.parallel.DistributedDataParallel
    # Newer torch deprecates broadcast_buffers in favour of forward_sync_buffers.
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:
        return ddp(module, forward_sync_buffers=False)
    return ddp(module, broadcast_buffers=False)


# ----------------------------------------------------------------------------- modes


def train(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    syncbn = import_syncbn(args.threads)
    launcher = syncbn.comm.detect_launcher().name
    comm = resolve_comm(args.comm, launcher)
    rank, world_size = setup_distributed(launcher)
    distributed = dist.is_initialized()
    say = print if rank == 0 else (lambda *a, **k: None)

    x_train, y_train, x_test, y_test = load_data()
    torch.manual_seed(args.seed)
    plain = build_model()
    # --check: an untouched copy of the plain network, with its own optimizer
    replica: Optional[tuple[nn.Module, torch.optim.Optimizer]] = None
    if args.check and rank == 0:
        reference = copy.deepcopy(plain)
        replica = (reference, make_optimizer(reference, args.lr))
    core = syncbn.convert_sync_batchnorm(plain, process_group=comm)
    model: nn.Module = wrap_ddp(core) if distributed else core
    optimizer = make_optimizer(model, args.lr)
    # the communicator the layers resolved to (every rank takes part in resolving it)
    comm = next(m for m in core.modules() if isinstance(m, syncbn.SyncBatchNorm)).communicator.name

    say(f"launcher={launcher} world_size={world_size} comm={comm} batch={world_size}x{args.batch_size} "
        f"train={len(y_train)} held_out={len(y_test)} threads={args.threads}", flush=True)
    b = args.batch_size
    mine = slice(rank * b, (rank + 1) * b)
    correct = count_correct(core, x_test, y_test) if rank == 0 else 0
    for epoch in range(1, args.epochs + 1):
        batches = global_batches(len(y_train), world_size * b, args.seed, epoch)
        if args.max_steps is not None:
            batches = batches[: args.max_steps]
        losses = torch.zeros(len(batches), dtype=torch.float64)
        ref_losses = torch.zeros(len(batches), dtype=torch.float64)
        model.train()
        tic = time.perf_counter()
        for step, idx in enumerate(tqdm(batches, desc=f"epoch {epoch}", disable=rank != 0 or args.no_progress,
                                        leave=False, dynamic_ncols=True)):
            losses[step] = sgd_step(model, optimizer, x_train[idx[mine]], y_train[idx[mine]])
            if replica is not None:  # the same step on the whole global batch
                ref_losses[step] = sgd_step(*replica, x_train[idx], y_train[idx])
        elapsed = time.perf_counter() - tic
        if distributed:  # per-step global loss = mean of the ranks' losses (equal shards)
            dist.all_reduce(losses)
            losses /= world_size
        if rank == 0:
            correct = count_correct(core, x_test, y_test)
            mean_loss = losses.mean().item() if len(losses) else float("nan")
            rate = len(batches) * world_size * b / elapsed if elapsed > 0 else float("nan")
            say(f"epoch {epoch}: loss={mean_loss:.3f} held-out accuracy={correct / len(y_test):.3f} "
                f"images/s={rate:.0f}" + (" (includes the --check replica)" if replica is not None else ""),
                flush=True)
            if replica is not None:
                gap = (losses - ref_losses).abs().max().item() if len(losses) else 0.0
                say(f"check: epoch {epoch} max |loss - reference| = {gap:.1e}", flush=True)

    trained = syncbn.revert_sync_batchnorm(core)  # plain BatchNorm2d: the checkpoint loads without syncbn
    if rank == 0:
        if replica is not None:
            ref_params = dict(replica[0].named_parameters())
            gap = max(((p - ref_params[n]).abs().max().item() for n, p in trained.named_parameters()), default=0.0)
            say(f"check: final max |param - reference| = {gap:.1e}", flush=True)
        if args.save is not None:
            state = trained.state_dict()
            build_model().load_state_dict(state)  # strict: fail here, not at load time, if keys differ
            args.save.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": state, "seed": args.seed, "world_size": world_size,
                        "held_out_correct": correct}, args.save)
            say(f"saved {args.save}", flush=True)
        say(f"final: accuracy={correct / len(y_test):.3f} correct={correct}/{len(y_test)} "
            f"world_size={world_size} comm={comm} launcher={launcher} wall={time.perf_counter() - start:.1f}s",
            flush=True)
    if distributed:
        dist.destroy_process_group()


def evaluate_checkpoint(args: argparse.Namespace) -> None:
    """Load a --save checkpoint into the plain-BatchNorm2d network; print held-out accuracy."""
    torch.set_num_threads(args.threads)
    checkpoint: dict[str, Any] = torch.load(args.load, map_location="cpu", weights_only=True)
    model = build_model()
    model.load_state_dict(checkpoint["model"])
    _, _, x_test, y_test = load_data()
    correct = count_correct(model, x_test, y_test)
    print(f"eval: accuracy={correct / len(y_test):.3f} correct={correct}/{len(y_test)} checkpoint={args.load}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.eval_only:
        evaluate_checkpoint(args)
        return
    try:
        train(args)
    except Exception:
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            # Under a plain `mpirun python train.py`, the other ranks would wait
            # in their next collective forever: take the whole job down.
            traceback.print_exc()
            sys.stderr.flush()
            mpi.COMM_WORLD.Abort(1)
        raise


if __name__ == "__main__":
    main()
    from syncbn.comm import detect_launcher  # (importable: main() put syncbn on the path if needed)

    if detect_launcher().name != "none":
        # A launched rank leaves as the benchmark workers do (see _jobs.exit_worker):
        # torch's gloo threads outlive destroy_process_group() and may still be
        # handing the last collective's tensors back to Python while the
        # interpreter finishes, which now and then aborts the rank after a
        # successful run ("terminate called without an active exception").
        from _jobs import exit_worker

        exit_worker()
