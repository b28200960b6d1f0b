"""syncbn.build_info(): how the installed syncbn was built.

Everything but the version is read from the compiled extension itself
(macros that setup.py and the compiler put into syncbn._kernels), so it
describes the binary that is loaded, not a record that could go stale.
"""

from __future__ import annotations

from typing import TypedDict

from . import _kernels
from ._version import __version__

# The name of the kernel variant built without any -march flag.
GENERIC_VARIANT = "generic"


class BuildInfo(TypedDict):
    """What :func:`build_info` returns (see there for each key)."""

    version: str
    compiler: str
    compile_flags: str
    march: str | None
    openmp: bool
    cython_checks: bool
    kernel_variant: str


def _march(flags: str) -> str | None:
    """The value of the last ``-march=`` in ``flags`` (the one the compiler uses), or None."""
    values = [word[len("-march=") :] for word in flags.split() if word.startswith("-march=")]
    return values[-1] if values else None


def build_info() -> BuildInfo:
    """How this installation of syncbn was built, for bug reports and checks.

    Returns a new dict with these keys:

    - ``version`` (str): syncbn's version.
    - ``compiler`` (str): the compiler that built the kernels, as its own
      macros name it (for example ``"gcc 12.2.0"``).
    - ``compile_flags`` (str): the flags ``setup.py`` passed for the kernels
      (optimization, ``-march``, ``-fopenmp``, ...), after Python's own.
    - ``march`` (str or None): the ``-march`` value among them; None for a
      build without one (``SYNCBN_MARCH=`` empty, or a compiler that refused it).
    - ``openmp`` (bool): whether the kernels were compiled with OpenMP
      (off with ``SYNCBN_NO_OPENMP=1`` or when ``-fopenmp`` does not work).
    - ``cython_checks`` (bool): whether this is the memory-safety build with
      Cython's bounds and wraparound checks (``SYNCBN_CYTHON_CHECKS=1``).
    - ``kernel_variant`` (str): the kernels in use. A build holds one
      variant, named after its ``-march`` value (``"native"`` by default),
      or ``"generic"`` when built without ``-march``.

    Examples::

        >>> info = syncbn.build_info()
        >>> print(info["kernel_variant"], info["openmp"], info["compile_flags"])
    """
    flags = _kernels.build_flags()
    march = _march(flags)
    return BuildInfo(
        version=__version__,
        compiler=_kernels.build_compiler(),
        compile_flags=flags,
        march=march,
        openmp=_kernels.openmp_enabled(),
        cython_checks=_kernels.cython_checks_enabled(),
        kernel_variant=GENERIC_VARIANT if march is None else march,
    )
