"""The process side of ``scripts/bench_hosts.py``: one rank of a job that spans pretend hosts.

``bench_hosts.py`` starts one ``torchrun`` per network namespace (a pretend
host), each with ``SYNCBN_HOST`` set to that host's name::

    ip netns exec NS env SYNCBN_HOST=hostA ... torchrun --nnodes 2 --nproc_per_node 2 \\
        --node_rank 0 --master_addr 10.77.0.1 --master_port P scripts/_hosts_worker.py ...

What every rank does, in this order (every collective on every rank alike):

1. Learns the topology: every rank's host identity (``syncbn.comm.shm.host_id``,
   from ``SYNCBN_HOST``), hence its host's ranks and the host leaders (the
   lowest rank of each host), and makes the subgroups below.
2. Resolves the communicators of the contenders through syncbn layers, as a
   user gets them: ``SyncBatchNorm(C, process_group="torch").communicator``
   (flat: one gloo allreduce over all ranks), a second one (the A/A
   control), and ``SyncBatchNorm(C).communicator`` (the default: whatever
   syncbn picks for a group that spans hosts). Their class names and reprs go
   into the results, so the report says what was measured.
3. Builds ``hier (emulated)``: the hierarchical scheme made of syncbn's own
   parts, so that it is measured even before syncbn's default does it: a
   shared-memory allreduce among the ranks of each host, a gloo allreduce
   among the host leaders, and a second shared-memory allreduce that hands
   the leader's total back (the others contribute zeros). Two shared-memory
   synchronizations and one leaders' allreduce, as the real scheme.
4. Calibration, for the hop model: a gloo allreduce between the two ranks of
   one host (loopback TCP), between two ranks on different hosts (across
   the veth, through the netem delay), and a shared-memory allreduce among
   the ranks of one host.
5. Part (a): per-allreduce latency of a ``2C + 1`` float64 buffer through
   each of these, the layer's own call (``allreduce_array_``). Rounds; in a
   round every contender, in an order rotated every round, runs ``calls``
   allreduces after a barrier, each timed alone (wall clock). Each call's
   time is the slowest rank's; reported: the median over all calls, and the
   median over rounds of each round's mean (which includes the slow tail).
6. Part (b): the training step of the network benchmark (``_net_worker``'s
   ``time_network``: same step, same rounds, barrier, rotation and slowest
   rank) with the contenders of :data:`NETWORK_MODES`.

Rank 0 writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import _net_modes  # also puts a source checkout of syncbn on sys.path
from _net_modes import Mode
from _net_worker import WALL, Group, _say, time_network
from networks import NETWORKS
import syncbn
from syncbn.comm import Communicator, SharedMemoryCommunicator, TorchCommunicator, gather_values
from syncbn.comm.shm import host_id

# part (a): the contenders of the table, then the calibration of the hop model
FLAT, FLAT_AA, DEFAULT, EMULATED = "flat", "flat (A/A)", "default", "hier (emulated)"
PAIR_LOCAL, PAIR_CROSS, SHM_HOST = "gloo pair, same host", "gloo pair, across hosts", "shm, one host"
# part (b): the contenders of the training step, by name in _net_modes.MODES
NET_TORCH = "torch"  # torch BN, unsynchronized: the step without any synchronization of BN
NET_FLAT, NET_FLAT_AA, NET_DEFAULT, NET_EMULATED = (
    "syncbn flat", "syncbn flat (A/A)", "syncbn default", "syncbn hier (emulated)")


class EmulatedHierarchical(Communicator):
    """Sum within each host through shared memory, allreduce among one leader per host over
    ``leaders`` (None on the other ranks), hand the total back through shared memory.

    A benchmark's stand-in for the hierarchical allreduce, built from syncbn's
    communicators. The hand-back is a second shared-memory allreduce in which
    the leader contributes the total and every other rank zeros, so every rank
    gets the leader's bits exactly; a dedicated broadcast would cost the same
    one synchronization.
    """

    name = "hier-emulated"

    def __init__(self, intra: SharedMemoryCommunicator, leaders: Optional[Communicator], rank: int,
                 size: int) -> None:
        super().__init__()
        self.intra, self.leaders = intra, leaders
        self._rank, self._size = rank, size

    def _allreduce(self, buf: torch.Tensor) -> None:
        self._allreduce_array(buf.numpy())

    def _allreduce_array(self, buf: np.ndarray) -> None:
        self.intra.allreduce_array_(buf)  # every rank of the host: the host's sum
        if self.leaders is not None:
            self.leaders.allreduce_array_(buf)
        else:
            buf[:] = 0.0
        self.intra.allreduce_array_(buf)

    def __repr__(self) -> str:
        return (f"EmulatedHierarchical(rank={self.rank}, size={self.size}, intra={self.intra!r}, "
                f"leaders={self.leaders!r})")


class Topology:
    """Which rank lives on which host, and the subgroups of the benchmark (made on every rank)."""

    def __init__(self, flat: Communicator) -> None:
        ids = gather_values(flat, [host_id()])[:, 0].tolist()
        order = list(dict.fromkeys(ids))  # hosts in order of their lowest rank
        self.rank, self.size = flat.rank, flat.size
        self.hosts: list[list[int]] = [[r for r, h in enumerate(ids) if h == host] for host in order]
        self.my_host = order.index(ids[self.rank])
        self.leaders = [ranks[0] for ranks in self.hosts]
        if len(self.hosts) < 2 or min(len(r) for r in self.hosts) < 2:
            raise SystemExit(f"_hosts_worker: expected >= 2 hosts with >= 2 ranks each (got {self.hosts})")
        # dist.new_group is a collective of the whole job: every rank makes every group
        self.host_groups = [dist.new_group(ranks) for ranks in self.hosts]
        self.leader_group = dist.new_group(self.leaders)
        # pairs across hosts: the i-th rank of host 0 with the i-th rank of host 1, for the
        # first two hosts; ranks outside them are paired with nobody and idle through it
        pairs = list(zip(self.hosts[0], self.hosts[1]))
        self.cross_groups = {p: dist.new_group(list(p)) for p in pairs}
        self.cross_pair = next((p for p in pairs if self.rank in p), None)

    @property
    def is_leader(self) -> bool:
        return self.rank in self.leaders

    def describe(self) -> dict[str, Any]:
        return {"ranks": self.size, "hosts": self.hosts, "leaders": self.leaders}


class Contender(NamedTuple):
    """One allreduce of part (a): the communicator this rank calls (None: it sits this one out)
    and the ranks of its group (this rank's group, for the calibration's subgroups)."""

    comm: Optional[Communicator]
    members: list[int]


def build_contenders(topo: Topology, channels: int) -> tuple[dict[str, Contender], dict[str, Communicator]]:
    """Part (a)'s contenders, and the communicators shared with part (b) (by contender name)."""
    flat = syncbn.SyncBatchNorm(channels, process_group="torch").communicator
    flat_aa = syncbn.SyncBatchNorm(channels, process_group="torch").communicator
    default = syncbn.SyncBatchNorm(channels).communicator  # may be a collective (shared-memory set-up)
    host_group = topo.host_groups[topo.my_host]
    pair_local = TorchCommunicator(host_group)
    # the hierarchical stand-in's own segment, and a second one for the calibration
    intra = SharedMemoryCommunicator(TorchCommunicator(host_group))
    shm_host = SharedMemoryCommunicator(TorchCommunicator(host_group))
    leaders = TorchCommunicator(topo.leader_group) if topo.is_leader else None
    emulated = EmulatedHierarchical(intra, leaders, topo.rank, topo.size)
    pair_cross = TorchCommunicator(topo.cross_groups[topo.cross_pair]) if topo.cross_pair else None
    everyone, host = list(range(topo.size)), topo.hosts[topo.my_host]
    contenders = {
        FLAT: Contender(flat, everyone), FLAT_AA: Contender(flat_aa, everyone),
        DEFAULT: Contender(default, everyone), EMULATED: Contender(emulated, everyone),
        PAIR_LOCAL: Contender(pair_local, host),
        PAIR_CROSS: Contender(pair_cross, list(topo.cross_pair or [])),
        SHM_HOST: Contender(shm_host, host),
    }
    return contenders, {FLAT: flat, FLAT_AA: flat_aa, DEFAULT: default, EMULATED: emulated}


