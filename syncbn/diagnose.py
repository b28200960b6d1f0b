"""``python -m syncbn``: what syncbn sees in this process, for debugging a job.

It reports the build, the versions of torch, NumPy, mpi4py and the MPI
library, the launcher, the state of torch.distributed, the communicator
that ``process_group=None`` resolves to and why, and the environment that
steers it all. Run it plainly, under ``mpirun`` (as ``python -m mpi4py -m
syncbn``) or under ``torchrun``, launched as the job is.

Nothing is initialized and no collective is started unless asked:
importing ``mpi4py.MPI`` initializes MPI, so the MPI library is queried
only under an MPI launcher, when mpi4py is already imported, or with
``--mpi``; torch.distributed is initialized only by ``--check``, which
then resolves the real communicator, runs a timed allreduce on every rank
and verifies its sum.

Rank 0 prints the report (every rank with ``--all-ranks``); every rank
prints its own check line. Each line is one ``os.write``, so lines from
several ranks sharing a terminal or pipe never mix (a write to a pipe is
atomic up to ``PIPE_BUF``, 4096 bytes on Linux: every text line is shorter).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from importlib import metadata
from typing import Any

import numpy as np
import torch

from . import _kernels
from ._build_info import build_info
from .comm import Communicator, Launcher, auto_backend, detect_launcher, get_communicator
from .comm.mpi import import_mpi
from .comm.shm import shm_enabled

__all__ = [
    "CheckResult",
    "Section",
    "communicator_section",
    "describe_backend",
    "format_check",
    "format_sections",
    "main",
    "mpi_query_reason",
    "report",
    "run_check",
]

# Launcher variables worth seeing when a job misbehaves (rank and size are
# shown through detect_launcher; these say where the ranks are and meet).
_LAUNCHER_VARS = (
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMIX_NAMESPACE",
    "MPI_LOCALNRANKS",
    "SLURM_JOB_ID",
    "SLURM_NODELIST",
)
# How many ranks share this host, as the launchers say it (torchrun, Open MPI, MPICH).
_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")

WARMUP_CALLS = 5
"""Untimed allreduce calls before the timed ones (connections, first-touch of buffers)."""

CHECK_VALUES = 129
"""float64 values per allreduce in ``--check``: a layer's forward buffer for 64 channels."""


@dataclass(frozen=True)
class Section:
    """One part of the report: a title and its entries (JSON-serializable values)."""

    title: str
    entries: dict[str, Any]


@dataclass(frozen=True)
class CheckResult:
    """One rank's outcome of :func:`run_check`.

    Attributes:
        rank, size: the communicator's.
        communicator: its name (``"shm"``, ``"torch"``, ``"mpi"``, ``"local"``, ...).
        values: float64 values per allreduce.
        calls: timed calls (after the warm-up ones).
        median_us: median latency of the timed calls, in microseconds.
        wrong_calls: calls (warm-up ones included) whose sum was wrong.
        problem: why the check failed, "" when it passed.
    """

    rank: int
    size: int
    communicator: str
    values: int
    calls: int
    median_us: float
    wrong_calls: int
    problem: str

    @property
    def ok(self) -> bool:
        return not self.problem


# --- the report ----------------------------------------------------------------


def mpi_query_reason(launcher: Launcher, mpi_imported: bool, requested: bool) -> str | None:
    """Why this process may import ``mpi4py.MPI`` (which initializes MPI), or None if it may not."""
    if requested:
        return "--mpi"
    if mpi_imported:
        return "mpi4py.MPI was already imported"
    if launcher.name == "mpirun":
        return "an MPI launcher started this process"
    return None


def describe_backend(backend: str, size: int, ranks_here: int | None, shm: bool) -> str:
    """A sentence on what :func:`~syncbn.comm.auto_backend`'s answer means for ``size`` ranks.

    ``ranks_here``: how many of them the launcher put on this host, if it says.
    """
    if backend == "shm":
        where = "" if ranks_here is None else f"; the launcher put {ranks_here} of {size} ranks on this host"
        return (
            f"shm: shared memory if all {size} ranks share a host; across hosts, shared memory on "
            "each host and one allreduce among one leader per host (two levels) when some host "
            "runs several ranks; else torch (decided alike on every rank at the first "
            f"allreduce){where}"
        )
    if backend == "torch":
        why = " (SYNCBN_SHM turns shared memory off)" if size > 1 and not shm else ""
        return f"torch: torch.distributed all_reduce on the default group{why}"
    if backend == "mpi":
        return f"mpi: MPI COMM_WORLD of {size} ranks"
    return "local: this process alone (no synchronization)"


