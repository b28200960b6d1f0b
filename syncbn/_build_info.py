"""syncbn.build_info(): how the installed syncbn was built.

Everything but the version and the reason for the kernel variant is read
from the compiled extensions themselves (macros that setup.py and the
compiler put into syncbn._kernels and syncbn._cpu), so it describes the
binaries that are loaded, not a record that could go stale.
"""

from __future__ import annotations

from typing import TypedDict

from . import _cpp_node_loader, _cpu, _kernels, _variants
from ._version import __version__


class BuildInfo(TypedDict):
    """What :func:`build_info` returns (see there for each key)."""

    version: str
    compiler: str
    compile_flags: str
    march: str | None
    openmp: bool
    cython_checks: bool
    kernel_variant: str
    kernel_variants: list[str]
    kernel_choice: str
    cpp_node: str


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
    - ``march`` (str or None): the ``-march`` value among them; None for the
      ``"generic"`` variant, built without one.
    - ``openmp`` (bool): whether the kernels were compiled with OpenMP
      (off with ``SYNCBN_NO_OPENMP=1`` or when ``-fopenmp`` does not work).
    - ``cython_checks`` (bool): whether this is the memory-safety build with
      Cython's bounds and wraparound checks (``SYNCBN_CYTHON_CHECKS=1``).
    - ``kernel_variant`` (str): the variant of the kernels in use, whose
      flags the keys above describe: ``"generic"`` (built without
      ``-march``), ``"x86-64-v3"`` or ``"x86-64-v4"`` (the portable build's
      vector variants), or the ``SYNCBN_MARCH`` value of a one-variant build
      (``"native"``, say).
    - ``kernel_variants`` (list of str): the variants this build holds,
      baseline first, best last (the portable build: ``"generic"`` and the
      x86-64 levels the compiler took; a ``SYNCBN_MARCH`` build: one).
    - ``kernel_choice`` (str): why ``kernel_variant`` was loaded: the best
      one this CPU supports (and what the better ones need that it lacks),
      the only one built, or ``SYNCBN_KERNELS=...``.
    - ``cpp_node`` (str): whether training calls go through the C++
      autograd node (``syncbn._cpp_node``): ``"in use"``,
      or why not (not built, as by an isolated pip build; built against
      another torch; ``SYNCBN_CPP_NODE=0``).

    Examples::

        >>> info = syncbn.build_info()
        >>> print(info["kernel_variant"], info["openmp"], info["compile_flags"])
    """
    flags = _kernels.build_flags()
    return BuildInfo(
        version=__version__,
        compiler=_kernels.build_compiler(),
        compile_flags=flags,
        march=_march(flags),
        openmp=_kernels.openmp_enabled(),
        cython_checks=_kernels.cython_checks_enabled(),
        kernel_variant=_kernels.build_variant(),
        kernel_variants=list(_cpu.kernel_variants()),
        kernel_choice=_variants.CHOICE.reason,
        cpp_node=_cpp_node_loader.STATUS,
    )
