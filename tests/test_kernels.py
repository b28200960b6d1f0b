"""Tests of the compiled kernels, syncbn._kernels, against a float64 NumPy oracle.

Every kernel is run on both dtypes and all three layouts the torch layer hands
it: channels-first ``(N, C, L)``, rows ``(M, C)`` as a channels-last tensor
gives them, and 2-D input. Shapes cover the empty and degenerate cases, odd
sizes that are not multiples of the vector width, and sizes large enough for
several threads (see GRAIN below), including the splits the kernels make for
few long runs and for many short ones.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from syncbn import _kernels as K

DTYPES = [np.float32, np.float64]

# Element-wise outputs: float64 arithmetic rounded once to the dtype, so half
# an ulp plus the float64 error of the folded coefficients. Sums: float64
# whatever the dtype; only the order of the additions differs from the oracle,
# so the error is relative to the sum of the absolute values of the terms.
TOL = {
    np.float32: dict(rtol=2 ** -23, atol=1e-6, sums=1e-12),
    np.float64: dict(rtol=1e-13, atol=1e-13, sums=1e-12),
}

# name: shapes given as (N, C, spatial...); the layout decides the array
SHAPES = {
    "1x1x1": (1, 1, 1),
    "3x5x7": (3, 5, 7),
    "2x3x17": (2, 3, 17),
    "7x13": (7, 13),
    "L=1": (9, 4, 1),
    "C=1": (5, 1, 33),
    "N=0": (0, 3, 5),
    "L=0": (2, 3, 0),
    "odd 4-D": (3, 7, 5, 3),
    # several threads: many short runs (reduced channel by channel) ...
    "many short runs": (128, 11, 150),
    # ... long runs (reduced in memory order) ...
    "long runs": (3, 17, 4099),
    # ... and few runs cut into pieces (C small, N * L large)
    "few long runs": (1, 2, 140001),
    "one run": (1, 1, 280003),
}

LAYOUTS = ["channels_first", "channels_last", "2d"]


def make_data(shape: tuple[int, ...], layout: str, dtype: type, seed: int,
              loc: float = 0.5, scale: float = 2.0) -> np.ndarray:
    """The kernel's view of a batch of the given (N, C, spatial...) shape.

    channels_first: (N, C, L); channels_last: (N * spatial, C) taken as a view
    of an (N, spatial..., C) array, as from a channels-last tensor; 2d: the
    batch flattened to (N * spatial, C), a plain 2-D input.
    """
    rng = np.random.default_rng(seed)
    n, c, spatial = shape[0], shape[1], shape[2:]
    size = int(np.prod(spatial, dtype=np.int64)) if spatial else 1
    if layout == "channels_first":
        return (loc + scale * rng.standard_normal((n, c, size))).astype(dtype)
    nhwc = (loc + scale * rng.standard_normal((n, *spatial, c))).astype(dtype)
    rows = nhwc.reshape(-1, c)
    assert np.shares_memory(rows, nhwc) or rows.size == 0
    return rows


def channels_last(a: np.ndarray) -> np.ndarray:
    """(values, C) float64 view of either layout: one row per value of every channel."""
    if a.ndim == 3:
        return np.moveaxis(a.astype(np.float64), 1, -1).reshape(-1, a.shape[1])
    return a.astype(np.float64)


def from_channels_last(v: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Inverse of channels_last, float64, in the layout of `like`."""
    if like.ndim == 3:
        n, c, length = like.shape
        return np.moveaxis(v.reshape(n, length, c), -1, 1)
    return v


def channel_vec(C: int, seed: int, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, C)


def assert_sums_close(got: np.ndarray, ref: np.ndarray, scale: np.ndarray, dtype: type,
                      what: str) -> None:
    """got == ref up to TOL[dtype]["sums"] times the sum of |terms| (scale), per channel."""
    err = np.abs(got - ref)
    bound = TOL[dtype]["sums"] * (scale + 1.0)
    assert np.all(err <= bound), f"{what}: max error {err.max()} > {bound[np.argmax(err - bound)]}"


