"""scripts/bench_hosts.py: the hop model, the arguments, the report and the skip path.

No test makes a network namespace: the benchmark itself needs root and runs by hand.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_hosts  # noqa: E402
from bench_hosts import (  # noqa: E402
    HopCosts,
    HopCount,
    doubling_hops,
    hierarchical_hops,
    hop_model_rows,
    parse_args,
    ring_all_cross_hops,
    ring_hops,
)

BENCH_HOSTS = SCRIPTS / "bench_hosts.py"


# ----------------------------------------------------------------------------- the hop model


@pytest.mark.parametrize(("world", "hosts", "expected"), [
    (1, 1, HopCount(0, 0, 0)),
    (4, 1, HopCount(0, 6, 0)),  # one host: every step over loopback
    (2, 2, HopCount(2, 0, 0)),  # one rank per host: every link crosses
    (4, 2, HopCount(3, 3, 0)),  # ring L X L X: 6 consecutive links, half of them across
    (8, 2, HopCount(4, 10, 0)),
    (64, 8, HopCount(16, 110, 0)),  # the whole ring (8 crossings) and 62 more links (8 more)
])
def test_ring_counts_the_crossings_on_the_longest_chain(world: int, hosts: int, expected: HopCount) -> None:
    hops = ring_hops(world, hosts)
    assert hops == expected
    assert hops.cross + hops.local == 2 * (world - 1)  # a ring allreduce takes 2 (W - 1) steps


def test_the_back_of_envelope_ring_crosses_on_every_step() -> None:
    assert ring_all_cross_hops(4, 2) == HopCount(6, 0, 0)
    assert ring_all_cross_hops(64, 8) == HopCount(126, 0, 0)
    assert ring_all_cross_hops(4, 1) == HopCount(0, 6, 0)


def test_recursive_doubling_crosses_log2_hosts() -> None:
    assert doubling_hops(4, 2) == HopCount(1, 1, 0)
    assert doubling_hops(64, 8) == HopCount(3, 3, 0)
    assert doubling_hops(1, 1) == HopCount(0, 0, 0)


def test_hierarchical_counts() -> None:
    assert hierarchical_hops(4, 2) == HopCount(2, 0, 2)
    assert hierarchical_hops(64, 8) == HopCount(14, 0, 2)
    assert hierarchical_hops(64, 8, "doubling") == HopCount(3, 0, 2)
    assert hierarchical_hops(8, 1) == HopCount(0, 0, 1)  # one host: the shared-memory allreduce alone
    with pytest.raises(ValueError, match="leaders"):
        hierarchical_hops(4, 2, "tree")


@pytest.mark.parametrize("layout", [(5, 2), (4, 0), (1, 2)])
def test_uneven_layouts_are_refused(layout: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="as many ranks on every host"):
        ring_hops(*layout)


def test_model_seconds_and_rows() -> None:
    costs = HopCosts(local_s=40e-6, cross_s=100e-6, shm_s=5e-6)
    assert HopCount(3, 3, 0).seconds(costs) == pytest.approx(420e-6)
    rows = {(r.hosts, r.per_host, r.scheme): r for r in hop_model_rows(costs)}
    flat22 = rows[(2, 2, bench_hosts.FLAT_RING)]
    hier22 = rows[(2, 2, bench_hosts.HIER_RING)]
    assert flat22.seconds == pytest.approx(3 * 100e-6 + 3 * 40e-6)
    assert hier22.seconds == pytest.approx(2 * 100e-6 + 2 * 5e-6)
    assert (flat22.measured_as, hier22.measured_as) == ("flat", "hier (emulated)")
    flat88 = rows[(8, 8, bench_hosts.FLAT_RING)]
    hier88 = rows[(8, 8, bench_hosts.HIER_RING)]
    assert flat88.seconds == pytest.approx(16 * 100e-6 + 110 * 40e-6)
    assert hier88.seconds == pytest.approx(14 * 100e-6 + 2 * 5e-6)
    assert {k[:2] for k in rows} == set(bench_hosts.MODEL_LAYOUTS)


def test_costs_come_from_the_calibration() -> None:
    allreduce = {"gloo pair, same host": {"median_s": 80e-6}, "gloo pair, across hosts": {"median_s": 300e-6},
                 "shm, one host": {"median_s": 7e-6}}
    assert bench_hosts.costs_from(allreduce) == HopCosts(40e-6, 150e-6, 7e-6)


# ----------------------------------------------------------------------------- arguments


def test_defaults_and_quick() -> None:
    args = parse_args([])
    assert (args.delay_us, args.rounds, args.calls, args.net_rounds, args.warmup, args.batch) == (
        50, 15, 200, 15, 2, 8)
    assert args.channels == 64 and not args.pretend_unprivileged
    quick = parse_args(["--quick"])
    assert (quick.rounds, quick.calls, quick.net_rounds, quick.warmup, quick.batch) == (3, 20, 2, 1, 2)
    # an explicit value wins over --quick's
    assert parse_args(["--quick", "--rounds", "7", "--delay-us", "0", "--net-rounds", "0"]).rounds == 7
    assert parse_args(["--require-netem"]).require_netem


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--calls", "-1"], ["--delay-us", "-5"], ["--batch", "0"],
                                 ["--net-rounds", "-1"], ["--master-port", "80"], ["--delay-us", "x"]])
def test_bad_arguments_are_refused(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(bad)
    assert e.value.code == 2
    assert "expected" in capsys.readouterr().err or bad[-1] == "x"


# ----------------------------------------------------------------------------- skipping


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH_HOSTS), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_skips_cleanly_when_not_privileged(tmp_path: Path) -> None:
    proc = _run(["--pretend-unprivileged", "--out", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("bench_hosts: skipped: needs root")
    assert not (tmp_path / "out").exists()  # nothing was run, nothing written


def test_skips_cleanly_without_iproute2(tmp_path: Path) -> None:
    # as root with no `ip` / `tc` on PATH; not as root, the root check answers first
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = _run(["--out", str(tmp_path / "out")], env)
    assert proc.returncode == 0, proc.stderr
    expected = "not found" if os.geteuid() == 0 else "needs root"
    assert proc.stdout.startswith("bench_hosts: skipped:") and expected in proc.stdout


def test_check_privileges_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(bench_hosts.Skip, match="needs root"):
        bench_hosts.check_privileges()
    with pytest.raises(bench_hosts.Skip, match="needs root"):
        bench_hosts.check_privileges(pretend_unprivileged=True)


# ----------------------------------------------------------------------------- the report


def _fake_doc(default_class: str) -> dict:
    def entry(us: float, ranks: int = 4) -> dict:
        return {"median_s": us * 1e-6, "round_mean_median_s": us * 1.1e-6, "p10_s": us * 0.9e-6,
                "p90_s": us * 1.3e-6, "round_means_s": [us * 1.1e-6], "ranks": ranks}

    def comm(cls: str) -> dict:
        return {"class": cls, "repr": f"{cls}(rank=0, size=4)", "same_on_every_rank": True}

    def step(ms: float, calls: float = 42.0) -> dict:
        return {"median_s": ms * 1e-3, "samples_s": [ms * 1e-3], "images_per_s": 1.0,
                "collectives_per_step": calls}

    meta = {"date": "2026-12-02T17:00:00", "git": "abc1234", "torch": "2.13.0", "cpu": "a CPU", "cores": 2,
            "command": "python bench_hosts.py", "delay_us": 50, "rounds": 15, "calls": 200, "net_rounds": 15,
            "warmup": 2, "batch": 8, "quick": False, "load_before": [1.0, 1.1, 1.2],
            "load_after": [2.0, 1.5, 1.3], "applied_delay_us": 50, "netem_error": ""}
    result = {"status": "ok", "topology": {"ranks": 4, "hosts": [[0, 1], [2, 3]], "leaders": [0, 2]},
              "values": 129,
              "communicators": {"flat": comm("TorchCommunicator"), "flat (A/A)": comm("TorchCommunicator"),
                                "default": comm(default_class),
                                "hier (emulated)": comm("EmulatedHierarchical")},
              "allreduce": {"flat": entry(600), "flat (A/A)": entry(610), "default": entry(590),
                            "hier (emulated)": entry(300), "gloo pair, same host": entry(80, 2),
                            "gloo pair, across hosts": entry(300, 2), "shm, one host": entry(10, 2)},
              "network_name": "resnet20",
              "network": {"batch": 8, "contenders": {
                  "torch": {"median_s": 0.1, "samples_s": [0.1], "images_per_s": 320.0},
                  "syncbn flat": step(130), "syncbn flat (A/A)": step(131), "syncbn default": step(129),
                  "syncbn hier (emulated)": step(120)}},
              "network_communicators": {"syncbn flat": "TorchCommunicator"}}
    return {"meta": meta, "result": result}


def test_report_names_the_communicators_and_compares_the_model() -> None:
    report = bench_hosts.render(_fake_doc("TorchCommunicator"))
    assert "`TorchCommunicator`" in report and "`EmulatedHierarchical`" in report
    assert "a second A/A" in report  # the default resolved to flat: said so
    assert "flat (A/A) / flat = 1.017, ok" in report
    assert "1.00 1.10 1.20 before the run, 2.00 1.50 1.30 after" in report
    # t_L = 40 us, t_X = 150 us, t_shm = 10 us: flat 2x2 = 3 * 150 + 3 * 40 = 570 us, measured 600
    row = "| 2 x 2 | flat ring (gloo), ranks host by host | 3 | 3 | 0 | 570 | 600 (flat; model/measured 0.95)"
    assert row in report
    assert "| 8 x 8 | hierarchical: shm + leaders' ring + shm | 14 | 0 | 2 | 2120 |" in report
    assert "syncbn flat (A/A) / syncbn flat = 1.008, ok" in report
    assert "netem delay 50 us on each end" in report and "wire" not in report


def test_report_without_netem_adds_the_requested_delay_on_paper() -> None:
    doc = _fake_doc("TorchCommunicator")
    doc["meta"].update(applied_delay_us=0, netem_error="Error: Specified qdisc kind is unknown.")
    report = bench_hosts.render(doc)
    assert "**no delay added**: netem is not available here (Error: Specified qdisc kind is unknown.)" \
        in report
    # t_X + 50 us = 200 us: flat 2x2 = 3 * 200 + 3 * 40 = 720 us beside the measured-cost 570 us
    assert "| 2 x 2 | flat ring (gloo), ranks host by host | 3 | 3 | 0 | 570 | 720 | 600 (flat;" in report
    assert "| model us, +50 us wire |" in report


def test_report_of_a_hierarchical_default_and_of_a_failed_job() -> None:
    report = bench_hosts.render(_fake_doc("HierarchicalCommunicator"))
    assert "a second A/A" not in report
    assert "syncbn's default (HierarchicalCommunicator) measured 590 us per allreduce" in report
    doc = _fake_doc("TorchCommunicator")
    doc["result"] = {"status": "failed: timed out after 900 s"}
    assert "**The job failed**: failed: timed out after 900 s" in bench_hosts.render(doc)