def check_sums(contenders: dict[str, Contender], rank: int) -> None:
    """Every contender sums over its group: rank r contributes ``(r + 1) * [1, 2, 3]``."""
    for name, c in contenders.items():
        if c.comm is None:
            continue
        pattern = np.array([1.0, 2.0, 3.0])
        buf = pattern * (rank + 1)
        c.comm.allreduce_array_(buf)
        expected = pattern * sum(m + 1 for m in c.members)
        if not np.array_equal(buf, expected):
            raise RuntimeError(f"rank {rank}: {name} summed to {buf.tolist()} (expected {expected.tolist()})")


def time_allreduces(contenders: dict[str, Contender], values: int, rounds: int, calls: int, warmup: int,
                    group: Group, say: Callable[[str], None]) -> dict[str, Any]:
    """Part (a): per-call wall time of each contender's allreduce of ``values`` float64 (slowest rank)."""
    names = list(contenders)
    buf = np.ones(values, dtype=np.float64)
    samples = torch.zeros(len(names), rounds, calls, dtype=torch.float64)

    def block(i: int, out: Optional[torch.Tensor]) -> None:
        comm = contenders[names[i]].comm
        group.barrier()
        if comm is None:
            return
        for c in range(calls):
            buf.fill(1.0)  # outside the timed call: the values stay small
            start = time.perf_counter_ns()
            comm.allreduce_array_(buf)
            if out is not None:
                out[c] = (time.perf_counter_ns() - start) * 1e-9

    for _ in range(warmup):
        for i in range(len(names)):
            block(i, None)
    report_every = max(1, rounds // 5)
    for r in range(rounds):
        for k in range(len(names)):
            i = (r + k) % len(names)
            block(i, samples[i, r])
        if (r + 1) % report_every == 0 or r + 1 == rounds:
            say(f"allreduce: round {r + 1}/{rounds}")
    samples = group.slowest(samples.view(-1)).view(len(names), rounds, calls)
    out: dict[str, Any] = {}
    for i, name in enumerate(names):
        per_call = samples[i].reshape(-1).tolist()
        round_means = samples[i].mean(dim=1).tolist()
        out[name] = {"median_s": statistics.median(per_call),
                     "round_mean_median_s": statistics.median(round_means),
                     "p10_s": float(np.percentile(per_call, 10)), "p90_s": float(np.percentile(per_call, 90)),
                     "round_means_s": round_means, "ranks": len(contenders[name].members)}
    say("allreduce: " + ", ".join(f"{n} {out[n]['median_s'] * 1e6:.0f} us" for n in names))
    return out


def describe_communicators(comms: dict[str, Communicator], flat: Communicator) -> dict[str, Any]:
    """Class name and repr of each named communicator on rank 0, and whether every rank got the same class."""
    out: dict[str, Any] = {}
    for name, comm in comms.items():
        cls = type(comm).__name__
        code = float(zlib.crc32(cls.encode()))
        codes = gather_values(flat, [code])[:, 0]
        out[name] = {"class": cls, "repr": repr(comm), "same_on_every_rank": bool((codes == code).all())}
    return out


def network_modes(
        comms: dict[str, Communicator]) -> tuple[dict[str, Mode], dict[str, list[nn.Module]]]:
    """Part (b)'s contenders as ``_net_modes.Mode`` entries, and where their built models are kept
    (to read the communicators their layers actually resolved, after the run)."""
    built: dict[str, list[nn.Module]] = {}

    def converter(name: str, spec: Any) -> Callable[[nn.Module], nn.Module]:
        def convert(model: nn.Module) -> nn.Module:
            model = syncbn.convert_sync_batchnorm(model, process_group=spec)
            built.setdefault(name, []).append(model)
            return model
        return convert

    modes = {
        NET_FLAT: Mode(converter(NET_FLAT, "torch"), "syncbn, process_group='torch'"),
        NET_FLAT_AA: Mode(converter(NET_FLAT_AA, "torch"), "the same, a second copy: the A/A control"),
        NET_DEFAULT: Mode(converter(NET_DEFAULT, None), "syncbn, process_group=None (the default)"),
        NET_EMULATED: Mode(converter(NET_EMULATED, comms[EMULATED]), "syncbn over EmulatedHierarchical"),
    }
    return modes, built


def layer_communicators(built: dict[str, list[nn.Module]]) -> dict[str, str]:
    """Per network contender, the classes of the communicators its layers resolved."""
    out = {}
    for name, models in built.items():
        classes = sorted({type(m.communicator).__name__ for model in models for m in model.modules()
                          if isinstance(m, syncbn.SyncBatchNorm)})
        out[name] = ", ".join(classes)
    return out


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="bench_hosts.py's worker (one rank of the multi-host job)")
    p.add_argument("--label", default="hosts", help="prefix of progress lines")
    p.add_argument("--result", type=Path, required=True, help="rank 0 writes its JSON here")
    p.add_argument("--channels", type=int, default=64, help="C: the buffer holds 2C + 1 float64 values")
    p.add_argument("--rounds", type=int, required=True, help="rounds of part (a)")
    p.add_argument("--calls", type=int, required=True, help="allreduces per contender per round")
    p.add_argument("--net-rounds", type=int, required=True, help="rounds of part (b); 0: skip it")
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--network", choices=list(NETWORKS), default="resnet20")
    p.add_argument("--batch", type=int, default=8, help="images per rank")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    wall = time.perf_counter()
    dist.init_process_group("gloo")  # torchrun's environment: static rendezvous across the namespaces
    try:
        group = Group(dist.get_rank(), dist.get_world_size())
        say = _say(group, args.label)
        flat_setup = TorchCommunicator()
        topo = Topology(flat_setup)
        say(f"started: {topo.size} ranks on {len(topo.hosts)} hosts {topo.hosts}, leaders {topo.leaders}")
        contenders, comms = build_contenders(topo, args.channels)
        check_sums(contenders, topo.rank)
        communicators = describe_communicators(comms, flat_setup)
        for name, d in communicators.items():
            say(f"communicator of {name}: {d['class']} ({d['repr']})"
                + ("" if d["same_on_every_rank"] else " -- NOT the same class on every rank"))
        allreduce = time_allreduces(contenders, 2 * args.channels + 1, args.rounds, args.calls, args.warmup,
                                    group, say)
        network: Optional[dict[str, Any]] = None
        resolved: dict[str, str] = {}
        if args.net_rounds > 0:
            modes, built = network_modes(comms)
            # the network benchmark builds its contenders from _net_modes.MODES by name:
            # this job's contenders join that table in this process only
            _net_modes.MODES.update(modes)
            names = [NET_TORCH, NET_FLAT, NET_FLAT_AA, NET_DEFAULT, NET_EMULATED]
            network = time_network(args.network, names, args.batch, False, args.net_rounds, args.warmup, WALL,
                                   group, say)
            resolved = layer_communicators(built)
            for name, classes in resolved.items():
                say(f"{name}: its layers resolved {classes}")
        if group.rank == 0:
            doc = {"status": "ok", "topology": topo.describe(), "values": 2 * args.channels + 1,
                   "communicators": communicators, "allreduce": allreduce, "network_name": args.network,
                   "network": network, "network_communicators": resolved, "clock": WALL.name,
                   "wall_s": time.perf_counter() - wall}
            args.result.write_text(json.dumps(doc))
        group.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
