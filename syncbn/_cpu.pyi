"""Typed stub of the compiled module syncbn._cpu (see _cpu.pyx)."""

def kernel_variants() -> tuple[str, ...]:
    """The variants of the kernels this build compiled, baseline first, best last."""

def known_features() -> frozenset[str]:
    """The CPU features this module can detect."""

def cpu_features() -> frozenset[str]:
    """Those of known_features() that the running CPU (and its OS) supports."""
