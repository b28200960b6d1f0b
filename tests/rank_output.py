"""What ranks report, in a form a test can read and compare across ranks.

Used by the workers that mpiexec and torchrun start (tests/*_worker.py) and by
the tests that compare the ranks' errors.
"""
from __future__ import annotations

import os
import re
import sys


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
