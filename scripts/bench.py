#!/usr/bin/env python
"""Benchmark syncbn.SyncBatchNorm against torch.nn.BatchNorm and fairscale's SyncBatchNorm.

    python scripts/bench.py                 # full run, a few minutes on 2 cores
    python scripts/bench.py --quick         # smoke run, about a minute

One command runs everything: the one-process part here, the two-process
parts as subprocesses (``mpiexec -n 2 python -m mpi4py`` with syncbn over
mpi4py, ``torchrun --nproc_per_node 2`` with syncbn's default there, shared
memory, and as the peer "syncbn (gloo)" over gloo), whose rank 0
returns its results through a JSON file. What is timed is one training
step: forward, and backward of ``(y * g).sum()`` with ``g`` fixed, float32,
one thread per process. Peers are interleaved in rounds (see
``_bench_worker.py``); the figure is the median over rounds.

Also measured, in one process: the same step with no layer at all (which
bounds any layer's speedup over torch BN); the layers alone (forward, and
backward with ``g`` as the output's gradient: no loss arithmetic, as for a
layer inside a network); the OpenMP speedup of syncbn with
2 threads; the peak memory a step allocates; the statistics kernel against
one ``torch.sum`` pass. Computed: the bytes each scheme communicates per step.

Writes ``results.md``, ``results.json`` and ``step_times.png`` to ``--out``
and prints PASS/MISS against the project's targets. It is a report: the
exit status is 0 whatever the targets say.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from _jobs import find_launcher, run_json_job
from _provenance import cpu_name, git_state
from _bench_worker import (PEERS, SHAPES, GLOO_PEER, LAYER_ONLY, Budget, Shape, Sync, bench_steps, make_batch,
                           make_layer, time_round_robin, train_step)
import syncbn  # importable now: _bench_worker puts the checkout on sys.path if needed
from syncbn import _kernels

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_bench_worker.py"
SETTINGS = {"local": "1 proc", "mpirun": "2 proc mpirun", "torchrun": "2 proc torchrun"}
SHORT_LABELS = {"local": "1 proc", "mpirun": "mpirun\n2 proc", "torchrun": "torchrun\n2 proc"}
PEER_LABELS = {"torch": "torch BN", "fairscale": "fairscale", "syncbn": "syncbn", GLOO_PEER: "syncbn (gloo)"}
# extra peers of the one-process part: 2 threads, the step without any layer,
# and the layers alone (no loss arithmetic)
LOCAL_PEERS = ("syncbn@2t", "torch@2t", "floor", "torch" + LAYER_ONLY, "syncbn" + LAYER_ONLY)
# No binding: torchrun's workers are not bound either, and on a shared
# machine a rank pinned to a busy core cannot move to an idle one. Yield
# when idle: a rank spinning in a collective otherwise takes CPU time from
# the rank it waits for whenever other work shares the cores (Open MPI turns
# this on by itself only when it knows the node is oversubscribed).
MPIEXEC_OPTIONS = ("--bind-to", "none", "--mca", "mpi_yield_when_idle", "1")
COMM_C = 256
COMM_WORLD_SIZES = (2, 4, 8, 64)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per shape (default: 9, --quick: 3)")
    p.add_argument("--quick", action="store_true", help="short blocks and few rounds, for smoke tests")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default: bench-out)")
    p.add_argument("--skip-mpi", action="store_true", help="skip the 2-process mpirun part")
    p.add_argument("--skip-torchrun", action="store_true", help="skip the 2-process torchrun part")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's adaptive malloc thresholds alone (see MALLOC_ENV)")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 9
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def budget_for(args: argparse.Namespace) -> Budget:
    return Budget(rounds=args.rounds, block_s=0.03 if args.quick else 0.15, warmup=1 if args.quick else 3)


# ----------------------------------------------------------------------------- one process


@contextlib.contextmanager
def one_rank_group() -> Iterator[None]:
    """A 1-rank gloo group: fairscale's layer synchronizes only when torch.distributed is up."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's native library logs every start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def torch_alloc_peaks(steps: dict[str, Callable[[], None]]) -> Optional[dict[str, int]]:
    """Peak bytes live in torch's CPU allocator during each step, above the level before it.

    One profiler session (starting one is slow) with each step in its own
    ``record_function`` window; from the profiler's allocation events (every
    allocation and free, with its size and time) the running sum inside each
    window, its maximum. None if this torch does not expose the events.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    try:
        from torch._C._profiler import _EventType
    except ImportError:
        return None
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for name, step in steps.items():
            with record_function(f"bench::{name}"):
                step()
    windows: dict[str, tuple[int, int]] = {}
    allocs: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
        elif e.name.startswith("bench::"):
            windows[e.name[len("bench::"):]] = (e.start_time_ns, e.end_time_ns)
    allocs.sort()
    peaks = {}
    for name, (t0, t1) in windows.items():
        live = peak = 0
        for t, size in allocs:
            if t0 <= t <= t1:
                live += size
                peak = max(peak, live)
        peaks[name] = peak
    return peaks if set(peaks) == set(steps) else None


def heap_peak(step: Callable[[], None]) -> int:
    """Peak bytes traced by tracemalloc during ``step`` above the level before it (NumPy data included)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        step()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def step_memory() -> dict[str, dict[str, Optional[dict[str, Optional[int]]]]]:
    """Peak bytes one step allocates, per shape and peer: torch's allocator and the Python/NumPy heap."""
    cases: dict[tuple[str, str], Callable[[], None]] = {}
    for shape in SHAPES:
        x, g = make_batch(shape)
        for peer in PEERS:
            layer = make_layer(peer, shape, "local")
            if layer is None:
                continue

            def step(layer: torch.nn.Module = layer, x: torch.Tensor = x, g: torch.Tensor = g) -> None:
                train_step(layer, x, g)
                x.grad = None   # the next measurement starts without gradients
                layer.zero_grad(set_to_none=True)

            step()  # warm: lazy initialization is not a step's memory
            cases[shape.key, peer] = step
    gc.collect()
    tensors = torch_alloc_peaks({f"{s}|{p}": fn for (s, p), fn in cases.items()})
    out: dict[str, dict[str, Optional[dict[str, Optional[int]]]]] = {s.key: dict.fromkeys(PEERS) for s in SHAPES}
    for (s, p), fn in cases.items():
        t = None if tensors is None else tensors[f"{s}|{p}"]
        h = heap_peak(fn)
        out[s][p] = {"torch_allocator": t, "python_heap": h, "total": None if t is None else t + h}
    return out