def _ranks_here(environ: Mapping[str, str]) -> int | None:
    for var in _LOCAL_SIZE_VARS:
        try:
            return int(environ[var])
        except (KeyError, ValueError):  # noqa: PERF203 -- a few variables, read once
            continue
    return None


def build_section() -> Section:
    """syncbn's version, place and build (:func:`syncbn.build_info`: compiler, flags, -march,
    OpenMP, Cython checks, kernel variant)."""
    entries: dict[str, Any] = dict(build_info())
    entries["location"] = os.path.dirname(os.path.abspath(__file__))
    return Section("syncbn", entries)


def versions_section(launcher: Launcher, query_mpi: bool) -> Section:
    """Python, torch, NumPy, mpi4py and the MPI library (queried only if allowed)."""
    entries: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    mpi4py_version = _mpi4py_version()
    entries["mpi4py"] = "not installed" if mpi4py_version is None else mpi4py_version
    reason = mpi_query_reason(launcher, "mpi4py.MPI" in sys.modules, query_mpi)
    if mpi4py_version is None:
        entries["MPI library"] = "not queried: mpi4py is not installed"
    elif reason is None:
        entries["MPI library"] = (
            "not queried: importing mpi4py.MPI initializes MPI and no MPI "
            "launcher was detected (--mpi queries it anyway)"
        )
    else:
        try:
            MPI = import_mpi()
            major, minor = MPI.Get_version()
            library = " ".join(MPI.Get_library_version().replace("\x00", "").split())
            entries["MPI library"] = f"{library} (MPI {major}.{minor}; queried: {reason})"
        except Exception as exc:  # a broken MPI installation is what the user needs to see
            entries["MPI library"] = f"import of mpi4py.MPI failed: {type(exc).__name__}: {exc}"
    return Section("versions", entries)


def _mpi4py_version() -> str | None:
    """mpi4py's version without importing it (importing mpi4py.MPI initializes MPI), None if absent."""
    module = sys.modules.get("mpi4py")
    if module is not None:
        return str(getattr(module, "__version__", "unknown"))
    try:
        return metadata.version("mpi4py")
    except metadata.PackageNotFoundError:
        return None


def launcher_section(launcher: Launcher, environ: Mapping[str, str]) -> Section:
    """What :func:`~syncbn.comm.detect_launcher` found, and the launcher variables set."""
    entries: dict[str, Any] = {"name": launcher.name, "rank": launcher.rank, "size": launcher.size}
    entries.update({var: environ[var] for var in _LAUNCHER_VARS if var in environ})
    return Section("launcher", entries)


def distributed_section() -> Section:
    """The state of torch.distributed in this process."""
    import torch.distributed as dist

    available = dist.is_available()
    initialized = available and dist.is_initialized()
    entries: dict[str, Any] = {"available": available, "initialized": initialized}
    if initialized:
        entries.update(backend=str(dist.get_backend()), rank=dist.get_rank(), size=dist.get_world_size())
    elif available:
        entries["note"] = "this command initializes it only for --check, after this report"
    return Section("torch.distributed", entries)


def communicator_section(
    launcher: Launcher,
    torch_world_size: int | None,
    shm: bool,
    ranks_here: int | None,
    mpi4py_installed: bool,
) -> Section:
    """Which communicator ``process_group=None`` resolves to here, without starting a collective.

    Under a launcher of several ranks without torch.distributed, also what
    ``None`` becomes once the script has called ``init_process_group``
    (torchrun) or ``syncbn.init_process_group_from_mpi`` (mpirun).

    Args:
        launcher: what :func:`~syncbn.comm.detect_launcher` found.
        torch_world_size: the size of torch.distributed's default group,
            None when it is not initialized.
        shm: whether ``$SYNCBN_SHM`` allows shared memory.
        ranks_here: how many ranks the launcher put on this host, if it says.
        mpi4py_installed: whether mpi4py can be imported.
    """
    size = launcher.size if torch_world_size is None else torch_world_size
    backend = auto_backend(torch_world_size, launcher, shm)
    entries: dict[str, Any] = {
        "process_group=None": describe_backend(backend, size, ranks_here, shm),
    }
    if backend == "mpi" and not mpi4py_installed:
        entries["problem"] = (
            "mpi4py is not installed: the first forward raises ImportError (pip install 'syncbn[mpi]')"
        )
    if torch_world_size is None and launcher.size > 1:
        after = "init_process_group" if launcher.name == "torchrun" else "init_process_group_from_mpi"
        entries[f"after {after}"] = describe_backend(
            auto_backend(launcher.size, launcher, shm), launcher.size, ranks_here, shm
        )
        if launcher.name == "torchrun":
            entries["warning"] = (
                "under torchrun, None is local until torch.distributed is "
                "initialized: call init_process_group before the first forward"
            )
    entries["SYNCBN_SHM"] = "shared memory allowed" if shm else "shared memory off"
    return Section("communicator", entries)


