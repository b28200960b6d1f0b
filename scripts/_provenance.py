"""What a benchmark report records about where it ran: the checkout and the CPU.

Imports nothing heavy, so a launcher that never imports torch can use it.
"""
from __future__ import annotations

import contextlib
import platform
import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def git_state() -> str:
    """The checkout measured: commit, and whether the working tree differed from it."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=CHECKOUT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
