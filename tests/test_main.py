"""``python -m syncbn``: the report and ``--check``, in one process and under both launchers.

The commands run as subprocesses (own session, timeout: tests/launch.py).
The check's own failure detection is tested in-process with communicators
that drop or corrupt the reduction, so that a passing check means something.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional

import pytest
import torch

from launch import Job, job_env, mpiexec_command, run_job, torchrun_command
from simulated import SimulatedCommunicator, run_ranks

import syncbn
from syncbn import diagnose
from syncbn.comm import Communicator, Launcher, LocalCommunicator

TIMEOUT = 240  # seconds per job: two ranks share two busy cores here
TITLES = ("syncbn", "versions", "launcher", "torch.distributed", "communicator", "environment")
CHECK_LINE = re.compile(
    r"^check rank (\d+) of (\d+): communicator (\S+), host \S+, median ([\d.]+) us "
    r"\((\d+) calls of (\d+) float64\), sum (ok|FAILED: .*)$", re.MULTILINE)
LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK",
                 "PMIX_SIZE", "PMIX_RANK", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def parse_report(output: str) -> dict[str, dict[str, str]]:
    """The text report as section -> key -> value; every section must appear exactly once."""
    sections: dict[str, dict[str, str]] = {}
    current: Optional[dict[str, str]] = None
    for line in output.splitlines():
        if line in TITLES:
            assert line not in sections, f"section {line!r} printed twice:\n{output}"
            current = sections[line] = {}
        elif line.startswith("  ") and current is not None:
            key, _, value = line[2:].partition(": ")
            current[key] = value
        else:
            current = None
    assert list(sections) == list(TITLES), f"sections {list(sections)}:\n{output}"
    return sections


def check_lines(output: str) -> dict[int, re.Match[str]]:
    """rank -> its check line (each rank must print exactly one)."""
    lines: dict[int, re.Match[str]] = {}
    for match in CHECK_LINE.finditer(output):
        rank = int(match.group(1))
        assert rank not in lines, f"rank {rank} printed two check lines:\n{output}"
        lines[rank] = match
    return lines


def finished(job: Job) -> str:
    assert job.returncode is not None, job.describe()
    assert job.returncode == 0, job.describe()
    return job.output


# --- one process -----------------------------------------------------------------------

def test_report_in_one_process() -> None:
    job = run_job([sys.executable, "-m", "syncbn"], TIMEOUT)
    report = parse_report(finished(job))
    info = syncbn.build_info()
    assert report["syncbn"]["version"] == syncbn.__version__ == info["version"]
    assert report["syncbn"]["compile_flags"] == info["compile_flags"]
    assert report["syncbn"]["kernel_variant"] == info["kernel_variant"]
    assert report["syncbn"]["openmp"] == ("yes" if info["openmp"] else "no")
    assert report["syncbn"]["cython_checks"] == ("yes" if info["cython_checks"] else "no")
    assert report["launcher"] == {"name": "none", "rank": "0", "size": "1"}
    assert report["torch.distributed"]["initialized"] == "no"
    assert report["communicator"]["process_group=None"].startswith("local:")
    # no MPI launcher: mpi4py.MPI is not imported, which would initialize MPI
    assert report["versions"]["MPI library"].startswith("not queried")
    assert report["environment"]["OMP_NUM_THREADS"] == "1"  # tests/launch.py's job_env
    assert not check_lines(job.output)


def test_check_in_one_process() -> None:
    job = run_job([sys.executable, "-m", "syncbn", "--check"], TIMEOUT)
    parse_report(finished(job))
    lines = check_lines(job.output)
    assert list(lines) == [0], job.describe()
    _, size, name, _, calls, values, status = lines[0].groups()
    assert (size, name, status) == ("1", "local", "ok")
    assert (int(calls), int(values)) == (50, diagnose.CHECK_VALUES)


def test_json_with_check() -> None:
    job = run_job([sys.executable, "-m", "syncbn", "--json", "--check", "--calls", "7"], TIMEOUT)
    output = finished(job)
    document = json.loads(output.strip().splitlines()[-1])
    assert list(document["report"]) == list(TITLES)
    assert document["report"]["launcher"]["name"] == "none"
    build = document["report"]["syncbn"]
    assert build.pop("location") == os.path.dirname(os.path.abspath(syncbn.__file__))
    assert build == syncbn.build_info()
    check = document["check"]
    assert (check["rank"], check["size"], check["communicator"], check["calls"]) == (0, 1, "local", 7)
    assert check["ok"] is True and check["wrong_calls"] == 0 and check["problem"] == ""


def test_mpi_flag_queries_the_library() -> None:
    pytest.importorskip("mpi4py")
    job = run_job([sys.executable, "-m", "syncbn", "--mpi"], TIMEOUT)
    library = parse_report(finished(job))["versions"]["MPI library"]
    assert "queried: --mpi" in library and "MPI " in library, library


def test_bad_calls_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        diagnose.main(["--check", "--calls", "0"])
    assert exit_info.value.code == 2
    assert "--calls: expected a positive number (got 0)" in capsys.readouterr().err


# --- the check can fail ------------------------------------------------------------------

class DroppedReduction(Communicator):
    """Claims ``size`` ranks but leaves every buffer as it is: a reduction that never happened."""

    name = "dropped"

    def __init__(self, rank: int, size: int) -> None:
        super().__init__()
        self._rank, self._size = rank, size

    def _allreduce(self, buf: torch.Tensor) -> None:
        pass


class HalfReduction(SimulatedCommunicator):
    """Sums only the first half of each buffer (the rest stays this rank's own)."""

    def _allreduce(self, buf: torch.Tensor) -> None:
        half = buf[: buf.numel() // 2].clone()
        super()._allreduce(half)
        buf[: buf.numel() // 2] = half


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


def test_check_passes_on_simulated_ranks() -> None:
    results = run_ranks(3, lambda rank, comm: diagnose.run_check(comm, launcher_size=3, calls=4))
    assert [(r.rank, r.size, r.ok, r.wrong_calls) for r in results] == [
        (0, 3, True, 0), (1, 3, True, 0), (2, 3, True, 0)]


def test_check_fails_when_the_reduction_is_dropped() -> None:
    result = diagnose.run_check(DroppedReduction(0, 2), calls=3)
    assert not result.ok and result.wrong_calls == diagnose.WARMUP_CALLS + 3
    assert "expected [3, 6, 9, ...] (got [1, 2, 3, ...])" in result.problem
    assert "sum FAILED" in diagnose.format_check(result)


def test_check_fails_when_part_of_the_buffer_is_reduced() -> None:
    def half(rank: int, comm: SimulatedCommunicator) -> diagnose.CheckResult:
        broken = HalfReduction(comm.world, rank)
        return diagnose.run_check(broken, calls=2)

    results = run_ranks(2, half)
    assert all(not r.ok and r.wrong_calls == diagnose.WARMUP_CALLS + 2 for r in results)


def test_check_fails_when_the_launcher_started_more_ranks() -> None:
    # e.g. mpi4py built against another MPI than the mpirun: every rank alone
    result = diagnose.run_check(LocalCommunicator(), launcher_size=2, calls=1)
    assert not result.ok and result.wrong_calls == 0
    assert "the communicator has 1 rank(s) but the launcher started 2" in result.problem


def test_main_exits_non_zero_on_a_wrong_sum(no_launcher: None, capfd: pytest.CaptureFixture[str]) -> None:
    assert diagnose.main(["--check", "--calls", "2"], communicator=DroppedReduction(0, 2)) == 1
    out = capfd.readouterr().out
    parse_report(out)
    (line,) = check_lines(out).values()
    assert line.group(3) == "dropped" and line.group(7).startswith("FAILED: 7 of 7 sums wrong")
    # and the same command with a communicator that reduces passes
    assert diagnose.main(["--check", "--calls", "2"], communicator=LocalCommunicator()) == 0
    assert "sum ok" in capfd.readouterr().out


def test_only_rank_0_prints_the_report_unless_all_ranks(
        no_launcher: None, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    # rank 1 of a torchrun job, before init_process_group (nothing is initialized without --check)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert diagnose.main([]) == 0
    assert capfd.readouterr().out == ""
    assert diagnose.main(["--all-ranks"]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert lines and all(line.startswith("[rank 1] ") for line in lines)
    report = parse_report("\n".join(line[len("[rank 1] "):] for line in lines))
    assert report["launcher"] == {"name": "torchrun", "rank": "1", "size": "2", "LOCAL_RANK": "1"}


class BrokenCollective(Communicator):
    """An allreduce that raises, as a collective whose peer died does."""

    name = "broken"

    def _allreduce(self, buf: torch.Tensor) -> None:
        raise RuntimeError("connection reset by peer")


def test_main_reports_a_failed_collective(no_launcher: None, capfd: pytest.CaptureFixture[str]) -> None:
    assert diagnose.main(["--check"], communicator=BrokenCollective()) == 1
    out = capfd.readouterr().out
    assert "check rank 0 of 1: FAILED before a sum: RuntimeError: connection reset by peer\n" in out


# --- the pieces of the report ------------------------------------------------------------

@pytest.mark.parametrize("launcher, imported, requested, expected", [
    (Launcher("none", 1, 0), False, False, None),
    (Launcher("torchrun", 2, 0), False, False, None),
    (Launcher("none", 1, 0), False, True, "--mpi"),
    (Launcher("none", 1, 0), True, False, "mpi4py.MPI was already imported"),
    (Launcher("mpirun", 1, 0), False, False, "an MPI launcher started this process"),
])
def test_mpi_query_reason(launcher: Launcher, imported: bool, requested: bool,
                          expected: Optional[str]) -> None:
    assert diagnose.mpi_query_reason(launcher, imported, requested) == expected


def test_communicator_section_under_torchrun() -> None:
    torchrun = Launcher("torchrun", 4, 1)
    entries = diagnose.communicator_section(torchrun, None, True, 2, False).entries
    assert entries["process_group=None"].startswith("local:")
    assert entries["after init_process_group"].startswith("shm:")
    assert "2 of 4 ranks on this host" in entries["after init_process_group"]
    assert "init_process_group before the first forward" in entries["warning"]
    assert "problem" not in entries  # mpi4py is not needed here
    # SYNCBN_SHM=0, torch.distributed initialized
    entries = diagnose.communicator_section(torchrun, 4, False, None, False).entries
    assert entries["process_group=None"].startswith("torch:") and "SYNCBN_SHM" in entries["process_group=None"]
    assert "warning" not in entries and entries["SYNCBN_SHM"] == "shared memory off"


def test_communicator_section_under_mpirun_without_mpi4py() -> None:
    entries = diagnose.communicator_section(Launcher("mpirun", 2, 0), None, True, 2, False).entries
    assert entries["process_group=None"].startswith("mpi:")
    assert "mpi4py is not installed" in entries["problem"]
    assert entries["after init_process_group_from_mpi"].startswith("shm:")


# --- under the launchers, two ranks ------------------------------------------------------

def _check_ranks(output: str, communicator: str) -> None:
    lines = check_lines(output)
    assert sorted(lines) == [0, 1], output
    for match in lines.values():
        assert match.group(2) == "2" and match.group(3) == communicator, match.group(0)
        assert match.group(7) == "ok", match.group(0)


@pytest.mark.launcher
def test_mpiexec_two_ranks() -> None:
    job = run_job([*mpiexec_command(2), "-m", "syncbn", "--check"], TIMEOUT)
    output = finished(job)
    report = parse_report(output)  # printed once: by rank 0
    assert (report["launcher"]["name"], report["launcher"]["size"]) == ("mpirun", "2")
    assert "queried: an MPI launcher started this process" in report["versions"]["MPI library"]
    assert report["communicator"]["process_group=None"].startswith("mpi:")
    assert report["communicator"]["after init_process_group_from_mpi"].startswith("shm:")
    _check_ranks(output, "mpi")


@pytest.mark.launcher
@pytest.mark.parametrize("shm, communicator", [("", "shm"), ("0", "torch")])
def test_torchrun_two_ranks(shm: str, communicator: str) -> None:
    command = [*torchrun_command(2), "-m", "syncbn", "--check"]
    env = job_env()
    env.pop("SYNCBN_SHM", None)
    if shm:
        env["SYNCBN_SHM"] = shm
    job = run_job(command, TIMEOUT, env)
    output = finished(job)
    report = parse_report(output)
    assert (report["launcher"]["name"], report["launcher"]["size"]) == ("torchrun", "2")
    assert report["versions"]["MPI library"].startswith("not queried")
    assert report["torch.distributed"]["initialized"] == "no"  # the report comes before --check
    assert report["communicator"]["process_group=None"].startswith("local:")
    assert report["communicator"]["after init_process_group"].startswith(f"{communicator}:")
    _check_ranks(output, communicator)
