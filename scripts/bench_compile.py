"""Training step of a small ResNet-like network, eager and ``torch.compile(fullgraph=True)``,
with syncbn's SyncBatchNorm and with torch's BatchNorm2d, in one process.

    python scripts/bench_compile.py [--rounds 15] [--steps 20]

Contenders run interleaved in rounds (shuffled order), each round timing
``--steps`` training steps (forward, cross-entropy, backward, SGD) in thread
CPU time with one torch thread; the table gives the median per step. The
compiled syncbn contender appears twice (the same compiled model in two
slots): that A/A pair shows the run's noise.
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import syncbn


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def resnet_like(c: int = 16, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                         Block(c), Block(c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c, classes))


Step = Callable[[], None]


def make_step(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
              x: torch.Tensor, target: torch.Tensor) -> Step:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        loss = F.cross_entropy(forward(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = resnet_like()
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 10, (args.batch,))
    steps: dict[str, Step] = {}
    compile_seconds: dict[str, float] = {}
    for bn in ("torch BN", "syncbn"):
        for compiled in (False, True):
            model = copy.deepcopy(base)
            if bn == "syncbn":
                model = syncbn.convert_sync_batchnorm(model, process_group="local")
            forward: Callable[[torch.Tensor], torch.Tensor] = (
                torch.compile(model, fullgraph=True) if compiled else model)
            name = f"{bn} {'compiled' if compiled else 'eager'}"
            steps[name] = make_step(model, forward, x, target)
            start = time.perf_counter()
            for _ in range(3):  # compiles, then warms up
                steps[name]()
            compile_seconds[name] = time.perf_counter() - start
    steps["syncbn compiled (A/A)"] = steps["syncbn compiled"]
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        order = list(steps)
        random.shuffle(order)
        for name in order:
            start = time.thread_time()
            for _ in range(args.steps):
                steps[name]()
            times[name].append((time.thread_time() - start) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    ref = median["torch BN eager"]
    print(f"input {tuple(x.shape)}, {args.rounds} rounds x {args.steps} steps, 1 thread, "
          f"thread CPU time per training step (median)")
    print(f"{'contender':24s} {'ms/step':>8s} {'vs torch BN eager':>18s} {'first 3 steps (s)':>18s}")
    for name, m in median.items():
        first = compile_seconds.get(name)
        print(f"{name:24s} {m * 1e3:8.3f} {m / ref:17.2f}x {'' if first is None else f'{first:18.1f}'}")
    aa = median["syncbn compiled (A/A)"] / median["syncbn compiled"]
    print(f"A/A (syncbn compiled twice): {aa:.3f}"
          + ("  -- too noisy to judge differences of a few percent" if abs(aa - 1) > 0.03 else ""))


if __name__ == "__main__":
    main()
