"""Which variant of the compiled kernels this process loads (see syncbn/_kernels.py).

A default build compiles the kernels several times from one source
(syncbn/_kernels_body.pxi), as the extensions ``syncbn._kernels_<variant>``:
``generic`` without ``-march`` (runs on any CPU of the architecture), then on
x86-64 ``x86-64-v3`` (AVX2, FMA) and ``x86-64-v4`` (AVX-512) when the compiler
takes them. ``SYNCBN_MARCH=<value>`` builds one variant named after the value
instead (``native`` for ``-march=native``). At import the best built variant
whose features the running CPU has is chosen; ``SYNCBN_KERNELS=<variant>``
forces one. The choice is :func:`choose`, a pure function of the variants
built, the CPU's features and that variable, made once, at import, as CHOICE.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import NamedTuple

from . import _cpu

# The variant built without -march, always built in a default build.
GENERIC = "generic"

_V3 = ("avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe")
# The CPU features (syncbn._cpu's names) each variant of a default build needs.
# A variant not listed (SYNCBN_MARCH=native, say) is built alone, on request,
# and loaded without a check, as its -march was asked for.
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    GENERIC: (),
    "x86-64-v3": _V3,
    "x86-64-v4": (*_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


class Choice(NamedTuple):
    """The variant to load, and why."""

    variant: str
    reason: str


def module_name(variant: str) -> str:
    """The extension module of a variant (setup.py names them alike)."""
    return "syncbn._kernels_" + re.sub(r"\W", "_", variant)


def missing(variant: str, features: AbstractSet[str]) -> list[str]:
    """The features `variant` needs that are not in `features` (none for an unlisted variant)."""
    return [f for f in REQUIREMENTS.get(variant, ()) if f not in features]


def choose(built: Sequence[str], features: AbstractSet[str], forced: str | None) -> Choice:
    """The variant to load among `built` (baseline first, best last) on a CPU with
    `features`, or `forced` (SYNCBN_KERNELS; None or empty: choose).

    Raises ValueError when `forced` was not built or this CPU lacks a feature it needs.
    """
    runnable = [v for v in built if not missing(v, features)]
    forced = (forced or "").strip()
    if forced:
        if forced not in built:
            raise ValueError(
                f"SYNCBN_KERNELS: expected one of {', '.join(built)} "
                f"(the kernel variants built) (got {forced!r})"
            )
        lacks = missing(forced, features)
        if lacks:
            raise ValueError(
                f"SYNCBN_KERNELS: expected one of {', '.join(runnable)} "
                f"(the kernel variants built that this CPU supports) "
                f"(got {forced!r}, which needs {', '.join(lacks)})"
            )
        return Choice(forced, f"SYNCBN_KERNELS={forced}")
    if len(built) == 1:
        return Choice(built[0], "the only variant built")
    if not runnable:
        raise ImportError(f"syncbn: expected a kernel variant this CPU supports (got {', '.join(built)})")
    best = runnable[-1]
    skipped = [f"{v} needs {', '.join(missing(v, features))}" for v in built[built.index(best) + 1 :]]
    reason = "the best variant built that this CPU supports"
    return Choice(best, reason + (f" ({'; '.join(skipped)})" if skipped else ""))


CHOICE = choose(_cpu.kernel_variants(), _cpu.cpu_features(), os.environ.get("SYNCBN_KERNELS"))
