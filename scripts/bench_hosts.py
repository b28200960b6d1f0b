#!/usr/bin/env python
"""Beyond one host, measured: syncbn's allreduce and training step on 2 pretend hosts x 2 ranks.

    sudo python scripts/bench_hosts.py                  # about 2 minutes on 2 cores
    sudo python scripts/bench_hosts.py --delay-us 200   # a slower network
    sudo python scripts/bench_hosts.py --quick          # smoke run

Pretend hosts: two network namespaces joined by a veth pair, a ``tc netem``
delay (``--delay-us``, default 50 us) on both ends, addresses 10.77.0.1 and
10.77.0.2. One ``torchrun --nnodes 2 --nproc_per_node 2`` per namespace
(``ip netns exec``), a static rendezvous at 10.77.0.1, ``SYNCBN_HOST`` set to
hostA / hostB, gloo bound to the veth (``GLOO_SOCKET_IFNAME``), one thread
per rank. Everything the benchmark creates is removed at the end, on
failure and on SIGINT / SIGTERM / SIGHUP too; a run killed with SIGKILL
leaves its namespaces behind, and the next run removes them.

Measured (``_hosts_worker.py``): (a) the latency of one allreduce of a
``2C + 1 = 129`` float64 buffer through syncbn's communicators, flat
(``process_group="torch"``: one gloo allreduce over the 4 ranks) against the
default (``process_group=None``: hierarchical where syncbn has it) and an
emulated hierarchical allreduce made of syncbn's parts, with calibration
allreduces for the hop model; (b) the ResNet-20 training step of the network
benchmark with syncbn flat, default and emulated-hierarchical (and torch's
unsynchronized BN as a reference). Interleaved rounds, the slowest rank,
medians; an A/A control (flat twice) in both. The report names the class
each contender's communicator resolved to, then evaluates a model of
sequential network hops (:func:`hop_model_rows`) against the measurement and
for 8 hosts x 8 ranks.

Needs root and network namespaces; without them it says "skipped" and exits
0. Writes results.md and results.json to ``--out``; exit status 0 whatever
the numbers, 1 if the job failed.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

from _provenance import cpu_name, git_state

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_hosts_worker.py"
AA_TOLERANCE = 0.03
NS_PREFIX = "syncbn-bench-host"  # + "A-<pid>", "B-<pid>"
SUBNET = "10.77.0"
ADDRESSES = (f"{SUBNET}.1", f"{SUBNET}.2")
HOST_NAMES = ("hostA", "hostB")
RANKS_PER_HOST = 2
MODEL_LAYOUTS = ((2, 2), (8, 8))  # (hosts, ranks per host) evaluated by the hop model
# the allreduce contenders of the table, then the calibration of the model (names from the worker)
CONTENDERS = ("flat", "flat (A/A)", "default", "hier (emulated)")
CALIBRATION = ("gloo pair, same host", "gloo pair, across hosts", "shm, one host")
FLAT_RING = "flat ring (gloo), ranks host by host"
HIER_RING = "hierarchical: shm + leaders' ring + shm"


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delay-us", type=int, default=50,
                   help="netem delay on each end of the veth, microseconds (default: 50; 0: no qdisc)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of the allreduce part (default: 15, --quick: 3)")
    p.add_argument("--calls", type=int, default=None,
                   help="allreduces per contender per round (default: 200, --quick: 20)")
    p.add_argument("--net-rounds", type=int, default=None,
                   help="rounds of the training-step part (default: 15, --quick: 2; 0: skip the part)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds / steps (default: 2, --quick: 1)")
    p.add_argument("--batch", type=int, default=None, help="images per rank (default: 8, --quick: 2)")
    p.add_argument("--channels", type=int, default=64,
                   help="C of the allreduce buffer, 2C + 1 values (default: 64)")
    p.add_argument("--master-port", type=int, default=29577,
                   help="rendezvous port on 10.77.0.1 (default: 29577)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before the job is given up as hung (default: 900, --quick: 300)")
    p.add_argument("--quick", action="store_true", help="few rounds and calls, small batches: a smoke run")
    p.add_argument("--out", type=Path, default=Path("bench-out/hosts"),
                   help="output folder (default: bench-out/hosts)")
    p.add_argument("--require-netem", action="store_true",
                   help="skip when netem is not available (default: run without the delay, and say so)")
    p.add_argument("--pretend-unprivileged", action="store_true",
                   help="behave as if not root (for tests: the skip path, no namespace touched)")
    args = p.parse_args(argv)
    # (default, --quick)
    defaults = {"rounds": (15, 3), "calls": (200, 20), "net_rounds": (15, 2), "warmup": (2, 1),
                "batch": (8, 2), "timeout": (900.0, 300.0)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("rounds", "calls", "batch", "channels", "timeout"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}: expected a positive number (got {getattr(args, name)})")
    for name in ("net_rounds", "warmup", "delay_us"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}: expected a number >= 0 (got {getattr(args, name)})")
    if not 1024 <= args.master_port <= 65535:
        p.error(f"--master-port: expected 1024..65535 (got {args.master_port})")
    return args


# ----------------------------------------------------------------------------- the hop model


class HopCosts(NamedTuple):
    """Measured costs the model is built from, in seconds.

    ``local_s``: one sequential step of a gloo allreduce between two processes
    of one host (half a 2-rank allreduce over loopback TCP); ``cross_s``: the
    same between two hosts (half a 2-rank allreduce across the veth);
    ``shm_s``: one shared-memory allreduce among the ranks of one host.
    """

    local_s: float
    cross_s: float
    shm_s: float


class HopCount(NamedTuple):
    """The sequential steps of one allreduce: across hosts, within a host over the network
    stack, and shared-memory synchronizations."""

    cross: int
    local: int
    shm: int

    def seconds(self, costs: HopCosts) -> float:
        return self.cross * costs.cross_s + self.local * costs.local_s + self.shm * costs.shm_s


def _check_layout(world: int, hosts: int) -> int:
    if hosts < 1 or world < hosts or world % hosts:
        raise ValueError(f"expected as many ranks on every host (got {world} ranks, {hosts} hosts)")
    return world // hosts


def ring_hops(world: int, hosts: int) -> HopCount:
    """A flat ring allreduce (gloo's) over ``world`` ranks ordered host by host.

    A ring allreduce takes ``2 (W - 1)`` sequential steps (reduce-scatter,
    then all-gather); in each, every rank receives from its neighbour what
    the neighbour received the step before, so the last message to arrive
    has travelled ``2 (W - 1)`` consecutive links of the ring. With ranks
    ordered host by host, the ring crosses hosts on ``H`` of its ``W`` links;
    the count is that of the chain of ``2 (W - 1)`` consecutive links with
    the most crossings (the slowest rank).
    """
    per_host = _check_layout(world, hosts)
    if world == 1:
        return HopCount(0, 0, 0)
    steps = 2 * (world - 1)
    # link i carries rank i's messages to rank i + 1: across hosts where i + 1 starts a host
    crossing = [hosts > 1 and (i + 1) % per_host == 0 for i in range(world)]
    cross = max(sum(crossing[(end - j) % world] for j in range(steps)) for end in range(world))
    return HopCount(cross, steps - cross, 0)


def ring_all_cross_hops(world: int, hosts: int) -> HopCount:
    """The same ring with every step paying a network hop, ``2 (W - 1)``: the count of the
    usual back-of-envelope, and what a ring pays when its neighbours are on different hosts."""
    _check_layout(world, hosts)
    return HopCount(2 * (world - 1) if hosts > 1 else 0, 0 if hosts > 1 else 2 * (world - 1), 0)


def _log2_steps(n: int) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0


def doubling_hops(world: int, hosts: int) -> HopCount:
    """A flat recursive-doubling (butterfly) allreduce, ranks ordered host by host: partners
    at distance 1, 2, 4, ...; those nearer than a host's size are on the same host."""
    per_host = _check_layout(world, hosts)
    return HopCount(_log2_steps(hosts), _log2_steps(per_host), 0)


def hierarchical_hops(world: int, hosts: int, leaders: str = "ring") -> HopCount:
    """Sum within each host through shared memory, allreduce among the ``H`` host leaders
    (every link across hosts; ``leaders``: ``"ring"``, ``2 (H - 1)`` steps, or ``"doubling"``,
    ``log2 H``), hand the total back through shared memory: 2 shared-memory synchronizations
    (1 on a single host, where the first one already is the whole allreduce)."""
    _check_layout(world, hosts)
    if hosts == 1:
        return HopCount(0, 0, 1)
    if leaders == "ring":
        return HopCount(2 * (hosts - 1), 0, 2)
    if leaders == "doubling":
        return HopCount(_log2_steps(hosts), 0, 2)
    raise ValueError(f"leaders: expected 'ring' or 'doubling' (got {leaders!r})")


class ModelRow(NamedTuple):
    hosts: int
    per_host: int
    scheme: str
    hops: HopCount
    seconds: float
    measured_as: Optional[str]  # the allreduce contender that measures this scheme, if any


def hop_model_rows(costs: HopCosts, layouts: Sequence[tuple[int, int]] = MODEL_LAYOUTS) -> list[ModelRow]:
    """Every scheme of the model on every ``(hosts, ranks per host)`` layout, in seconds per allreduce."""
    schemes: list[tuple[str, Callable[[int, int], HopCount], Optional[str]]] = [
        (FLAT_RING, ring_hops, "flat"),
        ("flat ring, every step across hosts", ring_all_cross_hops, None),
        ("flat recursive doubling", doubling_hops, None),
        (HIER_RING, hierarchical_hops, "hier (emulated)"),
        ("hierarchical: shm + leaders' doubling + shm",
         lambda w, h: hierarchical_hops(w, h, "doubling"), None),
    ]
    rows = []
    for hosts, per_host in layouts:
        for name, hops_of, measured in schemes:
            hops = hops_of(hosts * per_host, hosts)
            rows.append(ModelRow(hosts, per_host, name, hops, hops.seconds(costs), measured))
    return rows


def costs_from(allreduce: dict[str, Any]) -> HopCosts:
    """The model's costs from the calibration contenders (medians per call)."""
    local, cross, shm = (allreduce[name]["median_s"] for name in CALIBRATION)
    return HopCosts(local_s=local / 2, cross_s=cross / 2, shm_s=shm)


# ----------------------------------------------------------------------------- privileges and namespaces


class Skip(Exception):  # noqa: N818 -- a condition to report, not a fault
    """The benchmark cannot run here (not root, no namespaces, no netem): say so, exit 0."""


class Interrupted(BaseException):
    """A termination signal arrived: unwind through every ``finally`` (cleanup), then exit."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` inside the block (so cleanup in
    ``finally`` runs); the previous handlers come back after it."""
    sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {s: signal.signal(s, _raise_interrupted) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """Termination signals are recorded, not acted on, inside the block (cleanup is not cut short)."""
    sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    seen: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: seen.append(signum)) for s in sigs}
    try:
        yield seen
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_privileges(pretend_unprivileged: bool = False) -> dict[str, str]:
    """The tools the benchmark needs (``ip``, ``tc``), or :class:`Skip` when it cannot run here."""
    if pretend_unprivileged or not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise Skip("needs root to create network namespaces, a veth pair and netem qdiscs "
                   "(run it as root, e.g. sudo)")
    tools = {name: shutil.which(name) for name in ("ip", "tc")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise Skip(f"{' and '.join(missing)} not found (install iproute2)")
    return {name: str(path) for name, path in tools.items()}


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def list_netns(ip: str) -> list[str]:
    out = _run([ip, "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(ip: str, say: Callable[[str], None]) -> None:
    """Remove the namespaces (and with them their veth ends and qdiscs) and any unmoved veth
    of earlier runs of this benchmark whose process is gone (SIGKILL leaves no time to clean up)."""

    def stale(pid: str) -> bool:
        return int(pid) != os.getpid() and not _pid_alive(int(pid))

    for name in list_netns(ip):
        m = re.fullmatch(rf"{NS_PREFIX}[AB]-([0-9]+)", name)
        if m and stale(m.group(1)):
            say(f"removing namespace {name}, left by a run that is gone (pid {m.group(1)})")
            _run([ip, "netns", "del", name], check=False)
    for line in _run([ip, "-o", "link", "show"], check=False).stdout.splitlines():
        m = re.match(r"\d+: (sbn([0-9]+)a)[@:]", line)
        if m and stale(m.group(2)):
            say(f"removing veth {m.group(1)}, left by a run that is gone (pid {m.group(2)})")
            _run([ip, "link", "del", m.group(1)], check=False)


class PretendHosts:
    """Two network namespaces joined by a veth pair, with a netem delay on both ends.

    :meth:`create` records every object as it makes it; :meth:`destroy` removes
    them all in reverse (whatever :meth:`create` got to), then checks that
    nothing is left and returns what is (an empty list when clean).
    """

    def __init__(self, ip: str, tc: str, delay_us: int, tag: str) -> None:
        self.ip, self.tc, self.delay_us = ip, tc, delay_us
        self.namespaces = (f"{NS_PREFIX}A-{tag}", f"{NS_PREFIX}B-{tag}")
        self.veths = (f"sbn{tag}a"[:15], f"sbn{tag}b"[:15])  # interface names: at most 15 characters
        self.qdiscs: list[str] = []
        self.applied_delay_us = 0  # what the qdiscs add: 0 when netem is not available
        self.netem_error = ""
        self._created: list[tuple[str, str]] = []  # (kind, name), in order of creation

    def create(self, say: Callable[[str], None]) -> None:
        ip = self.ip
        # recorded before it is made: a signal between the two cannot leave it unrecorded
        # (removing what was never made fails harmlessly; the names carry this process's id)
        for ns in self.namespaces:
            self._created.append(("netns", ns))
            self._do([ip, "netns", "add", ns], "network namespaces")
        (ns_a, ns_b), (veth_a, veth_b) = self.namespaces, self.veths
        self._created.append(("veth", veth_a))
        self._do([ip, "link", "add", veth_a, "type", "veth", "peer", "name", veth_b], "a veth pair")
        for ns, veth, addr in zip(self.namespaces, self.veths, ADDRESSES):
            self._do([ip, "link", "set", veth, "netns", ns], "a veth pair")
            self._do([ip, "-n", ns, "addr", "add", f"{addr}/24", "dev", veth], "addresses")
            self._do([ip, "-n", ns, "link", "set", veth, "up"], "links up")
            self._do([ip, "-n", ns, "link", "set", "lo", "up"], "links up")
        if self.delay_us > 0:
            self._add_netem()
        if self.applied_delay_us:
            delay = f"netem delay {self.applied_delay_us} us on both ends"
        else:
            delay = "no delay added" + (f" (no netem here: {self.netem_error})" if self.netem_error else "")
        say(f"pretend hosts: {ns_a} ({veth_a} {ADDRESSES[0]}) <-> {ns_b} ({veth_b} {ADDRESSES[1]}), {delay}")

    def _add_netem(self) -> None:
        """A netem delay on both ends; if the kernel has no netem, none on either (the report says so)."""
        for ns, veth in zip(self.namespaces, self.veths):
            self._created.append(("qdisc", f"{ns}:{veth}"))
            cmd = [self.tc, "-n", ns, "qdisc", "add", "dev", veth, "root", "netem", "delay",
                   f"{self.delay_us}us"]
            proc = _run(cmd, check=False)
            if proc.returncode != 0:
                why = proc.stderr.strip() or f"exit status {proc.returncode}"
                self.netem_error = f"`{' '.join(cmd)}`: {why}"
                for ns_, veth_ in zip(self.namespaces, self.veths):  # both ends alike: no delay at all
                    _run([self.tc, "-n", ns_, "qdisc", "del", "dev", veth_, "root"], check=False)
                self.qdiscs.clear()
                return
            shown = _run([self.tc, "-n", ns, "qdisc", "show", "dev", veth], check=False).stdout.strip()
            self.qdiscs.append(f"{ns}: {shown}")
        self.applied_delay_us = self.delay_us

    def _do(self, cmd: list[str], what: str) -> None:
        try:
            _run(cmd)
        except subprocess.CalledProcessError as e:
            why = e.stderr.strip() or f"exit status {e.returncode}"
            raise Skip(f"could not create {what}: `{' '.join(cmd)}`: {why}") from e
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Skip(f"could not create {what}: `{' '.join(cmd)}`: {e}") from e

    def destroy(self) -> list[str]:
        """Remove every object made, in reverse; what is still there after (empty when clean)."""
        for kind, name in reversed(self._created):
            if kind == "qdisc":
                ns, veth = name.split(":")
                _run([self.tc, "-n", ns, "qdisc", "del", "dev", veth, "root"], check=False)
            elif kind == "veth":  # in the root namespace if it never moved, else in its namespace
                _run([self.ip, "link", "del", name], check=False)
                for ns in self.namespaces:
                    _run([self.ip, "-n", ns, "link", "del", name], check=False)
            else:
                _run([self.ip, "netns", "del", name], check=False)
        self._created.clear()
        left = [ns for ns in self.namespaces if ns in list_netns(self.ip)]
        left += [veth for veth in self.veths
                 if _run([self.ip, "link", "show", veth], check=False).returncode == 0]
        return left


# ----------------------------------------------------------------------------- the job


# what a launcher around this script (or the caller's shell) set, which must not leak into the job
_DROPPED = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "SYNCBN_SHM", "SYNCBN_HOST", "GLOO_SOCKET_IFNAME"})
_DROPPED_PREFIXES = ("MALLOC_", "TORCHELASTIC_", "OMPI_", "PMIX_", "PMI_")


def worker_env(host: str, veth: str) -> dict[str, str]:
    """One pretend host's environment: its SYNCBN_HOST, gloo on its veth, 1 thread, glibc's malloc."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_PREFIXES) and k not in _DROPPED}
    env.update(SYNCBN_HOST=host, GLOO_SOCKET_IFNAME=veth, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    return env


def torchrun_command(ns: str, node_rank: int, port: int, worker_args: list[str], ip: str) -> list[str]:
    local = Path(sys.executable).parent / "torchrun"
    run = [str(local)] if local.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [ip, "netns", "exec", ns, *run, "--nnodes", "2", "--nproc_per_node", str(RANKS_PER_HOST),
            "--node_rank", str(node_rank), "--master_addr", ADDRESSES[0], "--master_port", str(port),
            str(WORKER), *worker_args]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a launcher we started and its ranks (its own session), politely then not."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            with contextlib.suppress(ProcessLookupError):  # ranks that outlived their launcher
                os.killpg(proc.pid, signal.SIGKILL)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


def run_job(hosts: PretendHosts, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """Both torchruns, one per namespace; rank 0's JSON, or a failure status. Never hangs: after
    ``args.timeout`` seconds, or as soon as one side fails, both are stopped."""
    worker_args = ["--rounds", str(args.rounds), "--calls", str(args.calls),
                   "--net-rounds", str(args.net_rounds), "--warmup", str(args.warmup),
                   "--batch", str(args.batch), "--channels", str(args.channels)]
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        try:
            for node, (ns, veth, host) in enumerate(zip(hosts.namespaces, hosts.veths, HOST_NAMES)):
                cmd = torchrun_command(ns, node, args.master_port, [*worker_args, "--result", str(result)],
                                       hosts.ip)
                say(f"{host}: {' '.join(Path(a).name if os.sep in a else a for a in cmd)}")
                procs.append(subprocess.Popen(cmd, env=worker_env(host, veth), stdout=sys.stderr,
                                              start_new_session=True))
            deadline = time.monotonic() + args.timeout
            while any(p.poll() is None for p in procs):
                if any(p.returncode not in (None, 0) for p in procs):
                    codes = [p.returncode for p in procs]
                    return {"status": f"failed: a torchrun exited with {codes} (the other was stopped)"}
                if time.monotonic() > deadline:
                    return {"status": f"failed: timed out after {args.timeout:.0f} s"}
                time.sleep(0.2)
            codes = [p.returncode for p in procs]
            if any(codes) or not result.exists():
                return {"status": f"failed: exit status {codes}" + ("" if result.exists() else ", no result")}
            doc: dict[str, Any] = json.loads(result.read_text())
            return doc
        finally:
            with signals_deferred() as seen:  # a second signal must not leave ranks running
                for p in procs:
                    _kill_group(p)
            if seen:
                raise Interrupted(signal.Signals(seen[0]).name)


# ----------------------------------------------------------------------------- report


def _us(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e6:.0f}"


def _x(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _aa_verdict(ratio: Optional[float]) -> str:
    if ratio is None:
        return "n/a"
    return "ok" if abs(ratio - 1) <= AA_TOLERANCE else f"**too noisy** (more than {AA_TOLERANCE:.0%} off 1)"


def _delay_text(meta: dict[str, Any]) -> str:
    applied, asked = meta.get("applied_delay_us", 0), meta["delay_us"]
    if applied:
        return f"netem delay {applied} us on each end (so {2 * applied} us per round trip)"
    if asked:
        why = meta.get("netem_error") or "unknown"
        return (f"**no delay added**: netem is not available here ({why}), so the hosts "
                f"are joined by a bare veth; the model below also adds the requested {asked} us "
                f"to every cross-host step, on paper")
    return "no delay added (--delay-us 0)"


def render(doc: dict[str, Any]) -> str:
    meta, res = doc["meta"], doc["result"]
    la_b, la_a = meta["load_before"], meta.get("load_after", [float("nan")] * 3)
    out = ["# syncbn beyond one host: flat vs hierarchical allreduce on 2 pretend hosts x 2 ranks", "",
           f"{meta['date']}, syncbn at {meta['git']}, torch {meta['torch']}, {meta['cpu']}, "
           f"{meta['cores']} cores (the 4 ranks share them); `{meta['command']}`.", "",
           f"Hosts: 2 network namespaces joined by a veth pair, {_delay_text(meta)}; gloo over the veth, "
           f"static rendezvous, SYNCBN_HOST=hostA / hostB, 1 thread per rank. Load average (1, 5, 15 min): "
           f"{la_b[0]:.2f} {la_b[1]:.2f} {la_b[2]:.2f} before the run, "
           f"{la_a[0]:.2f} {la_a[1]:.2f} {la_a[2]:.2f} after."
           f"{' Quick run: few rounds, not for reading.' if meta['quick'] else ''}", ""]
    if res.get("status") != "ok":
        return "\n".join([*out, f"**The job failed**: {res.get('status')}", ""])
    comms = res["communicators"]
    out += ["Communicators (class on every rank, repr on rank 0):", ""]
    for name, d in comms.items():
        same = "" if d["same_on_every_rank"] else " **(not the same class on every rank)**"
        out.append(f"- {name}: `{d['class']}`{same}: `{d['repr']}`")
    default_is_flat = comms["default"]["class"] == comms["flat"]["class"]
    if default_is_flat:
        out += ["", "syncbn's default resolved to the same class as flat: on this code a group that spans "
                "hosts is served by one flat gloo allreduce, so `default` vs `flat` is a second A/A "
                "comparison, and `hier (emulated)` stands in for the hierarchical scheme."]
    out.append("")
    a = res["allreduce"]
    flat = a["flat"]["median_s"]

    def row(name: str) -> list[str]:
        e = a[name]
        return [name, str(e["ranks"]), _us(e["median_s"]), _us(e["p10_s"]), _us(e["p90_s"]),
                _us(e["round_mean_median_s"]), _x(e["median_s"] / flat)]

    header = ["allreduce", "ranks", "median us", "p10 us", "p90 us", "round mean us", "/ flat"]
    aa = a["flat (A/A)"]["median_s"] / flat
    out += [f"## (a) One allreduce of {res['values']} float64 values ({meta['rounds']} rounds x "
            f"{meta['calls']} calls)", "",
            "Per call, the slowest rank's wall time; the median, 10th and 90th percentiles over all calls, "
            "and the median over rounds of each round's mean (the slow tail included).", "",
            _table(header, [row(n) for n in CONTENDERS]), "",
            f"A/A: flat (A/A) / flat = {_x(aa)}, {_aa_verdict(aa)}.", "",
            "Calibration of the hop model, timed in the same rounds: gloo allreduces within 2-rank subgroups "
            "(both pairs at once), and a shared-memory allreduce among the ranks of each host.", "",
            _table(header, [row(n) for n in CALIBRATION]), ""]
    net = res.get("network")
    if net:
        c = net["contenders"]
        base = c["syncbn flat"]["median_s"]
        resolved = res.get("network_communicators", {})
        rows = [[name, resolved.get(name, "none (unsynchronized)"), f"{e['median_s'] * 1e3:.1f}",
                 _x(e["median_s"] / base), f"{e.get('collectives_per_step', 0):.0f}"]
                for name, e in c.items() if e]
        aa_net = c["syncbn flat (A/A)"]["median_s"] / base
        out += [f"## (b) Training step, {res['network_name']}, {net['batch']} images per rank "
                f"({meta['net_rounds']} rounds)", "",
                "The network benchmark's step (zero_grad, forward, cross-entropy, backward, SGD step; DDP "
                "over gloo across the hosts), contenders interleaved, the slowest rank's step, median over "
                "rounds.", "",
                _table(["contender", "layers' communicator", "median ms", "/ syncbn flat",
                        "syncbn allreduces/step"], rows), "",
                f"A/A: syncbn flat (A/A) / syncbn flat = {_x(aa_net)}, {_aa_verdict(aa_net)}.", ""]
    out += render_model(doc)
    return "\n".join(out)


def render_model(doc: dict[str, Any]) -> list[str]:
    meta, res = doc["meta"], doc["result"]
    a = res["allreduce"]
    costs = costs_from(a)
    # the requested delay that netem could not add, added to every cross-host step on paper
    extra_us = meta["delay_us"] - meta.get("applied_delay_us", 0)
    wire = costs._replace(cross_s=costs.cross_s + extra_us * 1e-6)
    out = ["## Model of sequential hops", "",
           "An allreduce of a small buffer is latency-bound: its time is the number of sequential steps "
           "times the cost of one step. Assumptions: every step of a given kind costs the same (one message "
           "latency plus gloo's per-step software cost; the bytes are too few for bandwidth to count); "
           "steps do not overlap, and concurrent messages do not slow one another; ranks are numbered host "
           "by host; a shared-memory synchronization costs what it costs among this run's 2 ranks per host, "
           "whatever the number of ranks per host; the hierarchical scheme is 2 such synchronizations "
           "(sum in, hand back) around one allreduce among the H host leaders.", "",
           "Costs measured in (a): one step within a host over TCP "
           f"t_L = {_us(costs.local_s)} us (half a 2-rank allreduce on one host), one step across hosts "
           f"t_X = {_us(costs.cross_s)} us (half a 2-rank allreduce across the veth), one shared-memory "
           f"allreduce t_shm = {_us(costs.shm_s)} us. t_X - t_L = {_us(costs.cross_s - costs.local_s)} us, "
           f"against {meta.get('applied_delay_us', 0)} us of netem delay per one-way message."
           + (f" With the requested wire delay added on paper, t_X + {extra_us} us = "
              f"{_us(wire.cross_s)} us." if extra_us else ""), "",
           "Counts: a ring allreduce (gloo's) takes 2(W-1) steps; its last message has travelled 2(W-1) "
           "consecutive links, of which those between hosts count as t_X (ranks host by host: H of the W "
           "links cross), the others t_L; 'every step across hosts' is the back-of-envelope 2(W-1) t_X. "
           "Recursive doubling: log2 R steps within hosts, log2 H across. Hierarchical: 2 t_shm + "
           "2(H-1) t_X for a leaders' ring (log2 H t_X for doubling).", ""]
    rows = []
    for r, rw in zip(hop_model_rows(costs), hop_model_rows(wire)):
        measured = ""
        if r.measured_as and (r.hosts, r.per_host) == (len(res["topology"]["hosts"]), RANKS_PER_HOST):
            m = a[r.measured_as]["median_s"]
            measured = f"{_us(m)} ({r.measured_as}; model/measured {r.seconds / m:.2f})"
        rows.append([f"{r.hosts} x {r.per_host}", r.scheme, str(r.hops.cross), str(r.hops.local),
                     str(r.hops.shm), _us(r.seconds), *([_us(rw.seconds)] if extra_us else []), measured])
    header = ["hosts x ranks", "scheme", "steps across", "steps within (TCP)", "shm syncs", "model us",
              *([f"model us, +{extra_us} us wire"] if extra_us else []), "measured us"]
    out += [_table(header, rows), ""]
    default_class = res["communicators"]["default"]["class"]
    if default_class != res["communicators"]["flat"]["class"]:
        out += [f"syncbn's default ({default_class}) measured "
                f"{_us(a['default']['median_s'])} us per allreduce.", ""]
    net = res.get("network")
    if net and net["contenders"].get("syncbn flat"):
        n = net["contenders"]["syncbn flat"].get("collectives_per_step")
        if n:
            by = {(r.hosts, r.per_host, r.scheme): r.seconds for r in hop_model_rows(costs)}
            by_wire = {(r.hosts, r.per_host, r.scheme): r.seconds for r in hop_model_rows(wire)}
            parts = []
            for hosts, per_host in MODEL_LAYOUTS:
                key_f, key_h = (hosts, per_host, FLAT_RING), (hosts, per_host, HIER_RING)
                text = f"{hosts} x {per_host}: flat {by[key_f] * n * 1e3:.1f} ms, hierarchical " \
                       f"{by[key_h] * n * 1e3:.1f} ms"
                if extra_us:
                    text += (f" (+{extra_us} us wire: {by_wire[key_f] * n * 1e3:.1f} and "
                             f"{by_wire[key_h] * n * 1e3:.1f} ms)")
                parts.append(text)
            c = net["contenders"]
            measured = (c["syncbn flat"]["median_s"] - c["syncbn hier (emulated)"]["median_s"]) * 1e3
            modelled = (by[(2, 2, FLAT_RING)] - by[(2, 2, HIER_RING)]) * n * 1e3
            out += [f"Per training step, syncbn issues {n:.0f} allreduces ({res['network_name']}), which "
                    f"wait in sequence: by the model, {'; '.join(parts)} of waiting per step (DDP's gradient "
                    f"allreduce not included). On 2 x 2, syncbn flat minus syncbn hier (emulated) measured "
                    f"{measured:.1f} ms per step; the model's difference is {modelled:.1f} ms.", ""]
    return out


# ----------------------------------------------------------------------------- main


def _torch_version() -> str:
    # this process never imports torch or syncbn: the ranks import the checkout's
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": _torch_version(),
            "cpu": cpu_name(), "cores": os.cpu_count(), "git": git_state(), "delay_us": args.delay_us,
            "rounds": args.rounds, "calls": args.calls, "net_rounds": args.net_rounds, "warmup": args.warmup,
            "batch": args.batch, "quick": args.quick, "load_before": list(os.getloadavg()),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)

    def say(line: str) -> None:
        print(f"[bench_hosts] {line}", file=sys.stderr, flush=True)

    try:
        tools = check_privileges(args.pretend_unprivileged)
    except Skip as e:
        print(f"bench_hosts: skipped: {e}")
        return 0
    hosts = PretendHosts(tools["ip"], tools["tc"], args.delay_us, str(os.getpid()))
    result: dict[str, Any] = {"status": "not run"}
    meta = _meta(args)
    left: list[str] = []
    try:
        with signals_unwind():
            try:
                remove_stale(hosts.ip, say)
                hosts.create(say)
                if hosts.netem_error and args.require_netem:
                    raise Skip(f"netem is not available (--require-netem): {hosts.netem_error}")
                result = run_job(hosts, args, say)
            finally:
                with signals_deferred() as seen:
                    left = hosts.destroy()
                    say("removed the namespaces, the veth pair and the qdiscs"
                        + (f"; STILL PRESENT: {', '.join(left)}" if left else ""))
                if seen:
                    raise Interrupted(signal.Signals(seen[0]).name)
    except Skip as e:
        print(f"bench_hosts: skipped: {e}")
        return 0
    except Interrupted as e:
        print(f"bench_hosts: interrupted ({e}); cleaned up" + (f" except {', '.join(left)}" if left else ""),
              file=sys.stderr)
        return 130
    meta["load_after"] = list(os.getloadavg())
    meta.update(qdiscs=hosts.qdiscs, applied_delay_us=hosts.applied_delay_us, netem_error=hosts.netem_error)
    doc = {"meta": meta, "result": result}
    report = render(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(report)
    print(f"wrote {args.out / 'results.md'}, results.json", file=sys.stderr)
    return 0 if result.get("status") == "ok" and not left else 1


if __name__ == "__main__":
    sys.exit(main())