def kernel_view(x: torch.Tensor) -> np.ndarray:
    """Zero-copy NumPy view of ``x`` in the kernels' layout (the public contract of
    ``_kernels.pyi``): rows ``(M, C)`` for 2-D and channels-last input, else ``(N, C, L)``."""
    a = x.detach().numpy()
    C = a.shape[1]
    if a.ndim == 2 or not a.flags.c_contiguous:
        rows = np.moveaxis(a, 1, -1)
        assert rows.flags.c_contiguous, "expected a contiguous or channels-last input"
        return rows.reshape(-1, C)
    return a.reshape(a.shape[0], C, -1)


def stats_vs_sum(shape: Shape, budget: Budget) -> dict[str, Any]:
    """syncbn's statistics kernel (1 thread) against one ``torch.sum`` read pass of the same input."""
    x, _ = make_batch(shape)
    xd = x.detach()
    view = kernel_view(xd)
    C = shape.dims[1]
    shift, out = np.zeros(C), np.empty(2 * C + 1)
    fns = {"local_stats": lambda: _kernels.local_stats(view, shift, out, 1),
           "torch.sum": lambda: torch.sum(xd)}
    # sub-millisecond calls: shorter blocks than the steps' are plenty
    res = time_round_robin(fns, {n: 1 for n in fns}, budget._replace(block_s=budget.block_s / 3), Sync())
    k, s = res["local_stats"]["median_s"], res["torch.sum"]["median_s"]
    return {"local_stats_s": k, "torch_sum_s": s, "ratio": k / s, "bytes": xd.numel() * xd.element_size()}


