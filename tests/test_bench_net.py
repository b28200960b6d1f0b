"""scripts/bench_net.py: the networks, the floor contender, and a quick run end to end (no timing assertions)."""
from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import syncbn  # noqa: E402
from _net_modes import EXPECTED_FUSED, MODES, add_lockstep_floor, build_contenders, count_fused  # noqa: E402
from _net_worker import Served, page_faults, train_step  # noqa: E402
from networks import NETWORKS, count_batchnorms  # noqa: E402

BENCH_NET = SCRIPTS / "bench_net.py"


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_has_its_batchnorms_and_output_shape(name: str) -> None:
    spec = NETWORKS[name]
    model = spec.build(spec.num_classes)
    assert count_batchnorms(model) == spec.batchnorms
    assert all(type(m) is torch.nn.BatchNorm2d for m in model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    out = model(torch.randn(spec.batch, 3, spec.image_size, spec.image_size))
    assert out.shape == (spec.batch, spec.num_classes)


def test_stated_batchnorm_counts() -> None:
    assert {n: s.batchnorms for n, s in NETWORKS.items()} == {"resnet20": 21, "mobilenet_v2": 52, "resnet18": 20}


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_floor_issues_two_allreduces_per_batchnorm_per_step(name: str) -> None:
    spec = NETWORKS[name]
    comm = syncbn.get_communicator("local")
    model = add_lockstep_floor(spec.build(spec.num_classes), comm)
    assert count_batchnorms(model) == spec.batchnorms
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, spec.image_size, spec.image_size)
    labels = torch.randint(0, spec.num_classes, (2,))
    for step in range(1, 3):
        train_step(model, optimizer, x, labels)
        assert comm.calls == 2 * spec.batchnorms * step


