"""Running a benchmark's worker job (one process, or a launcher and its ranks) that returns JSON.

The job gets ``--result PATH`` appended to its command; its rank 0 writes
its results there. The job runs in a session of its own, so on timeout the
launcher and every rank it started are stopped together: a benchmark never
hangs on a stuck collective. A worker ends with :func:`exit_worker`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

__all__ = ["find_launcher", "kill_group", "run_json_job"]


def find_launcher(name: str) -> Optional[str]:
    """``name`` next to the running interpreter (the venv's bin), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def kill_group(proc: "subprocess.Popen[bytes]") -> None:
    """Stop the launcher we started and its workers (its own session), politely then not."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def run_json_job(command: list[str], env: dict[str, str], timeout: float, shown: str) -> dict[str, Any]:
    """Run ``command --result PATH``; the JSON it wrote plus ``"command": shown``, or a failure status.

    The job's output goes to this process's stderr (progress lines).
    """
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.Popen([*command, "--result", str(result)], env=env, stdout=sys.stderr,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return {"status": f"failed: timed out after {timeout:.0f} s", "command": shown}
        if code != 0 or not result.exists():
            return {"status": f"failed: exit status {code}" + ("" if result.exists() else ", no result"),
                    "command": shown}
        return {**json.loads(result.read_text()), "command": shown}


def exit_worker() -> None:
    """End a worker rank after its last collective, without finalizing Python.

    gloo's worker threads live as long as the process group object
    (``destroy_process_group`` does not join them), and one of them may still
    be releasing the last collective's work, whose tensors it hands back to
    Python: once the interpreter is finishing, that aborts the process now and
    then ("terminate called without an active exception"). So the rank
    finalizes MPI itself when it initialized it, flushes its output and leaves
    with status 0.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