def environment_section(environ: Mapping[str, str]) -> Section:
    """Threads, host identity and every ``SYNCBN_*`` variable."""
    entries: dict[str, Any] = {
        "host": socket.gethostname(),
        "SYNCBN_HOST": environ.get("SYNCBN_HOST", "unset (shm host identity: host name and boot id)"),
        "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", "unset"),
        "torch threads": torch.get_num_threads(),
        "kernel threads (OpenMP maximum)": _kernels.max_threads(),
    }
    entries.update({k: environ[k] for k in sorted(environ) if k.startswith("SYNCBN_") and k != "SYNCBN_HOST"})
    return Section("environment", entries)


def report(launcher: Launcher, query_mpi: bool = False) -> list[Section]:
    """The whole report for this process; initializes MPI only as :func:`mpi_query_reason` allows."""
    import torch.distributed as dist

    env = os.environ
    torch_world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    return [
        build_section(),
        versions_section(launcher, query_mpi),
        launcher_section(launcher, env),
        distributed_section(),
        communicator_section(
            launcher, torch_world_size, shm_enabled(), _ranks_here(env), _mpi4py_version() is not None
        ),
        environment_section(env),
    ]


def format_sections(sections: Sequence[Section]) -> list[str]:
    """The report as text lines: a title, then ``  key: value`` lines."""
    lines: list[str] = []
    for section in sections:
        lines.append(section.title)
        for key, value in section.entries.items():
            lines.append(f"  {key}: {_shown(value)}")
    return lines


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "-"
    return str(value)


# --- the check -------------------------------------------------------------------


def init_for_check(launcher: Launcher, timeout: float) -> bool:
    """Initialize what the launcher implies: torch.distributed (gloo) under torchrun, MPI under mpirun.

    Returns whether this call initialized torch.distributed (and so should end it).
    """
    if launcher.name == "torchrun":
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
            return True
    elif launcher.name == "mpirun":
        import_mpi()
    return False


def run_check(
    comm: Communicator, launcher_size: int | None = None, calls: int = 50, values: int = CHECK_VALUES
) -> CheckResult:
    """Time ``calls`` allreduces through ``comm`` (after a few untimed ones) and check every sum.

    Rank ``r`` contributes ``(r + 1) * [1, 2, ..., values]``, so every value
    of the sum must be ``size * (size + 1) / 2`` times its position (exact in
    float64): a rank missing, counted twice or with a wrong rank, or a buffer
    reduced in part, shows. Collective: every rank of ``comm`` must call it.

    Args:
        comm: the communicator to check.
        launcher_size: the number of processes the launcher started; a
            communicator of another size fails the check (e.g. mpi4py built
            against another MPI than the ``mpirun`` that started the job, which
            gives every rank a world of its own). None: not checked.
        calls: timed calls (at least 1).
        values: float64 values per call (at least 1).
    """
    if calls < 1 or values < 1:
        raise ValueError(f"run_check: expected calls >= 1 and values >= 1 (got {calls}, {values})")
    positions = torch.arange(1, values + 1, dtype=torch.float64)
    mine = positions * (comm.rank + 1)
    expected = positions * (comm.size * (comm.size + 1) // 2)
    buf = torch.empty_like(positions)
    seconds: list[float] = []
    wrong_calls = 0
    first_wrong: torch.Tensor | None = None
    for call in range(WARMUP_CALLS + calls):
        buf.copy_(mine)
        start = time.perf_counter()
        comm.allreduce_(buf)
        elapsed = time.perf_counter() - start
        if not torch.equal(buf, expected):
            wrong_calls += 1
            if first_wrong is None:
                first_wrong = buf.clone()
        if call >= WARMUP_CALLS:
            seconds.append(elapsed)
    problems = []
    if launcher_size is not None and comm.size != launcher_size:
        problems.append(
            f"the communicator has {comm.size} rank(s) but the launcher started "
            f"{launcher_size} (is mpi4py built against the MPI of this mpirun?)"
        )
    if first_wrong is not None:
        problems.append(
            f"{wrong_calls} of {WARMUP_CALLS + calls} sums wrong: expected "
            f"{_head(expected)} (got {_head(first_wrong)})"
        )
    return CheckResult(
        comm.rank,
        comm.size,
        comm.name,
        values,
        calls,
        statistics.median(seconds) * 1e6,
        wrong_calls,
        "; ".join(problems),
    )


def _head(values: torch.Tensor, n: int = 3) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:n].tolist())
    return f"[{shown}{', ...' if values.numel() > n else ''}]"


