"""Multi-process tests: tests/dist_worker.py on 4 ranks under mpiexec and under torchrun.

Each launcher is started once per session (start-up of 4 ranks costs seconds),
as a subprocess in its own session with a timeout, so a hung collective
kills the whole job instead of the test run. The worker runs every case and
prints ``rank R case NAME ok ...`` per rank; each case below is one test that
checks all four ranks said ok. The case names are listed here, apart from
the worker, so a case the worker stops running shows up as a failure.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from launch import Job, mpiexec_command, run_job, torchrun_command

RANKS = 4
TIMEOUT = 300      # seconds per launch; 4 ranks share 2 busy cores here
TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "dist_worker.py"

BN_CASES = [
    "equal_nchw_f32",
    "equal_nchw_f64",
    "uneven_channels_last_f32",
    "uneven_channels_last_f64",
    "uneven_5d_f32",
    "uneven_5d_f64",
    "size1_2d_f64",
    "size1_3d_l1_f32",
    "empty_shard_nchw_f64",
    "empty_shard_2d_f32",
    "empty_shard_channels_last_3d_f64",
    "subgroup_nchw_f64",
    "subgroup_channels_last_f32",
    "fused_relu_residual_nchw_f32",
    "fused_silu_channels_last_f64",
    "fused_relu6_residual_5d_f32",
    "fused_leaky_negative_empty_shard_2d_f64",
    "python_path_uneven_channels_last_f32",
    "python_path_size1_2d_f64",
    "python_path_fused_silu_residual_nchw_f64",
    "global_count_one",
    "all_empty",
    "collective_count",
    "gradcheck",
]
MPI_CASES = BN_CASES + ["comm_world_nchw_f32"]
TORCH_CASES = BN_CASES + ["world_group_nchw_f32", "ddp"]

LINE = re.compile(r"^rank (\d+) case (\S+) (ok|FAIL)\b(.*)$", re.MULTILINE)


def _results(job: Job) -> dict[str, dict[int, tuple[str, str]]]:
    """case -> rank -> (status, rest of the line)."""
    out: dict[str, dict[int, tuple[str, str]]] = {}
    for rank, case, status, rest in LINE.findall(job.output):
        out.setdefault(case, {})[int(rank)] = (status, rest.strip())
    return out


@pytest.fixture(scope="module")
def mpi_launch() -> Job:
    return run_job([*mpiexec_command(RANKS), str(WORKER), "mpi"], TIMEOUT)


@pytest.fixture(scope="module")
def torch_launch() -> Job:
    return run_job([*torchrun_command(RANKS), str(WORKER), "torch"], TIMEOUT)


def _check_launch(launch: Job) -> None:
    assert launch.returncode == 0, launch.describe()
    done = re.findall(r"^rank (\d+) done failed=0$", launch.output, re.MULTILINE)
    assert sorted(map(int, done)) == list(range(RANKS)), launch.describe()


def _check_case(launch: Job, case: str) -> None:
    per_rank = _results(launch).get(case, {})
    bad = {r: per_rank.get(r, ("missing", "")) for r in range(RANKS)}
    bad = {r: v for r, v in bad.items() if v[0] != "ok"}
    if bad:
        lines = "\n".join(f"  rank {r}: {status} {rest}" for r, (status, rest) in bad.items())
        pytest.fail(f"case {case} not ok on {len(bad)} rank(s):\n{lines}\n\n"
                    + launch.describe(tail=40))


@pytest.mark.launcher
def test_mpi_launch(mpi_launch: Job) -> None:
    _check_launch(mpi_launch)


@pytest.mark.launcher
@pytest.mark.parametrize("case", MPI_CASES)
def test_mpi(mpi_launch: Job, case: str) -> None:
    _check_case(mpi_launch, case)


@pytest.mark.launcher
def test_torchrun_launch(torch_launch: Job) -> None:
    _check_launch(torch_launch)


@pytest.mark.launcher
@pytest.mark.parametrize("case", TORCH_CASES)
def test_torchrun(torch_launch: Job, case: str) -> None:
    _check_case(torch_launch, case)


def test_worker_runs_exactly_the_listed_cases() -> None:
    # the worker's own tables, read without starting any process group
    sys.path.insert(0, str(TESTS))
    try:
        import dist_worker
    finally:
        sys.path.remove(str(TESTS))
    for kind, expected in (("mpi", MPI_CASES), ("torch", TORCH_CASES)):
        names = list(dist_worker.BN_CASES[kind]) + list(dist_worker.OTHER_CASES[kind])
        assert sorted(names) == sorted(expected), kind
