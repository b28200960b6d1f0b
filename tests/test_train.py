"""scripts/train.py end to end, each run a subprocess with a timeout.

* mpirun, 4 ranks, the default 2 epochs: the --check replica (plain
  BatchNorm2d on the global batches, one process) matches, the held-out
  accuracy target is met, and the --save checkpoint loads into the plain
  network in one process with the same accuracy;
* torchrun, 4 ranks, a few steps: the --check replica matches;
* negative control: with --comm local (no synchronization) the replica does
  not match, so the parity check can fail;
* the same --seed gives the same run (in this process: one process needs no launcher);
* syncbn.launch.init_process_group_from_mpi under mpirun, called twice.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest

from launch import job_env, mpiexec_command, run_job, torchrun_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
TIMEOUT = 300  # seconds per run; a hung collective fails the test instead of the CI job
PARITY = 1e-4

CHECK = re.compile(r"^check: epoch (\d+) max \|loss - reference\| = (\S+)$", re.M)
FINAL = re.compile(r"^final: accuracy=(\S+) correct=(\d+)/(\d+) world_size=(\d+) comm=(\w+) ", re.M)
EVAL = re.compile(r"^eval: accuracy=(\S+) correct=(\d+)/(\d+) ", re.M)
EPOCH = re.compile(r"^epoch \d+: loss=\S+ held-out accuracy=\S+", re.M)


def _run(cmd: list[str]) -> str:
    """Run ``cmd`` from the repository root; its stdout, or a failure with both streams."""
    job = run_job(cmd, TIMEOUT, job_env(PYTHONUNBUFFERED="1"), separate_stderr=True)
    if job.returncode != 0:
        status = "timed out" if job.returncode is None else f"exit status {job.returncode}"
        pytest.fail(f"{status}: {' '.join(cmd)}\nstdout:\n{job.output}\nstderr:\n{job.stderr[-5000:]}")
    return job.output


def _mpirun(n: int, *args: str) -> str:
    return _run([*mpiexec_command(n), str(SCRIPT), "--no-progress", *args])


def _torchrun(n: int, *args: str) -> str:
    return _run([*torchrun_command(n), str(SCRIPT), "--no-progress", *args])


def _parity(out: str, epochs: int) -> list[float]:
    gaps = [float(g) for _, g in CHECK.findall(out)]
    assert len(gaps) == epochs, f"expected {epochs} check lines (got {len(gaps)}):\n{out}"
    return gaps


def _final(out: str) -> tuple[float, int, int, int, str]:
    m = FINAL.search(out)
    assert m is not None, f"no final: line in the output:\n{out}"
    acc, correct, total, world_size, comm = m.groups()
    return float(acc), int(correct), int(total), int(world_size), comm


@pytest.fixture(scope="module")
def train_script() -> ModuleType:
    """scripts/train.py imported as a module."""
    spec = importlib.util.spec_from_file_location("syncbn_train_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def in_process(train_script: ModuleType, no_launcher: None, monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """Run the script's main() here, as a plain one-process run; returns its stdout."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))  # restored afterwards
    threads = torch.get_num_threads()

    def run(*args: str) -> str:
        capsys.readouterr()
        try:
            train_script.main(["--no-progress", *args])
        finally:
            torch.set_num_threads(threads)
        return capsys.readouterr().out

    return run


@pytest.fixture(scope="module")
def mpirun_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The main job: 4 ranks under mpirun, the default 2 epochs, with --check and --save."""
    checkpoint = tmp_path_factory.mktemp("train") / "digits.pt"
    return _mpirun(4, "--check", "--save", str(checkpoint)), checkpoint


@pytest.mark.launcher
def test_mpirun_matches_single_process_replica(mpirun_run: tuple[str, Path]) -> None:
    out, _ = mpirun_run
    gaps = _parity(out, epochs=2)
    assert max(gaps) < PARITY, out
    acc, _, _, world_size, comm = _final(out)
    assert (world_size, comm) == (4, "mpi"), out
    assert acc >= 0.90, f"held-out accuracy after 2 epochs below the 0.90 target:\n{out}"


@pytest.mark.launcher
def test_checkpoint_evaluates_in_one_process_with_plain_batchnorm(
        mpirun_run: tuple[str, Path], train_script: ModuleType, in_process: Callable[..., str]) -> None:
    import torch

    out, checkpoint = mpirun_run
    _, correct, total, _, _ = _final(out)
    # the checkpoint's keys are exactly those of the network built with torch.nn.BatchNorm2d
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    plain = train_script.build_model()
    assert any(type(m) is torch.nn.BatchNorm2d for m in plain.modules())
    assert set(state) == set(plain.state_dict())

    evaluated = in_process("--load", str(checkpoint), "--eval-only")
    m = EVAL.search(evaluated)
    assert m is not None, evaluated
    assert (int(m.group(2)), int(m.group(3))) == (correct, total), f"training run:\n{out}\nevaluation:\n{evaluated}"


@pytest.mark.launcher
def test_torchrun_matches_single_process_replica() -> None:
    out = _torchrun(4, "--check", "--epochs", "2", "--max-steps", "8")
    gaps = _parity(out, epochs=2)
    assert max(gaps) < PARITY, out
    _, _, _, world_size, comm = _final(out)
    assert (world_size, comm) == (4, "shm"), out   # the default on one host


@pytest.mark.launcher
def test_unsynchronized_batchnorm_fails_the_check() -> None:
    # Negative control: each rank normalizing its own shard of 8 must differ
    # from the replica, or the parity tests above could not fail.
    out = _mpirun(2, "--check", "--comm", "local", "--epochs", "1", "--max-steps", "3")
    gap, = _parity(out, epochs=1)
    assert gap > 100 * PARITY, out


def test_same_seed_same_run(in_process: Callable[..., str]) -> None:
    runs = [in_process("--epochs", "1", "--max-steps", "20", "--seed", seed) for seed in ("3", "3", "4")]
    lines = [EPOCH.findall(out) + [f"{_final(out)[:3]}"] for out in runs]
    assert lines[0] == lines[1], runs
    assert lines[0] != lines[2], runs


LAUNCH_WORKER = """
import torch, torch.distributed as dist
from mpi4py import MPI
from syncbn.launch import init_process_group_from_mpi
rank, size = init_process_group_from_mpi("gloo")
assert (rank, size) == (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size())
assert (dist.get_rank(), dist.get_world_size()) == (rank, size)
assert init_process_group_from_mpi("gloo") == (rank, size)  # already up: checked, not restarted
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
assert t.item() == size * (size + 1) / 2, t
dist.destroy_process_group()
print(f"launch ok {rank}/{size}")
"""


@pytest.mark.launcher
def test_init_process_group_from_mpi() -> None:
    out = _run([*mpiexec_command(2), "-c", LAUNCH_WORKER])
    assert sorted(re.findall(r"^launch ok (\d)/2$", out, re.M)) == ["0", "1"], out
