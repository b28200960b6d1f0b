"""What ranks report, in a form a test can read and compare across ranks.

Used by the workers that mpiexec and torchrun start (tests/*_worker.py) and by
the tests that compare the ranks' errors.
"""
from __future__ import annotations

import os
import re
import sys
from typing import NoReturn


def say(line: str) -> None:
    """Print ``line`` in one write(2): the ranks share the launcher's pipe, and a
    write below PIPE_BUF bytes is never interleaved with another rank's
    (print() writes the text and the newline separately when unbuffered)."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def normalized(exc: BaseException) -> str:
    """The message without the parts that name the reporting rank and its layer."""
    text = re.sub(r"on rank \d+ of \d+", "on rank * of *", str(exc))
    return re.sub(r"^SyncBatchNorm\(\d+\)", "SyncBatchNorm(*)", text)


def leave(code: int | None) -> NoReturn:
    """End this rank with exit status ``code`` (None: 0) without finalizing Python.

    torch's gloo threads outlive ``destroy_process_group()`` and may still be
    handing the last collective's tensors back to Python; once the interpreter
    is finishing, that aborts the rank now and then ("terminate called without
    an active exception") after every check has passed. MPI, when this rank
    initialized it, is finalized first.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
