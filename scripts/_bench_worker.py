#!/usr/bin/env python
"""Timing machinery of ``scripts/bench.py``, and its worker under ``mpiexec`` / ``torchrun``.

``bench.py`` imports this module for the one-process part and launches it
as the worker of the two-process parts::

    mpiexec -n 2 python -m mpi4py scripts/_bench_worker.py --setting mpirun --result R.json
    torchrun --standalone --nproc_per_node 2 scripts/_bench_worker.py --setting torchrun --result R.json

Timing scheme (the same in every setting): per shape, every peer is warmed
up, then timed in rounds; each round times one block of ``n`` steps per
peer, in an order rotated every round, so slow drifts of a shared machine
hit every peer alike. A block starts after a barrier and its time is the
slowest rank's (a data-parallel step is as slow as its slowest rank). The
reported figure is the median over rounds of the per-step time.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

try:
    import syncbn
except ModuleNotFoundError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import syncbn

from _jobs import exit_worker

class Shape(NamedTuple):
    key: str
    dims: tuple[int, ...]
    channels_last: bool = False


SHAPES: tuple[Shape, ...] = (
    Shape("2x64x56x56", (2, 64, 56, 56)),
    Shape("8x256x14x14", (8, 256, 14, 14)),
    Shape("2x512x7x7", (2, 512, 7, 7)),
    Shape("32x64x32x32", (32, 64, 32, 32)),
    Shape("8x256x14x14 CL", (8, 256, 14, 14), channels_last=True),
    Shape("256x1024", (256, 1024)),
)

# Peers in every setting; 1 process adds syncbn and torch with 2 threads,
# torchrun adds syncbn over plain torch.distributed (process_group="torch": gloo),
# next to syncbn's default there (shared memory when the ranks share a host).
PEERS = ("torch", "fairscale", "syncbn")
GLOO_PEER = "syncbn_gloo"
# A peer name ending in LAYER_ONLY times layer_step instead of train_step.
LAYER_ONLY = "/layer"


def make_batch(shape: Shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ``x`` (requires grad, as the output of a conv would) and the fixed ``g``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.dims, generator=gen) * 2.0 + 0.5
    g = torch.randn(shape.dims, generator=gen)
    if shape.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), g


def make_layer(peer: str, shape: Shape, comm: Optional[str]) -> Optional[torch.nn.Module]:
    """The layer of ``peer`` for ``shape``, or None where it does not apply or is not installed (n/a).

    ``comm`` is syncbn's ``process_group``. fairscale's layer synchronizes only
    when torch.distributed is initialized (otherwise it silently falls back to
    plain BatchNorm2d), so the caller must have initialized it.
    """
    C = shape.dims[1]
    name = peer.split("@")[0].removesuffix(LAYER_ONLY)
    if name == "floor":
        return torch.nn.Identity()  # the step without a normalization layer: a lower bound
    if name == "torch":
        return torch.nn.BatchNorm2d(C) if len(shape.dims) == 4 else torch.nn.BatchNorm1d(C)
    if name == "syncbn":
        return syncbn.SyncBatchNorm(C, process_group=comm)
    if name == GLOO_PEER:
        return syncbn.SyncBatchNorm(C, process_group="torch")
    if name == "fairscale":
        if len(shape.dims) != 4:
            return None  # a BatchNorm2d subclass: 4-D input only
        if not dist.is_initialized():
            raise RuntimeError("fairscale's SyncBatchNorm needs torch.distributed initialized")
        cls = _fairscale_sync_bn()
        return None if cls is None else cls(C)
    raise ValueError(f"unknown peer {peer!r}")


def _fairscale_sync_bn() -> Optional[type]:
    """fairscale's layer, or None (reported as n/a) if fairscale is not installed."""
    with warnings.catch_warnings():  # its package __init__ warns about CUDA amp decorators
        warnings.simplefilter("ignore", FutureWarning)
        try:
            from fairscale.experimental.nn import SyncBatchNorm
        except ImportError:
            return None
    # its backward warns on every call (a deprecated resize_as)
    warnings.filterwarnings("ignore", message="non-inplace resize_as is deprecated")
    return SyncBatchNorm


def peer_threads(peer: str) -> int:
    """``"syncbn@2t"`` -> 2; a plain name -> 1."""
    return int(peer.split("@")[1].rstrip("t")) if "@" in peer else 1


