"""Benchmark of the compiled kernels against torch on the same tensors.

Each kernel is timed beside ``torch.sum(x)`` (a pass over the same memory
with float32 arithmetic: the floor for a reduction) and beside batch norm in
torch (``F.batch_norm(x, None, None, training=True)``, and its backward to
the input): local_stats + normalize against the forward, backward_reduce +
backward_input against the backward. All of a shape's functions run in
interleaved rounds, so a neighbour's load hits them alike, and the table
shows medians over the rounds and the ratios of those medians.

One process's backward is one call, local_backward (the reduction and the
input gradient channel by channel); it is timed beside the operator torch's
batch-norm backward node runs, ``native_batch_norm_backward`` (input,
weight and bias gradients): the arithmetic alone on both sides, without
autograd.

Targets (1 thread): local_stats within 1.5x of torch.sum, and local_stats +
normalize at least 3x faster than the torch forward.

A synchronized forward must read x twice (the statistics are global before
any output can be written) and write y once, so ``torch.sum(x)`` plus
``y.copy_(x)`` (one read pass, one read-and-write pass, no arithmetic) is
the floor of any such forward on this machine; the "bound" column is the
torch forward divided by that floor: the most any two-pass forward could
reach here, next to what the kernels reach.

    python scripts/bench_kernels.py [--repeats 21] [--threads 1,2] [--clock wall]

On a machine shared with other work, ``--clock thread`` times 1-thread runs
with the CPU time of this thread, which other processes taking the core do
not inflate (it cannot time several threads: use wall then).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from syncbn import _kernels as K

# (label, shape, layout): layout "cf" is (N, C, L), "cl" a channels-last
# tensor's rows (N*H*W, C), "2d" a plain (M, C) input
CASES = [
    ("2x64x56x56", (2, 64, 56, 56), "cf"),
    ("8x256x14x14", (8, 256, 14, 14), "cf"),
    ("2x512x7x7", (2, 512, 7, 7), "cf"),
    ("32x64x32x32", (32, 64, 32, 32), "cf"),
    ("8x256x14x14 channels-last", (8, 256, 14, 14), "cl"),
    ("256x1024", (256, 1024), "2d"),
]
# small layers of the networks of scripts/bench_net.py: timed, not held to the targets
SMALL_CASES = [
    ("8x16x32x32", (8, 16, 32, 32), "cf"),
    ("8x64x8x8", (8, 64, 8, 8), "cf"),
    ("8x1280x4x4", (8, 1280, 4, 4), "cf"),
]

BLOCK_SECONDS = 0.002   # each function runs this long per round, at least once


def kernel_view(t: torch.Tensor, layout: str) -> np.ndarray:
    """The kernels' view of t, without a copy."""
    C = t.shape[1]
    if layout == "cl":
        v = t.permute(0, 2, 3, 1).numpy().reshape(-1, C)
    elif layout == "2d":
        v = t.numpy()
    else:
        v = t.numpy().reshape(t.shape[0], C, -1)
    assert np.shares_memory(v, t.numpy()), "the kernel view must not be a copy"
    return v


def make_tensor(shape: tuple[int, ...], layout: str, gen: torch.Generator) -> torch.Tensor:
    t = torch.randn(*shape, generator=gen)
    return t.contiguous(memory_format=torch.channels_last) if layout == "cl" else t


def functions(shape: tuple[int, ...], layout: str, nt: int) -> dict[str, Callable[[], object]]:
    """Every timed call on one shape; the kernels get nt threads."""
    gen = torch.Generator().manual_seed(0)
    x, dy = make_tensor(shape, layout, gen), make_tensor(shape, layout, gen)
    xv, dyv = kernel_view(x, layout), kernel_view(dy, layout)
    C = shape[1]
    shift = np.zeros(C)
    stats = np.empty(2 * C + 1)
    K.local_stats(xv, shift, stats, nt)
    n = stats[2 * C]
    mean = stats[:C] / n
    invstd = 1.0 / np.sqrt(np.maximum(stats[C:2 * C] / n - mean ** 2, 0.0) + 1e-5)
    weight, bias = np.ones(C), np.zeros(C)
    y, dx = np.empty_like(xv), np.empty_like(xv)
    # the kernels' views of x and y: both C-contiguous, so copy_ is a plain copy
    xt, yc = torch.from_numpy(xv), torch.from_numpy(y)
    sums = np.empty(2 * C)
    K.backward_reduce(dyv, xv, mean, sums, nt)
    mean_dy, mean_dy_xmu = sums[:C] / n, sums[C:] / n

    grad_weight, grad_bias = np.empty(C), np.empty(C)
    weight_t = torch.ones(C)
    mean_t, invstd_t = torch.from_numpy(mean).float(), torch.from_numpy(invstd).float()
    xg = x.clone().requires_grad_(True)
    yg = F.batch_norm(xg, None, None, training=True)
    return {
        "torch.sum": lambda: torch.sum(x),
        "copy": lambda: yc.copy_(xt),
        "bn fwd": lambda: F.batch_norm(x, None, None, training=True),
        "bn bwd": lambda: torch.autograd.grad(yg, xg, dy, retain_graph=True),
        "local_stats": lambda: K.local_stats(xv, shift, stats, nt),
        "normalize": lambda: K.normalize(xv, mean, invstd, weight, bias, y, nt),
        "backward_reduce": lambda: K.backward_reduce(dyv, xv, mean, sums, nt),
        "backward_input": lambda: K.backward_input(dyv, xv, mean, invstd, weight, mean_dy,
                                                   mean_dy_xmu, dx, nt),
        "native bwd": lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, weight_t, None, None, mean_t, invstd_t, True, 1e-5, [True, True, True]),
        "local_backward": lambda: K.local_backward(dyv, xv, mean, invstd, weight, dx, grad_weight,
                                                   grad_bias, nt),
    }


