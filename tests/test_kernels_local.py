"""The kernels of a group of one process against the kernels they fuse.

``local_forward`` must write what ``local_stats`` + ``finish_stats`` +
``normalize`` write, and ``local_backward`` what ``backward_reduce`` +
``backward_input`` write, on every dtype, with and without the optional
outputs, on one thread and several.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pytest

from syncbn import _kernels as K

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}
# channels-first (N, C, L), then rows (M, C)
SHAPES = [(8, 6, 64), (3, 5, 7), (2, 4, 1), (1, 3, 2), (4, 2, 40000), (48, 6), (7, 5), (2, 4), (40000, 3)]


def _channel_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, 2) if x.ndim == 3 else (0,)


def _data(shape: tuple[int, ...], dtype: type, seed: int, scale: float = 3.0,
          centre: float = 5.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + centre).astype(dtype)


def _composed_forward(x: np.ndarray, w: Optional[np.ndarray], b: Optional[np.ndarray],
                      momentum: Optional[float]) -> dict[str, np.ndarray]:
    C = x.shape[1]
    sums, shift = np.empty(2 * C + 1), np.zeros(C)
    K.local_stats(x, shift, sums, 1)
    out = dict(stats=np.empty((3, C)), shift=np.zeros(C), rm=np.full(C, 0.5, np.float32),
               rv=np.full(C, 2.0, np.float32), batches=np.array([3], np.int64), y=np.empty_like(x))
    if K.finish_stats(sums, shift, 1e-5, out["stats"], True, out["shift"], out["rm"], out["rv"],
                      momentum, out["batches"]):
        around = out["stats"][0].copy()
        K.local_stats(x, around, sums, 1)
        K.finish_stats(sums, around, 1e-5, out["stats"], False, out["shift"], out["rm"],
                       out["rv"], momentum, out["batches"])
    K.normalize(x, out["stats"][0], out["stats"][1], w, b, out["y"], 1)
    return out


@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_local_forward_writes_what_the_composed_kernels_write(
        shape: tuple[int, ...], dtype: type, affine: bool, momentum: Optional[float],
        threads: int) -> None:
    x = _data(shape, dtype, 0)
    C = shape[1]
    w = _data((C,), np.float32, 1) if affine else None
    b = _data((C,), np.float32, 2) if affine else None
    ref = _composed_forward(x, w, b, momentum)
    stats, shift, y = np.empty((3, C)), np.zeros(C), np.empty_like(x)
    rm, rv, batches = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32), np.array([3], np.int64)
    K.local_forward(x, w, b, 1e-5, y, stats, shift, rm, rv, momentum, batches, threads)
    np.testing.assert_allclose(stats, ref["stats"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(y, ref["y"], **TOL[dtype])
    np.testing.assert_allclose(shift, ref["shift"], rtol=1e-12)
    np.testing.assert_allclose(rm, ref["rm"], rtol=1e-6)
    np.testing.assert_allclose(rv, ref["rv"], rtol=1e-6)
    assert batches[0] == ref["batches"][0] == 4


@pytest.mark.parametrize("layout", ["runs", "rows"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_local_forward_far_pivot_sums_again(dtype: type, layout: str) -> None:
    # the first value of channel 0 lies 1e5 standard deviations from the rest:
    # around it the variance would keep few digits, so the kernel sums again
    x = _data((4, 2, 50), dtype, 3, scale=1.0, centre=0.0)
    x[0, 0, 0] = 1e5
    exact = x.astype(np.float64).transpose(1, 0, 2).reshape(2, -1)
    if layout == "rows":
        x = np.ascontiguousarray(exact.T.astype(dtype))  # (200, 2), the far value first
        assert x[0, 0] == 1e5
    stats, y = np.empty((3, 2)), np.empty_like(x)
    K.local_forward(x, None, None, 0.0, y, stats, num_threads=1)
    np.testing.assert_allclose(stats[0], exact.mean(1), rtol=1e-12)
    np.testing.assert_allclose(stats[2], exact.var(1), rtol=1e-9)


@pytest.mark.parametrize("outputs", ["all", "no input grad", "input grad only"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_local_backward_writes_what_the_composed_kernels_write(
        shape: tuple[int, ...], dtype: type, outputs: str, threads: int) -> None:
    C = shape[1]
    x, dy = _data(shape, dtype, 4), _data(shape, dtype, 5, centre=0.0)
    w = _data((C,), np.float32, 6)
    mean = x.astype(np.float64).mean(_channel_axes(x))
    invstd = 1.0 / np.sqrt(x.astype(np.float64).var(_channel_axes(x)) + 1e-5)
    sums, gw_ref, gb_ref = np.empty(2 * C), np.empty(C, np.float32), np.empty(C, np.float32)
    K.backward_reduce(dy, x, mean, sums, 1, invstd, gw_ref, gb_ref)
    dx_ref = np.empty_like(x)
    K.backward_input(dy, x, mean, invstd, w, sums[:C], sums[C:], dx_ref, 1, float(x.size // C))
    dx = None if outputs == "no input grad" else np.full_like(x, np.nan)
    gw = None if outputs == "input grad only" else np.full(C, np.nan, np.float32)
    gb = None if outputs == "input grad only" else np.full(C, np.nan, np.float32)
    K.local_backward(dy, x, mean, invstd, w, dx, gw, gb, threads)
    if dx is not None:
        np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])
    if gw is not None and gb is not None:
        np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gb, gb_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["runs", "rows"])
def test_local_forward_second_pass_gives_the_statistics(layout: str) -> None:
    """A pivot more than 1000 standard deviations from the mean sends the
    statistics through the second pass (around the mean). The pivot's own
    weight in the variance means that takes more than REFINE = 1e6 values:
    2^21 here, with the first 1e4 away from the rest (d^2 / var about 2e6)."""
    n = 1 << 21
    col = np.random.default_rng(11).standard_normal(n)
    col[0] = 1e4
    d = col.mean() - col[0]
    assert d * d > 1e6 * col.var()  # (the branch is taken)
    x = col.reshape(1, 1, n) if layout == "runs" else col.reshape(n, 1)
    stats, y = np.empty((3, 1)), np.empty_like(x)
    K.local_forward(x, None, None, 0.0, y, stats, num_threads=1)
    np.testing.assert_allclose(stats[0], [col.mean()], rtol=1e-12)
    np.testing.assert_allclose(stats[2], [col.var()], rtol=1e-12)
    np.testing.assert_allclose(y.reshape(-1), (col - col.mean()) / col.std(), rtol=1e-9, atol=1e-12)


def test_local_kernels_on_rows_match_the_same_data_as_runs() -> None:
    """Rows (M, C) and channels-first (M, C, 1) hold the same values per
    channel: the statistics and gradients agree, whichever path computes them."""
    x = _data((300, 4), np.float64, 7)
    dy = _data((300, 4), np.float64, 8, centre=0.0)
    w = _data((4,), np.float64, 9)
    out_rows, out_runs = {}, {}
    for out, xs, dys in ((out_rows, x, dy), (out_runs, x[:, :, None].copy(), dy[:, :, None].copy())):
        stats, y = np.empty((3, 4)), np.empty_like(xs)
        K.local_forward(xs, w, None, 1e-5, y, stats, num_threads=1)
        dx, gw, gb = np.empty_like(xs), np.empty(4), np.empty(4)
        K.local_backward(dys, xs, stats[0], stats[1], w, dx, gw, gb, 1)
        out.update(stats=stats, y=y.reshape(300, 4), dx=dx.reshape(300, 4), gw=gw, gb=gb)
    for key in out_rows:
        np.testing.assert_allclose(out_rows[key], out_runs[key], rtol=1e-12, atol=1e-12, err_msg=key)


def test_local_forward_needs_two_values_per_channel() -> None:
    x = np.zeros((1, 3, 1), np.float32)
    stats = np.full((3, 3), 7.0)
    with pytest.raises(ValueError, match=r"expected at least 2 values per channel \(got 1\)"):
        K.local_forward(x, None, None, 1e-5, np.empty_like(x), stats)
    assert (stats == 7.0).all()  # nothing written