def test_contenders_start_from_the_same_weights() -> None:
    torch.manual_seed(0)
    base = NETWORKS["resnet20"].build(10)
    built = build_contenders(base, [m for m in MODES if m != "fairscale"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        outs = {name: model.eval()(x) for name, model in built.items()}
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["torch"], msg=name)
    # each contender is its own copy
    assert built["torch"].fc.weight is not built["torch (A/A)"].fc.weight


@pytest.mark.parametrize("name", list(NETWORKS))
def test_fused_contender_fuses_the_expected_batchnorms(name: str) -> None:
    spec = NETWORKS[name]
    torch.manual_seed(0)
    base = spec.build(spec.num_classes)
    built = build_contenders(base, ["torch", "syncbn fused"])
    fused = built["syncbn fused"]
    assert isinstance(fused, torch.fx.GraphModule)  # the networks trace: residual adds fuse too
    assert count_fused(fused) == EXPECTED_FUSED[name]
    assert count_fused(build_contenders(base, ["syncbn"])["syncbn"]) == 0
    assert list(fused.state_dict()) == list(base.state_dict())
    x = torch.randn(2, 3, spec.image_size, spec.image_size)
    torch.testing.assert_close(fused(x), built["torch"](x), atol=1e-4, rtol=1e-4)


def test_page_faults_counts_the_first_write_of_new_memory() -> None:
    pages = 256
    memory = mmap.mmap(-1, pages * mmap.PAGESIZE)  # anonymous: no page is backed until written
    try:
        before = page_faults()
        for page in range(pages):
            memory[page * mmap.PAGESIZE] = 1
        after = page_faults()
        for page in range(pages):  # written again: backed now, no fault
            memory[page * mmap.PAGESIZE] = 2
        again = page_faults()
    finally:
        memory.close()
    assert after - before >= pages
    assert again - after < pages // 4


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(BENCH_NET), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.launcher  # its two-process settings run under mpiexec and torchrun
def test_quick_run_writes_every_contender_ratio_and_chart(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "net"
    proc = _run(["--quick", "--rounds", "1", "--settings", "local,mpirun2,torchrun2", "--networks", "resnet20",
                 "--out", str(out)], timeout=400)
    assert (out / "step_times.png").stat().st_size > 0
    doc = json.loads((out / "results.json").read_text())
    assert {s: r["status"] for s, r in doc["settings"].items()} == {
        "local": "ok", "mpirun2": "ok", "torchrun2": "ok"}, proc.stderr[-4000:]
    for name, res in doc["settings"].items():
        assert res["world_size"] == (1 if name == "local" else 2)
        net = res["networks"]["resnet20"]
        ran = {m for m, entry in net["contenders"].items() if entry is not None}
        expected = set(MODES) if _has_fairscale() else set(MODES) - {"fairscale"}
        assert ran == expected, name
        for entry in (net["contenders"][m] for m in ran):
            assert entry["median_s"] > 0 and len(entry["samples_s"]) == 1
            assert entry["page_faults_per_step"] >= 0
        assert set(net["ratios"]) == {"syncbn/torch", "floor/torch", "syncbn/floor", "fused/torch", "fused/floor",
                                      "fairscale/syncbn", "no BN/torch", "A/A"}
        assert net["ratios"]["A/A"] > 0 and isinstance(net["too_noisy"], bool)
        # the floor met the other ranks twice per batch norm per step, and so
        # did syncbn, but for the one process alone, which has no one to meet
        assert net["contenders"]["floor"]["collectives_per_step"] == 2 * 21
        expected_syncbn = 0 if name == "local" else 2 * 21
        assert net["contenders"]["syncbn"]["collectives_per_step"] == expected_syncbn
        assert net["contenders"]["syncbn fused"]["collectives_per_step"] == expected_syncbn
        assert net["contenders"]["syncbn fused"]["fused_batchnorms"] == 19
    assert res["clock"].startswith("wall")
    assert doc["settings"]["local"]["clock"].startswith("thread CPU")
    assert {t["verdict"] for t in doc["targets"]} <= {"PASS", "MISS", "n/a"}
    assert "A/A local resnet20" in proc.stdout and "## Targets" in proc.stdout
    assert "Page faults per step" in proc.stdout
    assert "batch norms fused in syncbn fused: resnet20 19 of 21" in proc.stdout
    assert "resnet20: syncbn fused: 19 of 21 batch norms fused" in proc.stderr


def test_separate_setting_runs_every_contender_in_a_process_of_its_own(tmp_path: Path) -> None:
    out = tmp_path / "net"
    proc = _run(["--quick", "--rounds", "2", "--copies", "2", "--settings", "separate",
                 "--networks", "resnet20", "--out", str(out)], timeout=400)
    doc = json.loads((out / "results.json").read_text())
    res = doc["settings"]["separate"]
    assert res["status"] == "ok" and res["world_size"] == 1, proc.stderr[-4000:]
    assert res["clock"].startswith("thread CPU")
    net = res["networks"]["resnet20"]
    ran = {m: entry for m, entry in net["contenders"].items() if entry is not None}
    assert set(ran) == (set(MODES) if _has_fairscale() else set(MODES) - {"fairscale"})
    pids = {p["pid"] for entry in ran.values() for p in entry["processes"]}
    assert len(pids) == 2 * len(ran) and not pids & {os.getpid()}
    for entry in ran.values():  # the steps of its two processes, two rounds each
        assert entry["median_s"] > 0 and len(entry["samples_s"]) == 4 and entry["page_faults_per_step"] >= 0
        assert len(entry["processes"]) == 2 and all(p["median_s"] > 0 for p in entry["processes"])
    assert ran["floor"]["collectives_per_step"] == 2 * 21
    assert ran["syncbn"]["collectives_per_step"] == 0
    assert ran["syncbn fused"]["fused_batchnorms"] == 19
    assert net["ratios"]["syncbn/torch"] > 0 and isinstance(net["too_noisy"], bool)
    separate = [t for t in doc["targets"] if t["target"].startswith("separate processes: ")]
    assert len(separate) == 8
    assert {t["verdict"] for t in separate if "resnet20" in t["target"]} <= {"PASS", "MISS"}
    assert "A/A separate resnet20" in proc.stdout


def test_a_contender_process_that_ends_is_reported_not_waited_for() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    process.wait()
    ended = r"contender 'syncbn' ended \(exit status 3\) when asked to 'step'"
    with pytest.raises(RuntimeError, match=ended):
        Served("syncbn", process, {}).ask("step")


def test_serve_takes_one_contender() -> None:
    command = [sys.executable, str(SCRIPTS / "_net_worker.py"), "--serve", "--launcher", "local",
               "--label", "x", "--result", os.devnull, "--networks", "resnet20", "--modes", "torch", "syncbn",
               "--rounds", "1", "--warmup", "0"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert ("--serve: expected one --modes and one --networks (got ['torch', 'syncbn'], ['resnet20'])"
            in proc.stderr)


@pytest.mark.parametrize("cold", [False, True], ids=["warm", "cold"])
def test_layers_mode_reports_forward_and_backward(tmp_path: Path, cold: bool) -> None:
    out = tmp_path / "layers"
    proc = _run(["--layers", "--quick", "--rounds", "1", "--out", str(out), *(["--cold"] if cold else [])],
                timeout=200)
    doc = json.loads((out / "layers.json").read_text())
    assert doc["cold"] is cold
    assert len(doc["layers"]) == 6
    for res in doc["layers"].values():
        assert set(res) == {"torch", "torch (A/A)", "floor", "syncbn", "empty Function", "kernels alone"}
        assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in res.values())
    assert len(doc["targets"]) == 12 and "## Targets" in proc.stdout
    assert all(t["bound"] > 0 and isinstance(t["reachable"], bool) for t in doc["targets"])
    assert ("cold: one call at a time" in proc.stdout) is cold


def test_cold_needs_layers() -> None:
    proc = subprocess.run([sys.executable, str(BENCH_NET), "--cold"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--cold: expected it with --layers" in proc.stderr


def test_bad_settings_are_refused() -> None:
    proc = subprocess.run([sys.executable, str(BENCH_NET), "--settings", "local,slurm2"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "expected a comma-separated list" in proc.stderr and "slurm2" in proc.stderr


def _has_fairscale() -> bool:
    try:
        import fairscale  # noqa: F401
    except ImportError:
        return False
    return True
