"""The kernel variants: the choice at import (syncbn/_variants.py), SYNCBN_KERNELS,
and every variant this build holds against the baseline.

The choice is a pure function of (variants built, CPU features, SYNCBN_KERNELS),
so a CPU without AVX2, or one with AVX2 and no AVX-512, is simulated by the
features passed. Each built variant that this CPU runs must give the
baseline's results (within float tolerance: other vector widths sum in
another order and may contract into FMAs) on a few kernel calls.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import ModuleType

import numpy as np
import pytest

from syncbn import _cpu, _kernels, _variants
from syncbn._variants import GENERIC, REQUIREMENTS, Choice, choose

PORTABLE = ("generic", "x86-64-v3", "x86-64-v4")
V3 = frozenset(REQUIREMENTS["x86-64-v3"])
V4 = frozenset(REQUIREMENTS["x86-64-v4"])
BUILT = _cpu.kernel_variants()
FEATURES = _cpu.cpu_features()
RUNNABLE = [v for v in BUILT if not _variants.missing(v, FEATURES)]


# --- the choice, a pure function --------------------------------------------------------

@pytest.mark.parametrize(("features", "expected"), [
    (V4, "x86-64-v4"),
    (V4 | {"avx512ifma"}, "x86-64-v4"),
    (V3, "x86-64-v3"),
    (V3 | {"avx512f"}, "x86-64-v3"),           # part of AVX-512 only
    (V3 - {"avx2"}, GENERIC),                   # a CPU without AVX2 (Sandy Bridge, say)
    (V3 - {"fma"}, GENERIC),
    (frozenset(), GENERIC),                     # another architecture, or an old CPU
])
def test_choose_the_best_variant_the_cpu_supports(features: frozenset[str], expected: str) -> None:
    choice = choose(PORTABLE, features, None)
    assert choice.variant == expected
    assert choice.reason.startswith("the best variant built that this CPU supports")


def test_the_reason_names_what_the_cpu_lacks() -> None:
    reason = choose(PORTABLE, V3 - {"avx2"}, None).reason
    assert "x86-64-v3 needs avx2" in reason and "x86-64-v4 needs avx2, avx512f" in reason, reason
    assert choose(PORTABLE, V4, None).reason == "the best variant built that this CPU supports"


def test_choose_among_the_variants_built_only() -> None:
    assert choose(("generic", "x86-64-v3"), V4, None).variant == "x86-64-v3"
    assert choose(("generic",), V4, None) == Choice(GENERIC, "the only variant built")
    # a one-variant build (SYNCBN_MARCH=native): loaded as asked, whatever the features
    assert choose(("native",), frozenset(), None) == Choice("native", "the only variant built")


@pytest.mark.parametrize("forced", ["generic", "x86-64-v3", " x86-64-v3 "])
def test_syncbn_kernels_forces_a_variant(forced: str) -> None:
    assert choose(PORTABLE, V4, forced) == Choice(forced.strip(), f"SYNCBN_KERNELS={forced.strip()}")


def test_an_empty_syncbn_kernels_chooses() -> None:
    assert choose(PORTABLE, V4, "").variant == choose(PORTABLE, V4, "  ").variant == "x86-64-v4"


def test_syncbn_kernels_not_built() -> None:
    with pytest.raises(ValueError, match=r"SYNCBN_KERNELS: expected one of generic, x86-64-v3 "
                                         r"\(the kernel variants built\) \(got 'x86-64-v4'\)"):
        choose(("generic", "x86-64-v3"), V4, "x86-64-v4")
    with pytest.raises(ValueError, match=r"expected one of .* \(got 'native'\)"):
        choose(PORTABLE, V4, "native")


def test_syncbn_kernels_not_supported_by_the_cpu() -> None:
    with pytest.raises(ValueError, match=r"SYNCBN_KERNELS: expected one of generic, x86-64-v3 "
                                         r"\(the kernel variants built that this CPU supports\) "
                                         r"\(got 'x86-64-v4', which needs avx512f, avx512bw, "):
        choose(PORTABLE, V3, "x86-64-v4")


def test_module_names() -> None:
    assert _variants.module_name("x86-64-v3") == "syncbn._kernels_x86_64_v3"
    assert _variants.module_name("native") == "syncbn._kernels_native"


# --- this build and this CPU ------------------------------------------------------------

def test_the_features_asked_for_are_the_ones_detected() -> None:
    assert {f for needs in REQUIREMENTS.values() for f in needs} <= _cpu.known_features()
    assert FEATURES <= _cpu.known_features()


def test_the_loaded_variant_is_the_choice_for_this_cpu() -> None:
    forced = os.environ.get("SYNCBN_KERNELS")
    assert _variants.CHOICE == choose(BUILT, FEATURES, forced)
    assert _kernels.build_variant() == _variants.CHOICE.variant
    assert sys.modules["syncbn._kernels"] is _kernels
    assert _kernels.__name__ == _variants.module_name(_variants.CHOICE.variant)
    if not (forced or "").strip() and len(BUILT) > 1:
        assert _variants.CHOICE.variant == RUNNABLE[-1]


def _variant(name: str) -> ModuleType:
    module = importlib.import_module(_variants.module_name(name))
    assert module.build_variant() == name
    return module


def _calls(K: ModuleType, dtype: type) -> dict[str, np.ndarray]:  # noqa: N803  (the tests' name)
    """A few kernel calls on fixed data; what each writes."""
    rng = np.random.default_rng(7)
    N, C, L = 4, 5, 300     # long runs (L >= 256) and a few short channels
    x = rng.standard_normal((N, C, L)).astype(dtype) * 3 + 1
    dy = rng.standard_normal((N, C, L)).astype(dtype)
    res = rng.standard_normal((N, C, L)).astype(dtype)
    shift = np.zeros(C)
    stats = np.empty(2 * C + 1)
    K.local_stats(x, shift, stats, 1)
    mean = stats[:C] / stats[2 * C]
    invstd = 1.0 / np.sqrt(stats[C:2 * C] / stats[2 * C] - mean ** 2 + 1e-5)
    w, b = rng.uniform(0.5, 2, C).astype(dtype), rng.uniform(-1, 1, C).astype(dtype)
    y, z = np.empty_like(x), np.empty_like(x)
    K.normalize(x, mean, invstd, w, b, y, 1, residual=res, activation=K.ACT_SILU, preact=z)
    sums, dz = np.empty(2 * C), np.empty_like(x)
    K.backward_reduce(dy, x, mean, sums, 1, activation=K.ACT_SILU, saved=z, grad_preact=dz)
    rows = np.ascontiguousarray(x.transpose(0, 2, 1).reshape(-1, C))
    row_stats = np.empty(2 * C + 1)
    K.local_stats(rows, shift, row_stats, 1)
    return {"stats": stats, "row stats": row_stats, "y": y, "z": z, "sums": sums, "dz": dz}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", [v for v in RUNNABLE if v != GENERIC])
def test_each_variant_gives_the_baseline_s_results(name: str, dtype: type) -> None:
    if GENERIC not in BUILT:
        pytest.skip("no baseline in this build (SYNCBN_MARCH)")
    ref, got = _calls(_variant(GENERIC), dtype), _calls(_variant(name), dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for what in ref:
        np.testing.assert_allclose(got[what], ref[what], rtol=rtol, atol=rtol, err_msg=what)


@pytest.mark.parametrize("name", RUNNABLE)
def test_each_variant_imports_and_describes_itself(name: str) -> None:
    module = _variant(name)
    assert module.cython_checks_enabled() is _kernels.cython_checks_enabled()
    assert module.openmp_enabled() is _kernels.openmp_enabled()
    march = [w for w in module.build_flags().split() if w.startswith("-march=")]
    assert march == ([] if name == GENERIC else [f"-march={name}"]), module.build_flags()


# --- SYNCBN_KERNELS at import, in a fresh process ---------------------------------------

def _import_kernels(forced: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYNCBN_KERNELS": forced}
    code = "import syncbn._kernels as k; print(k.build_variant())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)


def test_syncbn_kernels_at_import() -> None:
    proc = _import_kernels(RUNNABLE[0])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [RUNNABLE[0]]


def test_syncbn_kernels_at_import_error() -> None:
    proc = _import_kernels("no-such-variant")
    assert proc.returncode != 0
    assert (f"ValueError: SYNCBN_KERNELS: expected one of {', '.join(BUILT)} "
            f"(the kernel variants built) (got 'no-such-variant')") in proc.stderr, proc.stderr