def measure(fns: dict[str, Callable[[], object]], repeats: int,
            clock: Callable[[], float]) -> dict[str, float]:
    """Median seconds per call of each function over interleaved rounds."""
    inner = {}
    for name, f in fns.items():
        for _ in range(3):   # warm up: caches, thread pools, allocator
            f()
        t0 = time.perf_counter()
        f()
        dt = time.perf_counter() - t0
        inner[name] = max(1, int(BLOCK_SECONDS / max(dt, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = clock()
            for _ in range(inner[name]):
                f()
            samples[name].append((clock() - t0) / inner[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=21,
                    help="interleaved rounds per shape (default 21); the table shows medians")
    ap.add_argument("--threads", default="1,2",
                    help="comma-separated thread counts, for torch and the kernels alike "
                         "(default 1,2)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="wall: time.perf_counter (default); thread: time.thread_time, "
                         "this thread's CPU time, for 1-thread runs on a busy machine")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.clock == "thread" and threads != [1]:
        ap.error("--clock thread times one thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("# syncbn kernels vs torch, float32\n")
    print(f"{cpu_name()}, {os.cpu_count()} logical CPUs, load average {load:.2f}; "
          f"torch {torch.__version__}, numpy {np.__version__}, "
          f"kernels with OpenMP: {K.openmp_enabled()}; {args.repeats} rounds, medians, "
          f"{args.clock} clock.\n")
    print("Times in microseconds per call. Ratios: x / torch.sum (lower is better, "
          "target <= 1.5 for local_stats); speed-up = torch time / kernels' time "
          "(higher is better, target >= 3 for the forward).\n")
    print(row(["shape", "thr", "torch.sum", "copy", "local_stats", "stats / sum", "normalize",
               "bn fwd", "fwd speed-up", "bound", "backward_reduce", "backward_input",
               "bn bwd", "bwd speed-up", "local_backward", "native bwd", "local / native"]))
    print(row(["---"] + ["---:"] * 16))
    verdicts = []
    for nt in threads:
        torch.set_num_threads(nt)
        for label, shape, layout in CASES + SMALL_CASES:
            t = measure(functions(shape, layout, nt), args.repeats, clock)
            stats_ratio = t["local_stats"] / t["torch.sum"]
            fwd = t["bn fwd"] / (t["local_stats"] + t["normalize"])
            bwd = t["bn bwd"] / (t["backward_reduce"] + t["backward_input"])
            bound = t["bn fwd"] / (t["torch.sum"] + t["copy"])
            print(row([label, nt, us(t["torch.sum"]), us(t["copy"]), us(t["local_stats"]),
                       f"{stats_ratio:.2f}", us(t["normalize"]), us(t["bn fwd"]),
                       f"{fwd:.1f}x", f"{bound:.1f}x", us(t["backward_reduce"]),
                       us(t["backward_input"]), us(t["bn bwd"]), f"{bwd:.1f}x", us(t["local_backward"]),
                       us(t["native bwd"]), f"{t['local_backward'] / t['native bwd']:.2f}"]), flush=True)
            if nt == 1 and (label, shape, layout) in CASES:
                verdicts.append((label, stats_ratio, fwd, bound))
    if verdicts:
        print("\n## Targets (1 thread)\n")
        print(row(["shape", "local_stats / torch.sum <= 1.5", "forward speed-up >= 3",
                   "bound (torch.sum + copy floor)"]))
        print(row(["---", "---", "---", "---"]))
        for label, ratio, fwd, bound in verdicts:
            print(row([label, f"{ratio:.2f} {'PASS' if ratio <= 1.5 else 'MISS'}",
                       f"{fwd:.1f}x {'PASS' if fwd >= 3 else 'MISS'}", f"{bound:.1f}x"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