def format_check(result: CheckResult) -> str:
    """One rank's check as one line (``sum ok`` or ``sum FAILED: why``)."""
    status = "sum ok" if result.ok else f"sum FAILED: {result.problem}"
    return (
        f"check rank {result.rank} of {result.size}: communicator {result.communicator}, "
        f"host {socket.gethostname()}, median {result.median_us:.1f} us "
        f"({result.calls} calls of {result.values} float64), {status}"
    )


# --- the command -----------------------------------------------------------------


def _write_line(line: str) -> None:
    """One line, in one write where the OS allows (so ranks' lines do not mix)."""
    data = (line + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m syncbn",
        description="Report what syncbn sees in this process: build, versions, launcher, "
        "torch.distributed, the communicator process_group=None resolves to, "
        "environment. Under mpirun run it as 'python -m mpi4py -m syncbn'.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="initialize what the launcher implies, resolve process_group=None "
        "and time a checked allreduce on every rank; exit 1 if a sum is wrong",
    )
    parser.add_argument(
        "--mpi",
        action="store_true",
        help="query the MPI library even without an MPI launcher (importing mpi4py.MPI initializes MPI)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per printing rank")
    parser.add_argument(
        "--all-ranks", action="store_true", help="every rank prints its report (default: rank 0 only)"
    )
    parser.add_argument("--calls", type=int, default=50, help="timed allreduce calls (default: 50)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds torch.distributed waits for the other ranks (default: 120)",
    )
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls: expected a positive number (got {args.calls})")
    return args


def main(argv: Sequence[str] | None = None, communicator: Communicator | None = None) -> int:
    """Print the report (and with ``--check`` the check); return the exit status.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).
        communicator: checked instead of the one ``process_group=None``
            resolves to (no initialization then); for tests.

    Returns:
        0, or 1 when ``--check`` found a wrong sum on this rank.
    """
    args = parse_args(argv)
    launcher = detect_launcher()
    sections = report(launcher, query_mpi=args.mpi)
    prints_report = args.all_ranks or launcher.rank == 0
    prefix = f"[rank {launcher.rank}] " if args.all_ranks and launcher.size > 1 else ""
    if prints_report and not args.json:
        for line in format_sections(sections):
            _write_line(prefix + line)
    result: CheckResult | None = None
    if args.check:
        started_torch = False
        try:
            if communicator is None:
                started_torch = init_for_check(launcher, args.timeout)
                communicator = get_communicator(None)
            launcher_size = launcher.size if launcher.name != "none" else None
            result = run_check(communicator, launcher_size, calls=args.calls)
        except Exception as exc:  # set-up or collective failed: say so on this rank's line
            _write_line(
                f"check rank {launcher.rank} of {launcher.size}: FAILED before a sum: "
                f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            )
            return 1
        finally:
            if started_torch:
                import torch.distributed as dist

                dist.destroy_process_group()
        if not args.json:
            _write_line(format_check(result))
    if args.json:
        document: dict[str, Any] = {"rank": launcher.rank}
        if prints_report:
            document["report"] = {s.title: s.entries for s in sections}
        if result is not None:
            document["check"] = dict(asdict(result), ok=result.ok)
        if prints_report or result is not None:
            _write_line(json.dumps(document, default=str))
    return 0 if result is None or result.ok else 1