def assert_values_close(got: np.ndarray, ref: np.ndarray, dtype: type, what: str,
                        scale: Optional[np.ndarray] = None) -> None:
    """Element-wise outputs: rtol on the value, atol on the size of the terms (scale)."""
    tol = TOL[dtype]
    scale = np.ones_like(ref) if scale is None else np.maximum(scale, 1.0)
    err = np.abs(got.astype(np.float64) - ref)
    bound = tol["rtol"] * np.abs(ref) + tol["atol"] * scale
    assert np.all(err <= bound), f"{what}: max error {err.max()}"


# --- oracles ---------------------------------------------------------------------------

def column_sums(v: np.ndarray) -> np.ndarray:
    """Correctly rounded sums of the columns of a (values, C) float64 array.

    (NumPy's v.sum(0) adds the rows one after the other, less accurately than
    the kernels' partial sums; math.fsum is exact.)
    """
    return np.array([math.fsum(col) for col in v.T])


def ref_local_stats(x: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(oracle of out, scale of each sum)."""
    d = channels_last(x) - shift
    ref = np.concatenate([column_sums(d), column_sums(d * d), [d.shape[0]]])
    scale = np.concatenate([np.abs(d).sum(0), (d * d).sum(0), [0.0]])
    return ref, scale


def ref_backward_reduce(dy: np.ndarray, x: np.ndarray,
                        mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g, xm = channels_last(dy), channels_last(x) - mean
    ref = np.concatenate([column_sums(g), column_sums(g * xm)])
    scale = np.concatenate([np.abs(g).sum(0), np.abs(g * xm).sum(0)])
    return ref, scale


# --- local_stats -----------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES)
def test_local_stats(dtype: type, shape: tuple[int, ...], layout: str) -> None:
    x = make_data(shape, layout, dtype, seed=1)
    C = x.shape[1]
    shift = channel_vec(C, seed=2, lo=-3.0, hi=3.0)   # non-zero, away from the mean
    out = np.full(2 * C + 1, np.nan)
    K.local_stats(x, shift, out, 1)
    ref, scale = ref_local_stats(x, shift)
    assert out[2 * C] == x.size // C
    assert_sums_close(out, ref, scale, dtype, "local_stats")


# --- normalize -------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False], ids=["weight+bias", "no weight/bias"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize(dtype: type, shape: tuple[int, ...], layout: str, affine: bool) -> None:
    x = make_data(shape, layout, dtype, seed=3)
    C = x.shape[1]
    mean, invstd = channel_vec(C, 4), channel_vec(C, 5, 0.2, 3.0)
    weight = channel_vec(C, 6, -2.0, 2.0) if affine else None
    bias = channel_vec(C, 7, -2.0, 2.0) if affine else None
    out = np.full_like(x, np.nan)
    K.normalize(x, mean, invstd, weight, bias, out, 1)
    w = weight if affine else np.ones(C)
    b = bias if affine else np.zeros(C)
    xc = channels_last(x)
    ref = (xc - mean) * invstd * w + b
    scale = np.abs(xc * invstd * w) + np.abs(mean * invstd * w) + np.abs(b)
    assert_values_close(channels_last(out), ref, dtype, "normalize", scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_in_place(dtype: type) -> None:
    x = make_data((4, 6, 37), "channels_first", dtype, seed=8)
    C = x.shape[1]
    mean, invstd, weight, bias = (channel_vec(C, s) for s in (9, 10, 11, 12))
    expected = np.empty_like(x)
    K.normalize(x, mean, invstd, weight, bias, expected, 1)
    K.normalize(x, mean, invstd, weight, bias, x, 1)
    np.testing.assert_array_equal(x, expected)


# --- backward_reduce -------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_reduce(dtype: type, shape: tuple[int, ...], layout: str) -> None:
    x = make_data(shape, layout, dtype, seed=13)
    dy = make_data(shape, layout, dtype, seed=14, loc=0.1, scale=1.0)
    C = x.shape[1]
    mean = channel_vec(C, 15)
    out = np.full(2 * C, np.nan)
    K.backward_reduce(dy, x, mean, out, 1)
    ref, scale = ref_backward_reduce(dy, x, mean)
    assert_sums_close(out, ref, scale, dtype, "backward_reduce")


# --- backward_input --------------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no weight"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_input(dtype: type, shape: tuple[int, ...], layout: str, affine: bool) -> None:
    x = make_data(shape, layout, dtype, seed=16)
    dy = make_data(shape, layout, dtype, seed=17, loc=0.1, scale=1.0)
    C = x.shape[1]
    mean, invstd = channel_vec(C, 18), channel_vec(C, 19, 0.2, 3.0)
    weight = channel_vec(C, 20, -2.0, 2.0) if affine else None
    mean_dy, mean_dy_xmu = channel_vec(C, 21), channel_vec(C, 22)
    out = np.full_like(x, np.nan)
    K.backward_input(dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu, out, 1)
    w = weight if affine else np.ones(C)
    g, xm = channels_last(dy), channels_last(x) - mean
    ref = (g - mean_dy - xm * invstd ** 2 * mean_dy_xmu) * invstd * w
    scale = (np.abs(g) + np.abs(mean_dy)
             + (np.abs(channels_last(x)) + np.abs(mean)) * invstd ** 2 * np.abs(mean_dy_xmu))
    assert_values_close(channels_last(out), ref, dtype, "backward_input",
                        scale * invstd * np.abs(w))


@pytest.mark.parametrize("target", ["dy", "x"])
def test_backward_input_in_place(target: str) -> None:
    x = make_data((3, 5, 41), "channels_first", np.float32, seed=23)
    dy = make_data((3, 5, 41), "channels_first", np.float32, seed=24)
    C = x.shape[1]
    args = [channel_vec(C, s, 0.5, 1.5) for s in range(25, 30)]
    expected = np.empty_like(x)
    K.backward_input(dy, x, *args, expected, 1)
    K.backward_input(dy, x, *args, dy if target == "dy" else x, 1)
    np.testing.assert_array_equal(dy if target == "dy" else x, expected)


# --- threads ---------------------------------------------------------------------------

needs_openmp = pytest.mark.skipif(
    not K.openmp_enabled(),
    reason="built without OpenMP (SYNCBN_NO_OPENMP or no working -fopenmp): "
           "num_threads has no effect, so 1 and 2 threads are the same run")

# The kernels' thread rule (syncbn/_kernels.pyx, _threads): one thread per
# GRAIN units of work, capped by the threads asked for and by the rows (or
# values) to deal out. A value is one unit of work, two in backward_reduce,
# which reads two arrays. test_a_second_thread_starts_at_the_grain checks
# this rule against the compiled kernels.
GRAIN = 65536
WORK_PER_VALUE = {"local_stats": 1, "normalize": 1, "backward_reduce": 2, "backward_input": 1}

# shapes that take two threads in every kernel (2 * GRAIN values and more)
THREAD_SHAPES = {"at the grain": (2, 4, 16384),
                 **{k: SHAPES[k] for k in ("many short runs", "long runs", "few long runs",
                                           "one run")}}


def threads_used(kernel: str, x: np.ndarray, num_threads: int) -> int:
    """How many threads ``kernel`` runs on ``x`` when asked for ``num_threads``."""
    parts = x.size if x.ndim == 3 else x.shape[0]
    return max(1, min(num_threads, WORK_PER_VALUE[kernel] * x.size // GRAIN, parts))


def run_all(x: np.ndarray, dy: np.ndarray, vecs: list[np.ndarray],
            nt: int) -> dict[str, np.ndarray]:
    """Every kernel on (x, dy) with nt threads."""
    C = x.shape[1]
    res = {"stats": np.empty(2 * C + 1), "norm": np.empty_like(x),
           "reduce": np.empty(2 * C), "input": np.empty_like(x)}
    K.local_stats(x, vecs[0], res["stats"], nt)
    K.normalize(x, vecs[0], vecs[1], vecs[2], vecs[3], res["norm"], nt)
    K.backward_reduce(dy, x, vecs[0], res["reduce"], nt)
    K.backward_input(dy, x, vecs[0], vecs[1], vecs[2], vecs[4], vecs[5], res["input"], nt)
    return res


@needs_openmp
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", THREAD_SHAPES.values(), ids=THREAD_SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_and_two_threads_agree(dtype: type, shape: tuple[int, ...], layout: str) -> None:
    x = make_data(shape, layout, dtype, seed=36)
    dy = make_data(shape, layout, dtype, seed=37)
    vecs = [channel_vec(x.shape[1], s, 0.5, 1.5) for s in range(30, 36)]
    assert all(threads_used(kernel, x, 2) == 2 for kernel in WORK_PER_VALUE), \
        f"{x.shape}: too small for two threads in every kernel"
    one, two = run_all(x, dy, vecs, 1), run_all(x, dy, vecs, 2)
    # the element-wise passes do the same arithmetic on every value
    np.testing.assert_array_equal(one["norm"], two["norm"])
    np.testing.assert_array_equal(one["input"], two["input"])
    # the sums only add their partial sums in another order
    assert_sums_close(two["stats"], one["stats"], ref_local_stats(x, vecs[0])[1], dtype,
                      "local_stats")
    assert_sums_close(two["reduce"], one["reduce"], ref_backward_reduce(dy, x, vecs[0])[1],
                      dtype, "backward_reduce")


# Run in a fresh process: the OpenMP runtime keeps its threads for the next
# parallel region, so the process must not have run one before. The extension
# is loaded on its own (the package would import torch, seconds on a busy
# machine); OpenMP settings from the environment are left out.
THREAD_COUNT_SCRIPT = """
import importlib.util, os, sys
import numpy as np
spec = importlib.util.spec_from_file_location(sys.argv[4], sys.argv[1])
K = importlib.util.module_from_spec(spec)
spec.loader.exec_module(K)
kernel, n = sys.argv[2], int(sys.argv[3])
one, zero = np.ones(1), np.zeros(1)
calls = {  # on the global x and out of the loop below
    "local_stats": lambda: K.local_stats(x, zero, np.empty(3), 2),
    "normalize": lambda: K.normalize(x, zero, one, None, None, out, 2),
    "backward_reduce": lambda: K.backward_reduce(x, x, zero, np.empty(2), 2),
    "backward_input": lambda: K.backward_input(x, x, zero, one, None, zero, zero, out, 2),
}
counts = [len(os.listdir("/proc/self/task"))]
for size in (n - 1, n):
    x = np.ones((1, 1, size))
    out = np.empty_like(x)
    calls[kernel]()
    counts.append(len(os.listdir("/proc/self/task")))
print(*counts)
"""


@needs_openmp
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.parametrize("kernel", list(WORK_PER_VALUE))
def test_a_second_thread_starts_at_the_grain(kernel: str) -> None:
    """With two threads asked for, the kernel starts a second thread from exactly
    the size threads_used says, and not one value below it."""
    first = 2 * GRAIN // WORK_PER_VALUE[kernel]     # the fewest values for two threads
    assert threads_used(kernel, np.empty((1, 1, first - 1)), 2) == 1
    assert threads_used(kernel, np.empty((1, 1, first)), 2) == 2
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    # (the extension of the variant loaded, under its own name: syncbn._kernels_<variant>)
    proc = subprocess.run([sys.executable, "-c", THREAD_COUNT_SCRIPT, K.__file__, kernel,
                           str(first), K.__name__], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    start, below, at = map(int, proc.stdout.split())
    assert (below - start, at - start) == (0, 1), \
        f"{kernel}: threads started below / at {first} values: {below - start} / {at - start}"


def test_default_thread_count() -> None:
    x = make_data(SHAPES["long runs"], "channels_first", np.float32, seed=38)
    C = x.shape[1]
    a, b = np.empty(2 * C + 1), np.empty(2 * C + 1)
    K.local_stats(x, np.zeros(C), a, 0)
    K.local_stats(x, np.zeros(C), b, 1)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    assert K.max_threads() >= 1


# --- numerics --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["channels_first", "2d"])
@pytest.mark.parametrize("shift_at", ["zero", "near the mean"])
def test_variance_when_mean_dwarfs_std(layout: str, shift_at: str) -> None:
    """float32 data with |mean| / std = 1e6: the variance from the kernel's sums.

    At 1e6 float32 values are multiples of 1/16, so N(1e6, 1) samples take
    about 100 distinct values. A float32 accumulator, or a float64 sum of x^2
    taken around 0, would lose the variance entirely; the kernel sums around a
    pivot inside the data. With shift 0 the caller's S2/n - (S1/n)^2 still
    cancels 12 digits of the 16 a float64 holds (1e12 - 1e12 + 1), hence 1e-3.
    """
    rng = np.random.default_rng(39)
    C, n = 2, 300_001
    v = (1e6 + rng.standard_normal((C, n))).astype(np.float32)
    assert len(np.unique(v[0])) > 50
    x = v[None] if layout == "channels_first" else np.ascontiguousarray(v.T)
    ref = v.astype(np.float64).var(axis=1)
    shift = np.zeros(C) if shift_at == "zero" else np.float64(v[:, 0]) + 0.37
    out = np.empty(2 * C + 1)
    K.local_stats(x, shift, out, 1)
    count = out[2 * C]
    assert count == n
    var = out[C:2 * C] / count - (out[:C] / count) ** 2
    rtol = 1e-3 if shift_at == "zero" else 1e-9
    np.testing.assert_allclose(var, ref, rtol=rtol)
    np.testing.assert_allclose(shift + out[:C] / count, v.astype(np.float64).mean(axis=1),
                               rtol=1e-15, atol=0)


def test_count_above_2_pow_24() -> None:
    """2^24 + 2^20 values per channel: a float32 accumulator stops counting at 2^24.

    Channel 0 holds integers, whose float64 sums are exact in any order, so
    the mean must be exact; channel 1 holds N(3, 1) samples, compared with
    NumPy's float64 mean.
    """
    n = 2 ** 24 + 2 ** 20                                  # 2 x 17.8M float32: 142 MB
    x = np.empty((1, 2, n), dtype=np.float32)
    x[0, 0] = np.tile(np.arange(1000, 1007, dtype=np.float32), n // 7 + 1)[:n]
    x[0, 1] = np.random.default_rng(40).standard_normal(n, dtype=np.float32)
    x[0, 1] += 3.0
    out = np.empty(5)
    K.local_stats(x, np.zeros(2), out, 2)
    assert out[4] == n
    exact_sum = sum(range(1000, 1007)) * (n // 7) + sum(range(1000, 1000 + n % 7))
    assert out[0] == exact_sum
    assert out[0] / out[4] == exact_sum / n
    np.testing.assert_allclose(out[1] / out[4], x[0, 1].mean(dtype=np.float64),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("layout", ["channels_first", "2d"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_passes_when_mean_dwarfs_std(dtype: type, layout: str) -> None:
    """normalize and backward_input with |mean| / std = 1e6, against float64.

    The passes compute in the dtype of the data around m' = mean rounded to
    it, with the constant moved by (m' - mean) * coefficient in float64. Each
    of their few roundings (x - m' when x is not within a factor 2 of m', the
    rounded coefficients, each product and sum) is at most one unit of
    eps = 2^-24 (float32; 2^-53 float64) relative to one of the terms, so the
    error is below 8 eps times the sum of the terms' magnitudes. A folded
    ``x * a + (bias - mean * a)`` would lose about 1e6 * eps |a| instead.
    """
    eps = 2.0 ** -24 if dtype == np.float32 else 2.0 ** -53
    rng = np.random.default_rng(41)
    C, n = 3, 5001
    loc = np.array([1e6, -3e6, 2.5e5])
    v = loc[:, None] + rng.standard_normal((C, n)) * loc[:, None] * 1e-6
    x = v[None].astype(dtype) if layout == "channels_first" else np.ascontiguousarray(v.T, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    xc, g = channels_last(x), channels_last(dy)
    mean = xc.mean(0)
    invstd = 1.0 / xc.std(0)
    weight, bias = np.array([0.5, -2.0, 1.5]), np.array([0.25, 3.0, -1.0])
    m32 = mean.astype(dtype).astype(np.float64)   # the rounded centre m'
    a = invstd * weight

    out = np.empty_like(x)
    K.normalize(x, mean, invstd, weight, bias, out, 1)
    ref = (xc - mean) * a + bias
    terms = np.abs((xc - m32) * a) + np.abs(bias + (m32 - mean) * a) + np.abs(ref)
    err = np.abs(channels_last(out) - ref)
    assert np.all(err <= 8 * eps * terms), f"normalize: max error / bound {np.max(err / terms) / eps} eps"

    mean_dy, mean_dy_xmu = g.mean(0), (g * (xc - mean)).mean(0)
    K.backward_input(dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu, out, 1)
    b = -a * invstd ** 2 * mean_dy_xmu
    ref = g * a + (xc - mean) * b - a * mean_dy
    terms = (np.abs(g * a) + np.abs((xc - m32) * b) + np.abs(b * (m32 - mean) - a * mean_dy)
             + np.abs(ref))
    err = np.abs(channels_last(out) - ref)
    assert np.all(err <= 8 * eps * terms), \
        f"backward_input: max error / bound {np.max(err / terms) / eps} eps"


@pytest.mark.parametrize("layout", ["channels_first", "2d"])
def test_non_finite_values(layout: str) -> None:
    """inf and NaN reach the sums as float64 arithmetic says, even as a channel's
    first value, the kernel's pivot (which would make every x - pivot NaN)."""
    x = np.zeros((2, 3, 5), dtype=np.float32)
    x[0, 0, 0] = np.inf        # the first value of channel 0
    x[1, 1, 2] = -np.inf
    x[1, 2, 4] = np.nan
    if layout == "2d":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1)).reshape(-1, 3)
    out = np.empty(7)
    K.local_stats(x, np.zeros(3), out, 1)
    assert out[0] == np.inf and out[3] == np.inf
    assert out[1] == -np.inf and out[4] == np.inf
    assert np.isnan(out[2]) and np.isnan(out[5])


