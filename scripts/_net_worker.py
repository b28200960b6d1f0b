"""The process side of ``scripts/bench_net.py``: times whole training steps (or single layers).

``bench_net.py`` starts this file in every setting, so every setting runs in
an environment it chose (glibc's default allocator for the headline)::

    python scripts/_net_worker.py --launcher local ...
    mpiexec -n 2 --oversubscribe python -m mpi4py scripts/_net_worker.py --launcher mpirun ...
    torchrun --standalone --nproc_per_node 2 scripts/_net_worker.py --launcher torchrun ...

Training step: ``zero_grad``, forward, cross-entropy on random labels,
backward, ``SGD.step`` (lr 0.01, momentum 0.9). With more than one process
every contender is wrapped in ``DistributedDataParallel`` (gloo). Timing:
after warm-up steps, rounds; round r times one step of every contender, in
an order rotated every round, each step starting after a barrier. A step's
time is the slowest rank's (one MAX allreduce of all the samples at the
end). Clock: thread CPU time in one process with one thread (what other work
on the machine does not inflate), else wall time. Each step's page faults
(``getrusage``, the process's, outside the timed span) are reduced the same
way: the most any rank took. Rank 0 writes the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

try:
    import syncbn
except ModuleNotFoundError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import syncbn

from syncbn import _kernels  # (after the import above found the checkout)
from syncbn.comm import LocalCommunicator
from _jobs import exit_worker
from _net_modes import EXPECTED_FUSED, MODES, LockstepBatchNorm2d, build_contenders, count_fused
from networks import NETWORKS

LEARNING_RATE = 0.01
MOMENTUM = 0.9
# the per-layer benchmark: shapes of batch norms in the networks above
LAYER_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (8, 16, 32, 32), (8, 32, 16, 16), (8, 64, 8, 8), (8, 96, 8, 8), (8, 1280, 4, 4), (2, 64, 56, 56))
LAYER_CONTENDERS = ("torch", "torch (A/A)", "floor", "syncbn", "empty Function", "kernels alone")
# --cold: between timed calls, a convolution of the size the networks run
# (8 images of 32 channels at 32x32), as a network's layer finds the caches
EVICTING_CONV = (32, 8, 32)  # channels, images, height = width


class Clock(NamedTuple):
    """A clock in nanoseconds and its name in the report."""

    name: str
    ns: Callable[[], int]


THREAD_CPU = Clock("thread CPU time (time.thread_time_ns)", time.thread_time_ns)
WALL = Clock("wall time (time.perf_counter_ns)", time.perf_counter_ns)


def choose_clock(world_size: int, threads: int) -> Clock:
    return THREAD_CPU if world_size == 1 and threads == 1 else WALL


class Group(NamedTuple):
    """This process in the job: its rank and the job's size (torch.distributed is up)."""

    rank: int
    size: int

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def slowest(self, samples: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over the ranks (float64 tensor, in place)."""
        if self.size > 1:
            dist.all_reduce(samples, op=dist.ReduceOp.MAX)
        return samples


@contextlib.contextmanager
def process_group(launcher: str) -> Iterator[Group]:
    """torch.distributed's default group for ``launcher``; in one process a 1-rank gloo group
    (fairscale's layer synchronizes only when torch.distributed is up)."""
    with tempfile.TemporaryDirectory() as tmp:
        if launcher == "mpirun":
            syncbn.init_process_group_from_mpi("gloo")
        elif launcher == "torchrun":
            dist.init_process_group("gloo")
        else:
            dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            yield Group(dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()


def page_faults() -> int:
    """Page faults this process has taken so far (minor ones: memory the allocator
    took back from the system and writes for the first time; major ones need I/O)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), labels).backward()
    optimizer.step()


def _say(group: Group, prefix: str) -> Callable[[str], None]:
    def say(line: str) -> None:
        if group.rank == 0:
            print(f"[{prefix}] {line}", file=sys.stderr, flush=True)
    return say


class Prepared(NamedTuple):
    """The contenders of one network, built and ready to step."""

    batch: int
    steps: dict[str, Callable[[], None]]  # one training step of each contender that runs
    models: dict[str, nn.Module]
    fused: dict[str, int]  # syncbn fused: how many of the network's batch norms fused
    skipped: list[str]  # contenders not installed


def prepare(network: str, modes: Sequence[str], batch: Optional[int], channels_last: bool, group: Group,
            say: Callable[[str], None], compile: bool = False) -> Prepared:
    """Every contender of ``modes`` on ``network``, from the same initial weights, with its optimizer
    and this rank's batch."""
    spec = NETWORKS[network]
    batch = spec.batch if batch is None else batch
    torch.manual_seed(0)  # the same initial weights on every rank and for every contender
    base = spec.build(spec.num_classes)
    built = build_contenders(base, list(modes))
    skipped = [m for m, model in built.items() if model is None]
    models: dict[str, nn.Module] = {m: model for m, model in built.items() if model is not None}
    if skipped:
        say(f"{network}: skipped (not installed): {', '.join(skipped)}")
    fused = {m: count_fused(model) for m, model in models.items() if m == "syncbn fused"}
    for m, n in fused.items():
        expected = EXPECTED_FUSED.get(network)
        say(f"{network}: {m}: {n} of {spec.batchnorms} batch norms fused"
            + ("" if n == expected else f", EXPECTED {expected}"))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(1000 + group.rank)  # each rank its own shard
    x = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=gen).contiguous(
        memory_format=memory_format)
    labels = torch.randint(0, spec.num_classes, (batch,), generator=gen)
    steps: dict[str, Callable[[], None]] = {}
    for name, model in models.items():
        model = model.to(memory_format=memory_format).train()
        if compile:  # compiled first, then wrapped, as DDP(torch.compile(model))
            model = torch.compile(model)  # type: ignore[assignment]
        if group.size > 1:
            model = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        steps[name] = lambda model=model, optimizer=optimizer: train_step(model, optimizer, x, labels)
    return Prepared(batch, steps, models, fused, skipped)


def contender_entry(samples_s: list[float], faults: list[float], batch: int, processes: int,
                    collectives_per_step: Optional[float], fused_batchnorms: Optional[int]) -> dict[str, Any]:
    """One contender's results: the median step and its samples, images per second, the median of its
    steps' page faults, and where they apply, its collectives per step and its fused batch norms."""
    median = statistics.median(samples_s)
    entry: dict[str, Any] = {"median_s": median, "samples_s": samples_s,
                             "images_per_s": batch * processes / median,
                             "page_faults_per_step": statistics.median(faults)}
    if collectives_per_step is not None:
        entry["collectives_per_step"] = collectives_per_step
    if fused_batchnorms is not None:
        entry["fused_batchnorms"] = fused_batchnorms
    return entry


def time_network(network: str, modes: Sequence[str], batch: Optional[int], channels_last: bool, rounds: int,
                 warmup: int, clock: Clock, group: Group, say: Callable[[str], None],
                 compile: bool = False) -> dict[str, Any]:
    """Per-step times of every contender on ``network``, all in this process: medians and samples,
    the slowest rank's; and the median of its steps' page faults."""
    spec = NETWORKS[network]
    prepared = prepare(network, modes, batch, channels_last, group, say, compile)
    steps = prepared.steps
    names = list(steps)
    calls_before = _collectives(prepared.models)
    t0 = time.perf_counter()
    for _ in range(warmup):
        for name in names:
            group.barrier()
            steps[name]()
    warm_s = time.perf_counter() - t0
    say(f"{network}: batch {prepared.batch}/process, {len(names)} contenders, warm-up {warmup} steps each in "
        f"{warm_s:.1f} s; {rounds} rounds, about {warm_s / max(warmup, 1) * rounds:.0f} s")
    # [0]: each step's seconds; [1]: the page faults the process took in it
    measured = torch.zeros(2, len(names), rounds, dtype=torch.float64)
    report_every = max(1, rounds // 5)
    for r in range(rounds):
        for k in range(len(names)):
            i = (r + k) % len(names)
            group.barrier()
            faults = page_faults()
            start = clock.ns()
            steps[names[i]]()
            measured[0, i, r] = (clock.ns() - start) * 1e-9
            measured[1, i, r] = page_faults() - faults
        if (r + 1) % report_every == 0 or r + 1 == rounds:
            say(f"{network}: round {r + 1}/{rounds}")
    samples, faults_per_step = group.slowest(measured)
    calls = _collectives(prepared.models)
    out: dict[str, Any] = {"batch": prepared.batch, "image_size": spec.image_size,
                           "batchnorms": spec.batchnorms, "contenders": {}}
    for i, name in enumerate(names):
        collectives = (calls[name] - calls_before.get(name, 0)) / (warmup + rounds) if name in calls else None
        out["contenders"][name] = contender_entry(samples[i].tolist(), faults_per_step[i].tolist(),
                                                  prepared.batch, group.size, collectives,
                                                  prepared.fused.get(name))
    for name in prepared.skipped:
        out["contenders"][name] = None
    say(f"{network}: " + ", ".join(
        f"{n} {out['contenders'][n]['median_s'] * 1e3:.1f} ms" for n in names))
    return out


# --launcher separate: each contender in processes of its own (--copies), as a
# user runs one network in a process, so each process's allocator serves one
# contender alone. This process starts them and gives each a turn at a time
# (--lead-steps untimed steps, then a timed one), in rounds as above: only
# one process computes at a time.

SERVE_READY = "ready"
SERVE_STEP = "step"
SERVE_END = "end"


def _reply(mode: str, process: subprocess.Popen[str], awaited: str) -> str:
    """The next line the process of contender ``mode`` writes; RuntimeError if it ended instead
    (``awaited``: what it was doing, for the message)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"the process of contender {mode!r} ended (exit status {process.wait()}) "
                           f"{awaited}; its stderr is above")
    return line


class Served(NamedTuple):
    """A contender in a process of its own (``--serve``), and what it said when it was ready."""

    mode: str
    process: subprocess.Popen[str]
    ready: dict[str, Any]

    def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # (it ended: _reply says so)
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        return _reply(self.mode, self.process, f"when asked to {command!r}")


def serve(args: argparse.Namespace) -> None:
    """``--serve``: build one contender (``--modes``, one) of one network and, each time the
    coordinator writes ``step`` on stdin, take ``--lead-steps`` untimed training steps and one
    timed one, answering ``seconds faults`` of the timed step."""
    if len(args.modes) != 1 or len(args.networks) != 1:
        raise SystemExit("--serve: expected one --modes and one --networks "
                         f"(got {args.modes}, {args.networks})")
    with process_group("local") as group:
        say = _say(group, args.label)
        prepared = prepare(args.networks[0], args.modes, args.batch, args.channels_last, group, say,
                           args.compile)
        clock = choose_clock(1, args.threads)
        calls_before = _collectives(prepared.models)
        step = next(iter(prepared.steps.values()), None)  # None: the contender is not installed
        if step is not None:
            for _ in range(args.warmup):
                step()
        print(json.dumps({"status": SERVE_READY, "batch": prepared.batch, "skipped": prepared.skipped,
                          "fused": prepared.fused}), flush=True)
        if step is None:
            return
        taken = args.warmup
        for command in sys.stdin:
            if command.strip() != SERVE_STEP:
                break
            for _ in range(args.lead_steps):
                step()
            faults = page_faults()
            start = clock.ns()
            step()
            seconds = (clock.ns() - start) * 1e-9
            print(f"{seconds!r} {page_faults() - faults}", flush=True)
            taken += 1 + args.lead_steps
        calls = _collectives(prepared.models)
        per_step = {m: (calls[m] - calls_before.get(m, 0)) / taken for m in calls}
        print(json.dumps({"status": SERVE_END, "collectives_per_step": per_step}), flush=True)


def _serve_command(args: argparse.Namespace, network: str, mode: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--launcher", "local",
               "--label", f"{args.label} {mode}", "--result", os.devnull, "--networks", network,
               "--modes", mode, "--rounds", str(args.rounds), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--lead-steps", str(args.lead_steps)]
    if args.batch is not None:
        command += ["--batch", str(args.batch)]
    if args.channels_last:
        command.append("--channels-last")
    if args.compile:
        command.append("--compile")
    return command


def time_network_separately(network: str, args: argparse.Namespace,
                            say: Callable[[str], None]) -> dict[str, Any]:
    """As time_network, with each contender in ``args.copies`` processes of its own (started here,
    warmed up together, then given turns one at a time in rounds). A turn is ``args.lead_steps``
    untimed steps and a timed one: a user's steps follow steps of the same process, with its
    memory in the caches, where a process's first step after another's finds them cold.
    Processes differ in how their allocator's heap settles, and a step's time with it; a
    contender's figure is the median over the timed steps of all its processes."""
    spec = NETWORKS[network]
    started: list[subprocess.Popen[str]] = []
    try:
        started += [subprocess.Popen(_serve_command(args, network, mode), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True) for mode in args.modes * args.copies]
        served: list[Served] = []
        for mode, process in zip(args.modes * args.copies, started):
            served.append(Served(mode, process, json.loads(_reply(mode, process, "before it was ready"))))
        running = [s for s in served if not s.ready["skipped"]]
        say(f"{network}: {len(running)} processes built and warmed up ({args.warmup} steps each), "
            f"{args.copies} per contender; {args.rounds} rounds")
        samples: list[list[float]] = [[] for _ in running]  # of running[i], in order
        faults: list[list[float]] = [[] for _ in running]
        report_every = max(1, args.rounds // 5)
        for r in range(args.rounds):
            for k in range(len(running)):
                i = (r + k) % len(running)
                seconds, taken = running[i].ask(SERVE_STEP).split()
                samples[i].append(float(seconds))
                faults[i].append(float(taken))
            if (r + 1) % report_every == 0 or r + 1 == args.rounds:
                say(f"{network}: round {r + 1}/{args.rounds}")
        batch = served[0].ready["batch"]
        out: dict[str, Any] = {"batch": batch, "image_size": spec.image_size, "batchnorms": spec.batchnorms,
                               "contenders": {}}
        ended = [json.loads(s.ask(SERVE_END)) for s in running]
        for mode in args.modes:
            copies = [i for i, s in enumerate(running) if s.mode == mode]
            if not copies:
                say(f"{network}: skipped (not installed): {mode}")
                out["contenders"][mode] = None
                continue
            first = copies[0]
            entry = contender_entry([t for i in copies for t in samples[i]],
                                    [f for i in copies for f in faults[i]], batch, 1,
                                    ended[first]["collectives_per_step"].get(mode),
                                    running[first].ready["fused"].get(mode))
            entry["processes"] = [{"pid": running[i].process.pid, "median_s": statistics.median(samples[i]),
                                   "page_faults_per_step": statistics.median(faults[i])} for i in copies]
            out["contenders"][mode] = entry
        for s in running:
            s.process.wait()
        say(f"{network}: " + ", ".join(f"{m} {_ms_list(out['contenders'][m])}" for m in args.modes
                                       if out["contenders"][m] is not None))
        return out
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def _ms_list(entry: dict[str, Any]) -> str:
    """A contender's median step, and each of its processes' in brackets (milliseconds)."""
    each = ", ".join(f"{p['median_s'] * 1e3:.1f}" for p in entry["processes"])
    return f"{entry['median_s'] * 1e3:.1f} ms ({each})"


def _collectives(models: dict[str, nn.Module]) -> dict[str, int]:
    """Collectives issued so far through syncbn communicators, per contender (those that use one)."""
    out = {}
    for name, model in models.items():
        comms = {id(c): c for c in (_communicator_of(m) for m in model.modules()) if c is not None}
        if comms:
            out[name] = sum(c.calls for c in comms.values())
    return out


def _communicator_of(module: nn.Module) -> Optional[syncbn.Communicator]:
    if isinstance(module, syncbn.SyncBatchNorm):
        return module.communicator
    comm = getattr(module, "comm", None)
    return comm if isinstance(comm, syncbn.Communicator) else None


# ----------------------------------------------------------------------------- one layer alone


def _evictor() -> Callable[[], None]:
    """What --cold runs between timed calls: a convolution like the networks', which leaves the
    data and instruction caches and the branch predictors as a layer in a network finds them."""
    channels, images, size = EVICTING_CONV
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(images, channels, size, size)

    def evict() -> None:
        with torch.no_grad():
            conv(x)
    return evict


class _Empty(torch.autograd.Function):
    """What a batch norm written as a Python autograd.Function must do at least: allocate the
    output, and in the backward the three gradients; nothing is computed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        return torch.empty_like(grad), torch.empty_like(weight), torch.empty_like(weight)


# (as syncbn applies its Function: autograd's C++ apply, without the Python wrapper)
_APPLY_EMPTY = super(torch.autograd.Function, _Empty).apply  # type: ignore[misc]


class EmptyFunctionLayer(nn.Module):
    """The cheapest possible batch-norm layer written as a Python autograd.Function (a module
    with weight and bias whose Function computes nothing): the floor of syncbn's per-call cost
    before its kernels run."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _APPLY_EMPTY(x, self.weight, self.bias)
        return out


class KernelsAlone:
    """syncbn's compiled kernels of a 1-process training call alone: ``local_forward`` and
    ``local_backward`` (the whole computation of syncbn's forward and backward on a
    channels-first float32 input); no module, no autograd. The inputs and parameters are
    prepared once; the output and the input gradient are new arrays every call, as a layer's are
    (writing to memory just allocated costs more than to a buffer used again)."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor) -> None:
        N, C = x.shape[0], x.shape[1]
        self.x = x.detach().numpy().reshape(N, C, -1)
        self.g = g.numpy().reshape(N, C, -1)
        self.weight, self.bias = np.ones(C, np.float32), np.zeros(C, np.float32)
        self.grad_weight, self.grad_bias = np.empty(C, np.float32), np.empty(C, np.float32)
        self.running_mean, self.running_var = np.zeros(C, np.float32), np.ones(C, np.float32)
        self.stats, self.shift = np.empty((3, C)), np.zeros(C)

    def forward(self) -> np.ndarray:
        out = np.empty_like(self.x)
        _kernels.local_forward(
            self.x, self.weight, self.bias, 1e-5, out, self.stats, next_shift=self.shift,
            running_mean=self.running_mean, running_var=self.running_var, factor=0.1, num_threads=1)
        return out

    def backward(self) -> None:
        _kernels.local_backward(
            self.g, self.x, self.stats[0], self.stats[1], self.weight, np.empty_like(self.x), self.grad_weight,
            self.grad_bias, 1)


class _Calls(NamedTuple):
    """One contender of the per-layer benchmark as the timing loops call it."""

    reset: Callable[[], None]  # before each backward (untimed when cold): gradients cleared
    forward: Callable[[], Any]
    backward: Callable[[Any], None]  # given what forward returned


def time_layers(rounds: int, warmup: int, say: Callable[[str], None], cold: bool = False) -> dict[str, Any]:
    """Forward and backward times of syncbn.SyncBatchNorm vs torch.nn.BatchNorm2d, thread CPU time.

    Forward is ``y = layer(x)`` (graph creation included), backward
    ``y.backward(g)`` with a fixed ``g``. Warm (the default), a measurement
    is a block of ``k`` forwards, then the ``k`` backwards of their outputs,
    per call: the caches hold the layer's code and data. ``cold``: one call
    at a time, each after a convolution (untimed) that evicts them, as in a
    network. ``floor`` is torch's layer inside a ``torch.autograd.Function``
    that does nothing: what a layer written as a Python Function pays
    before it computes anything. ``empty Function`` (:class:`EmptyFunctionLayer`)
    and ``kernels alone`` (:class:`KernelsAlone`) split syncbn's time: the
    Function's own cost, and the computation; what syncbn takes beyond
    their sum is its Python glue.
    """
    out: dict[str, Any] = {}
    evict = _evictor() if cold else None
    for shape in LAYER_SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=gen) * 2.0 + 0.5).requires_grad_()
        g = torch.randn(shape, generator=gen)
        layers: dict[str, nn.Module] = {
            "torch": nn.BatchNorm2d(shape[1]), "torch (A/A)": nn.BatchNorm2d(shape[1]),
            "floor": LockstepBatchNorm2d(shape[1], LocalCommunicator()),
            "syncbn": syncbn.SyncBatchNorm(shape[1], process_group="local"),
            "empty Function": EmptyFunctionLayer(shape[1])}
        kernels = KernelsAlone(x, g)
        assert (*layers, "kernels alone") == LAYER_CONTENDERS
        per_block = max(1, min(50, 1_000_000 // x.numel()))  # about a millisecond of forwards at 1 ns per value

        def layer_calls(layer: nn.Module) -> _Calls:
            def reset() -> None:
                x.grad = None
                layer.zero_grad(set_to_none=True)
            return _Calls(reset, lambda: layer(x), lambda y: y.backward(g))

        calls = {name: layer_calls(layer) for name, layer in layers.items()}
        calls["kernels alone"] = _Calls(lambda: None, kernels.forward, lambda _out: kernels.backward())

        def block(c: _Calls) -> tuple[float, float]:
            # (the outputs stay alive until their backwards)
            start = time.thread_time_ns()
            outs = [c.forward() for _ in range(per_block)]
            middle = time.thread_time_ns()
            for out in outs:
                c.reset()
                c.backward(out)
            end = time.thread_time_ns()
            return (middle - start) * 1e-9 / per_block, (end - middle) * 1e-9 / per_block

        def cold_call(c: _Calls) -> tuple[float, float]:
            assert evict is not None
            c.reset()
            evict()
            start = time.thread_time_ns()
            out = c.forward()
            middle = time.thread_time_ns()
            evict()
            resume = time.thread_time_ns()
            c.backward(out)
            end = time.thread_time_ns()
            return (middle - start) * 1e-9, (end - resume) * 1e-9

        def measure(name: str) -> tuple[float, float]:
            return (cold_call if cold else block)(calls[name])

        names = list(LAYER_CONTENDERS)
        for _ in range(warmup):
            for name in names:
                measure(name)
        forward: dict[str, list[float]] = {n: [] for n in names}
        backward: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                f, b = measure(name)
                forward[name].append(f)
                backward[name].append(b)
        key = "x".join(map(str, shape))
        out[key] = {n: {"forward_s": statistics.median(forward[n]), "backward_s": statistics.median(backward[n]),
                        "forward_samples_s": forward[n], "backward_samples_s": backward[n]} for n in names}
        say(f"layer {key}: " + ", ".join(
            f"{n} fwd {out[key][n]['forward_s'] * 1e6:.0f} us bwd {out[key][n]['backward_s'] * 1e6:.0f} us"
            for n in names))
    return out


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="bench_net.py's worker (one process of a setting)")
    p.add_argument("--launcher", choices=["local", "separate", "mpirun", "torchrun"], required=True,
                   help="separate: processes of one contender each, started by this one")
    p.add_argument("--label", required=True, help="the setting's name in progress lines")
    p.add_argument("--result", type=Path, required=True, help="rank 0 writes its JSON here")
    p.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every contender (warm-up compiles)")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--layers", action="store_true", help="time single layers instead of networks")
    p.add_argument("--cold", action="store_true", help="--layers: one call at a time, caches evicted before each")
    p.add_argument("--copies", type=int, default=1,
                   help="--launcher separate: processes per contender (default: 1)")
    p.add_argument("--lead-steps", type=int, default=1,
                   help="--launcher separate: untimed steps before each timed one (default: 1)")
    p.add_argument("--serve", action="store_true",
                   help="one contender, stepped on request (the processes of --launcher separate)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    if args.layers:
        say = lambda line: print(f"[{args.label}] {line}", file=sys.stderr, flush=True)  # noqa: E731
        doc: dict[str, Any] = {"status": "ok", "clock": THREAD_CPU.name, "threads": args.threads,
                               "cold": args.cold, "layers": time_layers(args.rounds, args.warmup, say, args.cold)}
        doc["wall_s"] = time.perf_counter() - wall
        args.result.write_text(json.dumps(doc))
        return
    if args.serve:
        serve(args)
        exit_worker()
    if args.launcher == "separate":
        if args.copies < 1 or args.lead_steps < 0:
            raise SystemExit("--copies, --lead-steps: expected at least 1 and 0 "
                             f"(got {args.copies}, {args.lead_steps})")
        say = _say(Group(0, 1), args.label)
        clock = choose_clock(1, args.threads)
        say(f"started: {args.copies} process(es) per contender, {args.threads} thread(s) each, "
            f"clock: {clock.name}")
        networks = {n: time_network_separately(n, args, say) for n in args.networks}
        doc = {"status": "ok", "world_size": 1, "threads": args.threads, "clock": clock.name,
               "communicator": "n/a (processes of one rank each)", "networks": networks,
               "wall_s": time.perf_counter() - wall}
        args.result.write_text(json.dumps(doc))
        return
    with process_group(args.launcher) as group:
        say = _say(group, args.label)
        clock = choose_clock(group.size, args.threads)
        # a collective the first time (shared memory is set up): every rank asks
        communicator = type(syncbn.get_communicator(None)).__name__
        say(f"started: {group.size} process(es), {args.threads} thread(s) each, clock: {clock.name}, "
            f"syncbn's default communicator: {communicator}")
        networks = {n: time_network(n, args.modes, args.batch, args.channels_last, args.rounds, args.warmup,
                                    clock, group, say, args.compile) for n in args.networks}
        if group.rank == 0:
            doc = {"status": "ok", "world_size": group.size, "threads": args.threads, "clock": clock.name,
                   "communicator": communicator, "networks": networks,
                   "wall_s": time.perf_counter() - wall}
            args.result.write_text(json.dumps(doc))
        group.barrier()
    exit_worker()


if __name__ == "__main__":
    main()