def run_local(budget: Budget, progress: bool) -> dict[str, Any]:
    """The one-process part: step times (1 and 2 threads), memory, statistics kernel."""
    torch.set_num_threads(1)
    wall = time.perf_counter()
    bar = tqdm(total=3 * len(SHAPES), desc="1 proc", disable=not progress, dynamic_ncols=True)

    def say(line: str) -> None:
        bar.write(f"[1 proc] {line}", file=sys.stderr)
        bar.update(1)

    with one_rank_group():
        steps = bench_steps(PEERS + LOCAL_PEERS, "local", budget, Sync(), say)
        memory = step_memory()
        for shape in SHAPES:
            m = memory[shape.key]
            say(f"memory {shape.key}: " + ", ".join(
                f"{p} {_fmt_bytes(m[p]['total'])}" for p in PEERS if m[p] is not None))
    stats = {}
    for shape in SHAPES:
        stats[shape.key] = r = stats_vs_sum(shape, budget)
        say(f"stats kernel {shape.key}: {r['local_stats_s'] * 1e3:.3f} ms vs torch.sum "
            f"{r['torch_sum_s'] * 1e3:.3f} ms")
    bar.close()
    return {"status": "ok", "world_size": 1, "comm": "local", "steps": steps, "memory": memory,
            "stats_kernel": stats, "wall_s": time.perf_counter() - wall}


# ----------------------------------------------------------------------------- two processes