# --- the rows view of a channels-last tensor ------------------------------------------

def test_channels_last_tensor_as_rows() -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(3, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    rows = t.permute(0, 2, 3, 1).numpy().reshape(-1, 6)   # a view: no copy
    assert np.shares_memory(rows, t.numpy()) and rows.flags.c_contiguous
    cf = t.contiguous().numpy().reshape(3, 6, -1)
    a, b = np.empty(13), np.empty(13)
    K.local_stats(rows, np.zeros(6), a, 1)
    K.local_stats(cf, np.zeros(6), b, 1)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# --- validation ------------------------------------------------------------------------

def f32(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32)


def vec(n: int) -> np.ndarray:
    return np.zeros(n)


def read_only(n: int) -> np.ndarray:
    a = np.zeros(n)
    a.flags.writeable = False
    return a


def stats_call(x: object, shift: object = None, out: object = None) -> Callable[[], None]:
    C = 3
    return lambda: K.local_stats(x, vec(C) if shift is None else shift,
                                 vec(2 * C + 1) if out is None else out)


# (kernel call, error type, regex naming what was expected and what came)
ERRORS = {
    "non-contiguous x": (
        stats_call(f32(4, 6, 5)[:, ::2]), ValueError,
        r"x: expected a C-contiguous array \(got strides \(120, 40, 4\) for shape \(4, 3, 5\)\)"),
    "channels-last 4-D x": (
        stats_call(np.zeros((2, 5, 5, 3), np.float32).transpose(0, 3, 1, 2)), ValueError,
        r"x: expected shape \(N, C, L\) channels-first or \(M, C\) rows "
        r"\(got 4 dimensions, shape \(2, 3, 5, 5\)\)"),
    "1-D x": (
        stats_call(f32(3)), ValueError,
        r"x: expected shape \(N, C, L\) .* \(got 1 dimensions, shape \(3,\)\)"),
    "int x": (
        stats_call(np.zeros((2, 3), np.int64)), TypeError,
        r"x: expected dtype float32 or float64 .* \(got int64\)"),
    "float16 x": (
        stats_call(np.zeros((2, 3), np.float16)), TypeError,
        r"x: expected dtype float32 or float64 .* \(got float16\)"),
    "byte-swapped x": (
        stats_call(np.zeros((2, 3), ">f4")), TypeError,
        r"x: expected dtype float32 or float64 in native byte order \(got >f4\)"),
    "list x": (
        stats_call([[0.0, 0.0, 0.0]]), TypeError,
        r"x: expected a numpy.ndarray \(got list\)"),
    "short shift": (
        stats_call(f32(2, 3), shift=vec(2)), ValueError,
        r"shift: expected length 3 \(got 2\)"),
    "float32 shift": (
        stats_call(f32(2, 3), shift=np.zeros(3, np.float32)), TypeError,
        r"shift: expected a 1-D float64 numpy.ndarray of length 3 \(got float32 array"),
    "2-D shift": (
        stats_call(f32(2, 3), shift=np.zeros((3, 1))), TypeError,
        r"shift: expected a 1-D float64 numpy.ndarray of length 3 "
        r"\(got float64 array of shape \(3, 1\)"),
    "long out": (
        stats_call(f32(2, 3), out=vec(8)), ValueError,
        r"out: expected length 7 \(got 8\)"),
    "read-only out": (
        stats_call(f32(2, 3), out=read_only(7)), ValueError,
        r"out: expected a writeable array \(got a read-only one\)"),
    "dy and x dtypes differ": (
        lambda: K.backward_reduce(f32(2, 3), np.zeros((2, 3)), vec(3), vec(6)), TypeError,
        r"x: expected dtype float32 like dy \(got float64\)"),
    "dy and x shapes differ": (
        lambda: K.backward_reduce(f32(2, 3), f32(4, 3), vec(3), vec(6)), ValueError,
        r"x: expected shape \(2, 3\) like dy \(got \(4, 3\)\)"),
    "out dtype differs from x": (
        lambda: K.normalize(f32(2, 3, 4), vec(3), vec(3), None, None, np.zeros((2, 3, 4)), 1),
        TypeError, r"out: expected dtype float32 like x \(got float64\)"),
    "short weight": (
        lambda: K.normalize(f32(2, 3, 4), vec(3), vec(3), vec(4), None, f32(2, 3, 4), 1),
        ValueError, r"weight: expected length 3 \(got 4\)"),
    "non-contiguous dy": (
        lambda: K.backward_input(f32(2, 6)[:, ::2], f32(2, 3), vec(3), vec(3), None,
                                 vec(3), vec(3), f32(2, 3)),
        ValueError, r"dy: expected a C-contiguous array \(got strides"),
    "short sum_dy_xmu": (
        lambda: K.backward_input(f32(2, 3), f32(2, 3), vec(3), vec(3), None, vec(3), vec(1),
                                 f32(2, 3)),
        ValueError, r"sum_dy_xmu: expected length 3 \(got 1\)"),
}


@pytest.mark.parametrize("call, error, message", ERRORS.values(), ids=ERRORS.keys())
def test_errors_say_what_was_expected_and_what_came(
        call: Callable[[], None], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_errors_leave_out_untouched() -> None:
    out = np.full(7, 42.0)
    with pytest.raises(TypeError):
        K.local_stats(np.zeros((2, 3), np.int32), vec(3), out)
    assert np.all(out == 42.0)
