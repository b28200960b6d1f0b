"""Debug mode: ranks that disagree get the same error on every rank, in place of a hang
or silently wrong statistics (docs/debugging.md).

Ranks are simulated with threads (tests/simulated.py) for each mistake;
tests/debug_worker.py then runs the mistakes under ``mpiexec`` and
``torchrun``: with debug mode (every rank raises the same error, and the job
then ends when one rank fails between forward and backward), and without it
(what docs/debugging.md says happens then).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from launch import Job, mpiexec_command, run_job, torchrun_command
from rank_output import normalized
from simulated import CollectiveMismatch, RankGone, SimulatedCommunicator, run_ranks
from syncbn import SyncBatchNorm


# --- simulated ranks -----------------------------------------------------------------------

def debug_mistakes() -> dict[str, tuple[Callable[[int, Any], None], list[str]]]:
    """Scenario -> (what rank r does, lines the error must contain); rank 1 is the odd one."""
    def num_features(rank: int, comm: Any) -> None:
        bn = SyncBatchNorm(4 + (rank == 1), process_group=comm, debug=True)
        bn(torch.randn(2, bn.num_features, 3))

    def eval_one_rank(rank: int, comm: Any) -> None:
        bn = SyncBatchNorm(4, process_group=comm, debug=True)
        bn(torch.randn(2, 4, 3))                        # a good step first
        bn.train(rank != 1)
        bn(torch.randn(2, 4, 3))

    def skip_then_other_layer(rank: int, comm: Any) -> None:
        bn1 = SyncBatchNorm(3, process_group=comm, debug=True)
        bn2 = SyncBatchNorm(5, process_group=comm, debug=True)
        if rank != 1:
            bn1(torch.randn(2, 3))
        bn2(torch.randn(2, 5))

    def skip_then_next_step(rank: int, comm: Any) -> None:
        bn1 = SyncBatchNorm(3, process_group=comm, debug=True)
        bn2 = SyncBatchNorm(5, process_group=comm, debug=True)
        with torch.no_grad():
            for step in range(2):
                bn1(torch.randn(2, 3))
                if not (rank == 1 and step == 0):
                    bn2(torch.randn(2, 5))

    def wrong_channels(rank: int, comm: Any) -> None:
        bn = SyncBatchNorm(4, process_group=comm, debug=True)
        bn(torch.randn(2, 3 if rank == 1 else 4, 2, 2))

    def integer_input(rank: int, comm: Any) -> None:
        bn = SyncBatchNorm(4, process_group=comm, debug=True)
        bn(torch.ones(2, 4, dtype=torch.int32) if rank == 1 else torch.ones(2, 4))

    def one_dim_input(rank: int, comm: Any) -> None:
        bn = SyncBatchNorm(4, process_group=comm, debug=True)
        bn(torch.randn(4) if rank == 1 else torch.randn(2, 4))

    return {
        "num_features": (num_features, ["num_features: 4 on ranks [0, 2], 5 on ranks [1]"]),
        "eval": (eval_one_rank, ["training: train on ranks [0, 2], eval on ranks [1]"]),
        "skip_then_other_layer": (skip_then_other_layer,
                                  ["num_features: 3 on ranks [0, 2], 5 on ranks [1]"]),
        "skip_then_next_step": (skip_then_next_step,
                                ["num_features: 5 on ranks [0, 2], 3 on ranks [1]"]),
        "wrong_channels": (wrong_channels, ["input channels: 4 on ranks [0, 2], 3 on ranks [1]"]),
        "integer_input": (integer_input,
                          ["input dtype: torch.float32 on ranks [0, 2], "
                           "not floating point on ranks [1]"]),
        "one_dim_input": (one_dim_input, ["input channels: 4 on ranks [0, 2], -1 on ranks [1]"]),
    }


def assert_same_debug_error(results: list[Any], lines: list[str]) -> None:
    for rank, r in enumerate(results):
        assert isinstance(r, RuntimeError) and not isinstance(r, (RankGone, CollectiveMismatch)), \
            (rank, type(r).__name__, r)
        assert f"on rank {rank} of 3" in str(r)
        assert normalized(r) == normalized(results[0]), rank
        for line in lines:
            assert line in str(r), (line, str(r))


@pytest.mark.parametrize("scenario", list(debug_mistakes()))
def test_debug_mode_same_error_on_every_rank(scenario: str) -> None:
    fn, lines = debug_mistakes()[scenario]
    assert_same_debug_error(run_ranks(3, fn, return_exceptions=True, timeout=30), lines)


def test_debug_mode_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCBN_DEBUG", "1")
    fn, lines = debug_mistakes()["eval"]

    def no_flag(rank: int, comm: Any) -> None:
        bn = SyncBatchNorm(4, process_group=comm)
        assert bn.debug
        bn.train(rank != 1)
        bn(torch.randn(2, 4, 3))

    assert_same_debug_error(run_ranks(3, no_flag, return_exceptions=True, timeout=30), lines)


def test_debug_mode_costs_one_collective_and_changes_nothing() -> None:
    x = torch.randn(6, 3, 4)

    def fn(rank: int, comm: SimulatedCommunicator) -> tuple[Any, ...]:
        plain = SyncBatchNorm(3, process_group=comm)
        checked = SyncBatchNorm(3, process_group=comm, debug=True)
        out = []
        for bn in (plain, checked):
            start = comm.calls
            y = bn(x[2 * rank:2 * rank + 2])
            mid = comm.calls
            bn.eval()
            bn(x[2 * rank:2 * rank + 2])
            out.append((y, mid - start, comm.calls - mid))
        return tuple(out)

    for (y_plain, f_plain, e_plain), (y_dbg, f_dbg, e_dbg) in run_ranks(3, fn):
        assert torch.equal(y_plain, y_dbg)
        assert (f_plain, e_plain, f_dbg, e_dbg) == (1, 0, 2, 1)


def test_debug_mode_skip_between_layers_of_equal_width() -> None:
    def fn(rank: int, comm: Any) -> None:
        bn1 = SyncBatchNorm(4, process_group=comm, debug=True)
        bn2 = SyncBatchNorm(4, process_group=comm, debug=True)
        with torch.no_grad():
            for step in range(2):
                if not (rank == 1 and step == 0):
                    bn1(torch.randn(2, 4))
                bn2(torch.randn(2, 4))

    res = run_ranks(3, fn, return_exceptions=True, timeout=30)
    assert_same_debug_error(res, ["ranks [0, 2]", "on ranks [1]"])


def test_debug_mode_skip_before_backward() -> None:
    def fn(rank: int, comm: Any) -> None:
        torch.manual_seed(rank)
        bn1 = SyncBatchNorm(3, process_group=comm, debug=True)
        conv = torch.nn.Conv1d(3, 5, 1)
        bn2 = SyncBatchNorm(5, process_group=comm, debug=True)
        h = conv(bn1(torch.randn(2, 3, 4, requires_grad=True)))
        if rank != 1:
            h = bn2(h)
        h.square().sum().backward()

    res = run_ranks(3, fn, return_exceptions=True, timeout=30)
    assert_same_debug_error(res, ["ranks [0, 2]", "on ranks [1]"])


def test_debug_mode_cannot_see_a_rank_one_whole_step_behind() -> None:
    """The limit of any per-call check: one layer, rank 1 skips step 0 and is then a step
    behind, so every check pairs call k with call k; the job hangs at the last collective
    (here: RankGone). Documented in the README."""
    def fn(rank: int, comm: Any) -> None:
        bn = SyncBatchNorm(4, process_group=comm, debug=True)
        with torch.no_grad():
            for step in range(3):
                if not (rank == 1 and step == 0):
                    bn(torch.randn(2, 4))

    res = run_ranks(3, fn, return_exceptions=True, timeout=30)
    assert res[1] is None and isinstance(res[0], RankGone) and isinstance(res[2], RankGone)


# --- real launchers: debug scenarios, then a failing rank -----------------------------------

WORKER = Path(__file__).resolve().parent / "debug_worker.py"
LAUNCH_RANKS = 3
LAUNCH_TIMEOUT = 240        # whole launch; 3 ranks start torch on 2 busy cores
ABORT_WITHIN = 60.0         # from the failing rank's raise to the launcher's exit

WORKER_SCENARIOS = {
    "num_features": "num_features: 4 on ranks [0, 2], 5 on ranks [1]",
    "eval": "training: train on ranks [0, 2], eval on ranks [1]",
    "skip": "num_features: 3 on ranks [0, 2], 5 on ranks [1]",
    "channels": "input channels: 4 on ranks [0, 2], 3 on ranks [1]",
    "dtype": "input dtype: torch.float32 on ranks [0, 2], not floating point on ranks [1]",
    "one_dim": "input channels: 4 on ranks [0, 2], -1 on ranks [1]",
}


def _check_debug_run(job: Job) -> None:
    out = job.output
    tail = "\n".join(out.splitlines()[-60:])
    assert job.returncode is not None, f"launch timed out after {LAUNCH_TIMEOUT} s:\n{tail}"
    for name, line in WORKER_SCENARIOS.items():
        messages = {}
        for rank in range(LAUNCH_RANKS):
            m = re.search(rf"^rank {rank} scenario {name} (.*)$", out, re.MULTILINE)
            assert m, f"rank {rank} printed no result for scenario {name}:\n{tail}"
            messages[rank] = m.group(1)
        assert len(set(messages.values())) == 1, (name, messages)
        assert messages[0].startswith("raised RuntimeError: "), (name, messages[0])
        assert line in messages[0], (name, line, messages[0])
    for rank in range(LAUNCH_RANKS):
        assert re.search(rf"^rank {rank} scenario clean ok$", out, re.MULTILINE), tail
    failing = re.search(r"^rank 1 failing at ([0-9.]+)$", out, re.MULTILINE)
    assert failing, tail
    assert "not aborted" not in out
    assert job.returncode != 0, f"the job exited 0 although rank 1 raised:\n{tail}"
    elapsed = job.ended - float(failing.group(1))
    assert elapsed < ABORT_WITHIN, f"job took {elapsed:.0f} s to end after rank 1 failed"


@pytest.mark.launcher
def test_mpiexec_debug_scenarios_and_failing_rank() -> None:
    cmd = [*mpiexec_command(LAUNCH_RANKS), str(WORKER), "debug"]
    _check_debug_run(run_job(cmd, LAUNCH_TIMEOUT))


@pytest.mark.launcher
def test_torchrun_debug_scenarios_and_failing_rank() -> None:
    cmd = [*torchrun_command(LAUNCH_RANKS), str(WORKER), "debug"]
    _check_debug_run(run_job(cmd, LAUNCH_TIMEOUT))


# --- real launchers, without debug mode ---------------------------------------------------

MISTAKE_RANKS = 2
STEP_LINE = re.compile(r"^rank (\d+) step (\d+) (ok|WRONG) ", re.MULTILINE)


def _run_mistake(launcher: list[str], name: str) -> Job:
    job = run_job([*launcher, str(WORKER), "mistake", name], LAUNCH_TIMEOUT)
    assert job.returncode is not None, job.describe(tail=40)
    assert job.returncode != 0, f"the job ended well after mistake {name}:\n{job.describe(tail=40)}"
    return job


@pytest.mark.launcher
def test_mpiexec_without_debug_mode_other_num_features_aborts() -> None:
    """MPI refuses the longer buffer (MPI_ERR_TRUNCATE) and ``-m mpi4py`` aborts the job.
    (Rank 1 in eval mode, or skipping a call, would leave rank 0 waiting forever.)"""
    job = _run_mistake(mpiexec_command(MISTAKE_RANKS), "num_features")
    assert "MPI_ERR_TRUNCATE" in job.output, job.describe(tail=40)
    assert not STEP_LINE.search(job.output), job.describe(tail=40)   # at the first collective


@pytest.mark.launcher
def test_torchrun_without_debug_mode_other_num_features_aborts() -> None:
    """gloo kills a rank with SIGABRT at the first collective; torchrun exits non-zero."""
    job = _run_mistake(torchrun_command(MISTAKE_RANKS), "num_features")
    assert "SIGABRT" in job.output, job.describe(tail=40)
    assert not STEP_LINE.search(job.output), job.describe(tail=40)


@pytest.mark.launcher
@pytest.mark.parametrize("name", ["eval", "skip"])
def test_torchrun_without_debug_mode_a_rank_behind_is_silently_wrong(name: str) -> None:
    """Rank 1 in eval mode in step 0, or skipping the layer there: no error, each
    collective pairs two different steps, and every output is wrong; the job
    fails only when rank 1, a step ahead, exits."""
    job = _run_mistake(torchrun_command(MISTAKE_RANKS), name)
    steps = STEP_LINE.findall(job.output)
    assert steps and all(status == "WRONG" for _, _, status in steps), job.describe(tail=40)
    assert {rank for rank, _, _ in steps} == {"0", "1"}, job.describe(tail=40)
    assert re.search(r"^rank 1 finished$", job.output, re.MULTILINE), job.describe(tail=40)