def run_distributed(setting: str, args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """Launch the worker on 2 processes; returns rank 0's results or a failure status."""
    worker_args = ["--setting", setting, "--rounds", str(budget.rounds),
                   "--block-s", str(budget.block_s), "--warmup", str(budget.warmup)]
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    if setting == "mpirun":
        exe = find_launcher("mpiexec")
        if exe is None:
            return {"status": "failed: mpiexec not found"}
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        head = [exe, "-n", "2", *MPIEXEC_OPTIONS, sys.executable, "-m", "mpi4py", str(WORKER)]
    else:
        exe = find_launcher("torchrun")
        run = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
        head = [*run, "--standalone", "--nproc_per_node", "2", str(WORKER)]
    shown = " ".join(Path(a).name if os.sep in a else a for a in [*head, *worker_args])
    timeout = 150 if args.quick else 360
    return run_json_job([*head, *worker_args], env, timeout, shown)


# ----------------------------------------------------------------------------- analysis


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def speedups(steps: dict[str, Any], peer: str, vs: str = "syncbn") -> dict[str, float]:
    """``peer time / vs time`` per shape where both were measured (> 1: ``vs`` is faster)."""
    out = {}
    for key, row in steps.items():
        if row.get(peer) and row.get(vs):
            out[key] = row[peer]["median_s"] / row[vs]["median_s"]
    return out


def comm_bytes(world_size: int, C: int, itemsize: int = 4) -> dict[str, dict[str, Any]]:
    """Bytes per rank per step of each scheme, counted from its source.

    ``payload``: bytes of the collectives' result buffers on one rank.
    ``sent``: bytes one rank sends with ring algorithms (allreduce of n bytes:
    2 (W-1)/W n; all-gather into W x n bytes: (W-1) n).
    """
    W = world_size
    ring_ar = lambda n: 2 * (W - 1) / W * n  # noqa: E731
    syncbn_ar = [(2 * C + 1) * 8, 2 * C * 8]                    # float64 sums + count; backward sums
    fairscale_ar = [itemsize, 2 * C * itemsize, 2 * C * itemsize]  # count, [mean, meansqr]; backward
    torch_gather = (2 * C + 1) * itemsize                      # [mean, invstd, count] from each rank
    torch_ar = [2 * C * itemsize]                              # backward [sum_dy, sum_dy_xmu]
    return {
        "syncbn": {"collectives": 2, "payload": sum(syncbn_ar), "sent": sum(map(ring_ar, syncbn_ar))},
        "torch.nn.SyncBatchNorm": {"collectives": 2, "payload": W * torch_gather + sum(torch_ar),
                                   "sent": (W - 1) * torch_gather + sum(map(ring_ar, torch_ar))},
        "fairscale": {"collectives": 3, "payload": sum(fairscale_ar), "sent": sum(map(ring_ar, fairscale_ar))},
    }


COMM_FORMULAS = {
    "syncbn": "fwd allreduce (2C+1) f64 + bwd allreduce 2C f64 = 32C+8 B",
    "torch.nn.SyncBatchNorm": "fwd all-gather W(2C+1) f32 + bwd allreduce 2C f32 = 4W(2C+1)+8C B",
    "fairscale": "fwd allreduce 1 f32 + 2C f32, bwd allreduce 2C f32 = 16C+4 B",
}


def evaluate_targets(settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's targets: value, threshold, PASS / MISS / SKIP."""
    targets: list[dict[str, Any]] = []

    def add(name: str, setting: str, check: Callable[[dict[str, Any]], tuple[str, bool]]) -> None:
        res = settings.get(setting, {})
        status = res.get("status", "skipped")
        if status == "skipped":
            targets.append({"target": name, "value": "not run", "verdict": "SKIP"})
        elif status != "ok":
            targets.append({"target": name, "value": f"not measured ({status})", "verdict": "MISS"})
        else:
            value, ok = check(res)
            targets.append({"target": name, "value": value, "verdict": "PASS" if ok else "MISS"})

    def one_proc(res: dict[str, Any]) -> tuple[str, bool]:
        r = speedups(res["steps"], "torch")
        gm, worst = geomean(list(r.values())), min(r.values())
        return f"geomean {gm:.2f}x, worst shape {worst:.2f}x", gm >= 3.0 and worst >= 1.0

    def mpirun(res: dict[str, Any]) -> tuple[str, bool]:
        gm = geomean(list(speedups(res["steps"], "torch").values()))
        return f"geomean {gm:.2f}x", gm >= 2.5

    def torchrun(vs: str) -> Callable[[dict[str, Any]], tuple[str, bool]]:
        def check(res: dict[str, Any]) -> tuple[str, bool]:
            gf = geomean(list(speedups(res["steps"], "fairscale", vs).values()))
            gt = geomean(list(speedups(res["steps"], "torch", vs).values()))
            ok = gf >= 3.0 and gt >= 1.0  # NaN (peer not measured) fails
            return f"{PEER_LABELS[vs]}: vs fairscale geomean {gf:.2f}x, vs torch BN geomean {gt:.2f}x", ok
        return check

    def memory(res: dict[str, Any]) -> tuple[str, bool]:
        ratios = [m["syncbn"]["total"] / m["torch"]["total"] for m in res["memory"].values()
                  if m["syncbn"]["total"] is not None and m["torch"]["total"]]
        if not ratios:
            return "allocation events unavailable in this torch", False
        return f"syncbn / torch BN peak: worst shape {max(ratios):.3f}", max(ratios) <= 1.0

    def stats(res: dict[str, Any]) -> tuple[str, bool]:
        gm = geomean([r["ratio"] for r in res["stats_kernel"].values()])
        return f"geomean local_stats / torch.sum {gm:.2f}", gm <= 1.5

    add("1 proc: syncbn >= 3x faster than torch BN (geomean), slower on no shape", "local", one_proc)
    add("2 proc mpirun: syncbn >= 2.5x faster than torch BN (geomean)", "mpirun", mpirun)
    add("2 proc torchrun, syncbn (default: shared memory on one host): >= 3x faster than fairscale and "
        "not slower than torch BN (geomeans)", "torchrun", torchrun("syncbn"))
    add("2 proc torchrun, syncbn over gloo (process_group='torch'): >= 3x faster than fairscale and not "
        "slower than torch BN (geomeans)", "torchrun", torchrun(GLOO_PEER))
    add("peak extra memory per step: syncbn <= torch BN on every shape", "local", memory)
    add("stats kernel within 1.5x of one torch.sum pass (geomean)", "local", stats)
    return targets


# ----------------------------------------------------------------------------- report


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _ms(entry: Optional[dict[str, Any]]) -> str:
    return "n/a" if not entry else f"{entry['median_s'] * 1e3:.3f}"


def _x(v: Optional[float]) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(doc: dict[str, Any]) -> str:
    settings, meta = doc["settings"], doc["meta"]
    out = [
        "# syncbn benchmark",
        "",
        f"{meta['date']}, syncbn at {meta['git']}, torch {meta['torch']}, {meta['cpu']}, {meta['cores']} cores, "
        f"{meta['rounds']} rounds{' (quick)' if meta['quick'] else ''}; load average "
        f"{meta['load_before']:.2f} before, {meta['load_after']:.2f} after "
        "(other work on the machine inflates and scatters the times). "
        f"malloc: {meta.get('malloc', 'glibc defaults')} (see MALLOC_ENV in bench.py).",
        "",
        "## Step time (forward + backward of (y * g).sum(), float32, 1 thread per process)",
        "",
        "Median over rounds of the per-step time, peers interleaved; with 2 processes, the slower "
        "rank's time. Shapes are per process. Speedup = peer time / syncbn time (> 1: syncbn faster). "
        "torch BN never synchronizes; fairscale and syncbn do (fairscale: 4-D input only).",
        "",
    ]
    for s, label in SETTINGS.items():
        res = settings[s]
        if s == "local":
            how = "this process (syncbn: process_group='local'; fairscale: a 1-rank gloo group)"
        else:
            how = f"`{res['command']}`" if "command" in res else "not launched"
        state = "" if res.get("status") == "ok" else f" ({res.get('status')})"
        out.append(f"- {label}: {how}{state}")
    out.append("")
    rows = []
    for shape in SHAPES:
        for s, label in SETTINGS.items():
            res = settings[s]
            if res.get("status") != "ok":
                continue
            row = res["steps"][shape.key]
            ratios = [speedups({shape.key: row}, peer, vs).get(shape.key)
                      for vs in ("syncbn", GLOO_PEER) for peer in ("torch", "fairscale")]
            rows.append([shape.key, label, _ms(row["torch"]), _ms(row["fairscale"]), _ms(row["syncbn"]),
                         _ms(row.get(GLOO_PEER)), *map(_x, ratios)])
    for s, label in SETTINGS.items():
        res = settings[s]
        if res.get("status") == "ok":
            rows.append(["geomean", label, "", "", "", "",
                         *(_x(geomean(list(speedups(res["steps"], peer, vs).values())))
                           for vs in ("syncbn", GLOO_PEER) for peer in ("torch", "fairscale"))])
    out += ["syncbn runs with its default communicator (1 proc: none, mpirun: mpi4py, torchrun: "
            "shared memory, as the ranks share a host); syncbn (gloo), under torchrun only, over "
            "torch.distributed's gloo (process_group='torch').", "",
            _table(["shape", "setting", "torch BN ms", "fairscale ms", "syncbn ms", "syncbn (gloo) ms",
                    "syncbn vs torch BN", "syncbn vs fairscale", "gloo vs torch BN", "gloo vs fairscale"],
                   rows), ""]

    local = settings["local"]
    if local.get("status") == "ok":
        rows = []
        for shape in SHAPES:
            row = local["steps"][shape.key]
            rows.append([shape.key, _ms(row["floor"]), _ms(row["torch"]), _ms(row["syncbn"]),
                         _x(row["torch"]["median_s"] / row["floor"]["median_s"])])
        bound = geomean([r["torch"]["median_s"] / r["floor"]["median_s"] for r in local["steps"].values()])
        rows.append(["geomean", "", "", "", _x(bound)])
        out += ["## Step floor: the same step without a normalization layer (1 process)", "",
                "forward and backward of (x * g).sum(): what every peer's step contains besides the "
                "layer, so a layer that cost nothing would be at most torch BN / floor times faster "
                "than torch BN.", "",
                _table(["shape", "floor ms", "torch BN ms", "syncbn ms", "bound: torch BN / floor"], rows), ""]
        tl, sl = "torch" + LAYER_ONLY, "syncbn" + LAYER_ONLY
        rows = []
        for shape in SHAPES:
            row = local["steps"][shape.key]
            rows.append([shape.key, _ms(row[tl]), _ms(row[sl]), _x(row[tl]["median_s"] / row[sl]["median_s"])])
        rows.append(["geomean", "", "", _x(geomean(list(speedups(local["steps"], tl, sl).values())))])
        out += ["## The layer alone (1 process)", "",
                "Forward, and backward with g as the output's gradient (`y.backward(g)`): the same "
                "gradients as the step without the loss's own arithmetic, as for one layer inside a "
                "network, where the loss is computed once. The targets are judged on the step above.", "",
                _table(["shape", "torch BN ms", "syncbn ms", "syncbn vs torch BN"], rows), ""]
        rows = []
        for shape in SHAPES:
            row = local["steps"][shape.key]
            rows.append([shape.key, _ms(row["syncbn"]), _ms(row["syncbn@2t"]),
                         _x(row["syncbn"]["median_s"] / row["syncbn@2t"]["median_s"]),
                         _ms(row["torch"]), _ms(row["torch@2t"]),
                         _x(row["torch"]["median_s"] / row["torch@2t"]["median_s"])])
        sp = [local["steps"][k]["syncbn"]["median_s"] / local["steps"][k]["syncbn@2t"]["median_s"]
              for k in local["steps"]]
        rows.append(["geomean", "", "", _x(geomean(sp)), "", "", ""])
        out += ["## OpenMP: 2 threads vs 1 in one process (torch.set_num_threads)", "",
                "The layer passes torch.get_num_threads() to its kernels; torch's own ops in the step "
                "use the same count. On a 2-core machine shared with other work, 2 threads compete "
                "with it.", "",
                _table(["shape", "syncbn 1t ms", "syncbn 2t ms", "syncbn speedup",
                        "torch BN 1t ms", "torch BN 2t ms", "torch BN speedup"], rows), ""]

        rows = []
        for shape in SHAPES:
            m = local["memory"][shape.key]
            ratio = (m["syncbn"]["total"] / m["torch"]["total"]
                     if m["syncbn"]["total"] is not None and m["torch"]["total"] else None)
            rows.append([shape.key, *(_fmt_bytes(m[p]["total"]) if m[p] else "n/a" for p in PEERS),
                         _fmt_bytes(m["syncbn"]["torch_allocator"]), _fmt_bytes(m["syncbn"]["python_heap"]),
                         "n/a" if ratio is None else f"{ratio:.3f}"])
        out += ["## Peak extra memory per step (1 process)", "",
                "Peak bytes live during one step above the level before it (input, g, parameters "
                "excluded; output, saved tensors, temporaries and the new gradients included). "
                "Two parts, measured in separate steps and added (an upper bound of the joint peak): "
                "torch's CPU allocator, from the "
                "profiler's allocation events (every allocation and free, its size and time: the "
                "maximum of the running sum); and the Python heap with NumPy's data, from "
                "tracemalloc (NumPy reports its buffers to it). Gradients are set to None before "
                "every step, in the timings too.", "",
                _table(["shape", "torch BN", "fairscale", "syncbn", "syncbn: torch allocator",
                        "syncbn: Python/NumPy heap", "syncbn / torch BN"], rows), ""]

        rows = []
        for shape in SHAPES:
            r = local["stats_kernel"][shape.key]
            rows.append([shape.key, _fmt_bytes(r["bytes"]), f"{r['local_stats_s'] * 1e3:.3f}",
                         f"{r['torch_sum_s'] * 1e3:.3f}", f"{r['ratio']:.2f}",
                         f"{r['bytes'] / r['local_stats_s'] / 1e9:.1f}"])
        rows.append(["geomean", "", "", "", f"{geomean([r['ratio'] for r in local['stats_kernel'].values()]):.2f}",
                     ""])
        out += ["## Statistics kernel vs one torch.sum pass (1 thread)", "",
                "syncbn._kernels.local_stats (per-channel sum and sum of squares, float64 "
                "accumulation) on the NumPy view the layer passes it, against torch.sum(x) "
                "(one read of the same memory).", "",
                _table(["shape", "input", "local_stats ms", "torch.sum ms", "ratio", "local_stats GB/s"],
                       rows), ""]

    rows = []
    for scheme, f in COMM_FORMULAS.items():
        cells = [scheme, str(doc["comm_bytes"][scheme]["2"]["collectives"])]
        for W in COMM_WORLD_SIZES:
            c = doc["comm_bytes"][scheme][str(W)]
            cells.append(f"{_fmt_bytes(c['payload'])} ({_fmt_bytes(c['sent'])})")
        cells.append(f)
        rows.append(cells)
    measured = [f"{settings[s]['steps'][SHAPES[0].key]['syncbn']['collectives_per_step']:.0f} in {label}"
                for s, label in SETTINGS.items() if settings[s].get("status") == "ok"]
    out += [f"## Bytes communicated per rank per step, C = {COMM_C}, float32 input", "",
            "Counted from each implementation's source (torch's _functions.py, fairscale's "
            "sync_batchnorm.py, syncbn's function.py). Cell: result-buffer bytes on one rank "
            "(bytes one rank sends with ring algorithms). syncbn collectives per step counted "
            "by its communicator during the timings: " + ", ".join(measured) + ".", "",
            _table(["scheme", "collectives", *(f"W={W}" for W in COMM_WORLD_SIZES), "formula"], rows), ""]

    out += ["## Targets", "",
            _table(["target", "measured", "verdict"],
                   [[t["target"], t["value"], t["verdict"]] for t in doc["targets"]]), ""]
    return "\n".join(out)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Per shape, grouped bars: step time of each peer in each setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [(s, label) for s, label in SETTINGS.items() if doc["settings"][s].get("status") == "ok"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    peers = PEERS + (GLOO_PEER,)
    width = 0.8 / len(peers)
    for ax, shape in zip(axes.flat, SHAPES):
        times = []
        for j, peer in enumerate(peers):
            ys = []
            for s, _ in settings:
                e = doc["settings"][s]["steps"][shape.key].get(peer)
                ys.append(e["median_s"] * 1e3 if e else 0.0)
            times += [y for y in ys if y > 0]
            ax.bar([i + (j - (len(peers) - 1) / 2) * width for i in range(len(settings))], ys, width,
                   label=PEER_LABELS[peer], color=f"C{j}")
        ax.set_xticks(range(len(settings)), [SHORT_LABELS[s] for s, _ in settings], fontsize=8)
        ax.set_title(shape.key, fontsize=10)
        ax.set_ylabel("ms per step")
        if times and max(times) / min(times) > 20:
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("syncbn benchmark: training step time, median over rounds (lower is better; "
                 "no fairscale bar for 2-D input: n/a)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# glibc's malloc serves a large block from a fresh mmap unless an earlier free
# raised its adaptive threshold above the block's size, and gives trimmed heap
# top back to the OS; either way every 4 KiB of a fresh output then costs a
# page fault (several microseconds in a VM). Which peer pays depends on the
# allocation history of the process: measured here, the same syncbn step took
# 0 or 750 faults, torch BN's 8 or 110, in the same process, depending on what
# ran before. Fixed thresholds take that lottery out of the comparison, for
# every peer alike (the usual advice for CPU training, like jemalloc or tcmalloc).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(512 << 20)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if argv is None and not args.default_malloc and any(
            os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        # glibc reads these at start-up: run again with them (children inherit them)
        os.environ.update(MALLOC_ENV)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    budget = budget_for(args)
    start = time.perf_counter()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "syncbn": syncbn.__version__, "cpu": cpu_name(), "cores": os.cpu_count(),
        "rounds": budget.rounds, "block_s": budget.block_s, "warmup": budget.warmup, "quick": args.quick,
        "load_before": os.getloadavg()[0], "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": git_state(),
        "malloc": " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "glibc defaults",
    }
    settings: dict[str, dict[str, Any]] = {"local": run_local(budget, not args.no_progress)}
    for setting, skip in (("mpirun", args.skip_mpi), ("torchrun", args.skip_torchrun)):
        if skip:
            settings[setting] = {"status": "skipped"}
            continue
        print(f"[{SETTINGS[setting]}] launching ...", file=sys.stderr, flush=True)
        settings[setting] = run_distributed(setting, args, budget)
        if settings[setting]["status"] != "ok":
            print(f"[{SETTINGS[setting]}] {settings[setting]['status']}", file=sys.stderr, flush=True)
    meta["load_after"] = os.getloadavg()[0]
    meta["wall_s"] = time.perf_counter() - start
    doc = {"meta": meta, "settings": settings,
           "comm_bytes": {scheme: {str(W): comm_bytes(W, COMM_C)[scheme] for W in COMM_WORLD_SIZES}
                          for scheme in COMM_FORMULAS}}
    doc["targets"] = evaluate_targets(settings)
    report = render(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.out / "step_times.png")
    print(report)
    print(f"wrote {args.out / 'results.md'}, results.json, step_times.png "
          f"({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