def train_step(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    """One step: forward, backward of ``(y * g).sum()``; gradients set to None first."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    (layer(x) * g).sum().backward()


def layer_step(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    """The layer alone: forward, and backward with ``g`` as the output's gradient.

    The same gradients as :func:`train_step` (the gradient of ``(y * g).sum()``
    with respect to ``y`` is ``g``) without the loss's own two full-size
    passes, as for a layer inside a network, where the loss is computed once.
    """
    x.grad = None
    layer.zero_grad(set_to_none=True)
    layer(x).backward(g)


# ----------------------------------------------------------------------------- synchronization


class Sync:
    """Barrier and max-reduce across the ranks of a setting (no-ops in one process)."""

    rank = 0
    size = 1

    def barrier(self) -> None:
        pass

    def max(self, values: list[float]) -> list[float]:
        return values


class MPISync(Sync):
    def __init__(self) -> None:
        from mpi4py import MPI

        self._comm, self._max, self._in_place = MPI.COMM_WORLD, MPI.MAX, MPI.IN_PLACE
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()

    def barrier(self) -> None:
        self._comm.Barrier()

    def max(self, values: list[float]) -> list[float]:
        buf = np.asarray(values, dtype=np.float64)
        self._comm.Allreduce(self._in_place, buf, op=self._max)
        return buf.tolist()


class TorchSync(Sync):
    def __init__(self) -> None:
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def barrier(self) -> None:
        dist.barrier()

    def max(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()


# ----------------------------------------------------------------------------- timing


class Budget(NamedTuple):
    rounds: int
    block_s: float      # target duration of one timed block
    warmup: int         # untimed steps before calibration (at least 1)
    max_steps: int = 1000


def time_round_robin(
    fns: dict[str, Callable[[], None]],
    threads: dict[str, int],
    budget: Budget,
    sync: Sync,
) -> dict[str, dict[str, Any]]:
    """Per-step seconds of each callable: ``{name: {"median_s", "samples_s", "steps"}}``.

    ``steps``: calls made in all, warm-up included.

    Every rank must call this with the same names in the same order.
    """
    names = list(fns)
    # Warm up, then size the blocks from the slowest rank's fastest warm-up step.
    est: list[float] = []
    for name in names:
        torch.set_num_threads(threads[name])
        best = math.inf
        for _ in range(budget.warmup):
            t0 = time.perf_counter()
            fns[name]()
            best = min(best, time.perf_counter() - t0)
        est.append(best)
    torch.set_num_threads(1)
    # Collect once and move the survivors out of the collector's sight, so the
    # automatic collections left between blocks are short (a full one in a
    # process that imported torch takes a good fraction of a second).
    gc.collect()
    gc.freeze()
    def block_steps(per_step: float) -> int:
        return max(1, min(budget.max_steps, round(budget.block_s / max(per_step, 1e-7))))

    # Block sizes follow the latest round (a warm-up step can be far off on a
    # busy machine); the times are the slowest rank's, so every rank agrees.
    steps = {n: block_steps(e) for n, e in zip(names, sync.max(est))}
    samples: dict[str, list[float]] = {n: [] for n in names}
    total_steps = {n: budget.warmup for n in names}
    for r in range(budget.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        elapsed = []
        for name in order:
            fn, n = fns[name], steps[name]
            torch.set_num_threads(threads[name])
            gc.disable()
            sync.barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            elapsed.append((time.perf_counter() - t0) / n)
            gc.enable()
        torch.set_num_threads(1)
        for name, t in zip(order, sync.max(elapsed)):
            samples[name].append(t)
            total_steps[name] += steps[name]
            steps[name] = block_steps(t)
    return {n: {"median_s": _median(samples[n]), "samples_s": samples[n], "steps": total_steps[n]} for n in names}


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    k = len(s) // 2
    return s[k] if len(s) % 2 else 0.5 * (s[k - 1] + s[k])


def bench_steps(
    peers: Sequence[str],
    comm: Optional[str],
    budget: Budget,
    sync: Sync,
    progress: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Step times of every peer on every shape: ``{shape: {peer: result or None (n/a)}}``."""
    out: dict[str, dict[str, Any]] = {}
    for i, shape in enumerate(SHAPES):
        x, g = make_batch(shape, seed=sync.rank)
        layers = {p: make_layer(p, shape, comm) for p in peers}
        fns = {p: (lambda m=m, step=layer_step if p.endswith(LAYER_ONLY) else train_step: step(m, x, g))
               for p, m in layers.items() if m is not None}
        res: dict[str, Any] = dict(time_round_robin(fns, {p: peer_threads(p) for p in fns}, budget, sync))
        for p, m in layers.items():
            if m is None:
                res[p] = None
            elif isinstance(m, syncbn.SyncBatchNorm):
                # collectives per step, from the communicator's own counter
                res[p]["collectives_per_step"] = m.communicator.calls / res[p]["steps"]
        out[shape.key] = {p: res[p] for p in peers}
        progress(f"shape {i + 1}/{len(SHAPES)} {shape.key}: " + ", ".join(
            f"{p} {res[p]['median_s'] * 1e3:.3f} ms" if res[p] else f"{p} n/a" for p in peers))
    return out


# ----------------------------------------------------------------------------- worker entry point


def worker_main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="bench.py's worker under mpiexec / torchrun")
    p.add_argument("--setting", choices=["mpirun", "torchrun"], required=True)
    p.add_argument("--result", type=Path, required=True, help="rank 0 writes its JSON here")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--block-s", type=float, required=True)
    p.add_argument("--warmup", type=int, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    wall = time.perf_counter()
    if args.setting == "mpirun":
        from syncbn.launch import init_process_group_from_mpi

        sync: Sync = MPISync()
        init_process_group_from_mpi("gloo")  # for fairscale, which speaks torch.distributed only
        comm = "mpi"
    else:
        dist.init_process_group("gloo")
        sync = TorchSync()
        comm = None  # syncbn's default under torch.distributed
    peers = PEERS + ((GLOO_PEER,) if args.setting == "torchrun" else ())
    say = (lambda s: print(f"[{args.setting} {sync.size}p] {s}", file=sys.stderr, flush=True)) \
        if sync.rank == 0 else (lambda s: None)
    say(f"started: world size {sync.size}, syncbn over {comm!r}, {args.rounds} rounds")
    budget = Budget(args.rounds, args.block_s, max(args.warmup, 1))
    results = bench_steps(peers, comm, budget, sync, say)
    if sync.rank == 0:
        doc = {"status": "ok", "world_size": sync.size, "comm": comm, "peers": list(peers), "steps": results,
               "wall_s": time.perf_counter() - wall}
        args.result.write_text(json.dumps(doc))
    sync.barrier()
    dist.destroy_process_group()
    exit_worker()


if __name__ == "__main__":
    worker_main()
