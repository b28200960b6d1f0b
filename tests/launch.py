"""Running mpiexec / torchrun jobs from pytest, so that nothing can hang forever.

Each job runs in a session of its own; at the timeout the whole process
group (the launcher and every rank it started) is killed and the test gets
what the job had printed.
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

REPO = Path(__file__).resolve().parent.parent

# What a launcher sets per rank: a pytest run that is itself inside a job
# must not hand its own rank to the jobs it starts.
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_RANK_PREFIXES = ("OMPI_COMM_WORLD", "PMI_", "PMIX_", "TORCHELASTIC_")


def tool(name: str) -> Optional[str]:
    """``name`` next to this Python (the venv's bin), else on PATH, else None."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def job_env(**extra: str) -> dict[str, str]:
    """Environment for a job: the repo importable, one thread per rank, normal mode."""
    env = {k: v for k, v in os.environ.items()
           if k not in _RANK_VARS and not k.startswith(_RANK_PREFIXES)}
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


def run_job(cmd: list[str], timeout: float, env: Optional[dict[str, str]] = None,
            separate_stderr: bool = False) -> Job:
    """Run ``cmd`` from the repository root with a timeout; never raises on failure."""
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
