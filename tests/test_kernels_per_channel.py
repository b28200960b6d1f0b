"""Per-channel inputs of the kernels: finish_stats (from the reduced sums to the
statistics, against numpy) and parameters taken in their own dtype."""
from __future__ import annotations

import numpy as np
import pytest

from syncbn import _kernels
from syncbn._kernels import REFINE


def sums_of(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """[sum(x - shift), sum((x - shift)^2), count] of (count, C) float64 data."""
    d = x - shift
    return np.concatenate([d.sum(0), (d * d).sum(0), [float(x.shape[0])]])


@pytest.mark.parametrize("buf_dtype", [np.float32, np.float64])
def test_statistics_and_running_update(buf_dtype: type) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 5))
    shift = np.linspace(2.0, 4.0, 5)
    stats = np.empty((3, 5))
    nxt = np.full(5, -1.0)
    rm = np.linspace(0, 1, 5).astype(buf_dtype)
    rv = np.linspace(1, 2, 5).astype(buf_dtype)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
    assert not _kernels.finish_stats(sums_of(x, shift), shift, 1e-5, stats, True, nxt,
                                     rm, rv, 0.25)
    mean, var = x.mean(0), x.var(0)
    np.testing.assert_allclose(stats[0], mean, rtol=1e-13)
    np.testing.assert_allclose(stats[2], var, rtol=1e-12)
    np.testing.assert_allclose(stats[1], 1 / np.sqrt(var + 1e-5), rtol=1e-12)
    np.testing.assert_array_equal(nxt, stats[0])
    tol = 1e-6 if buf_dtype == np.float32 else 1e-13
    np.testing.assert_allclose(rm, 0.75 * rm0 + 0.25 * mean, rtol=tol)
    np.testing.assert_allclose(rv, 0.75 * rv0 + 0.25 * x.var(0, ddof=1), rtol=tol)
    # negative control: the biased variance in the running buffer would be caught
    assert not np.allclose(0.75 * rv0 + 0.25 * var, rv, rtol=tol)


def test_far_shift_asks_for_a_second_pass() -> None:
    x = np.random.default_rng(1).normal(0.0, 1.0, size=(20, 3))
    x[:, 1] += 1e4                      # (mean - 0)^2 / var ~ 1e8 > REFINE
    shift = np.zeros(3)
    stats = np.full((3, 3), 7.0)
    nxt = np.zeros(3)
    rm = np.zeros(3)
    assert _kernels.finish_stats(sums_of(x, shift), shift, 1e-5, stats, True, nxt, rm, None)
    np.testing.assert_allclose(stats[0], x.mean(0), rtol=1e-12)   # the better shift
    assert (nxt == 0).all() and (rm == 0).all()                   # nothing else moved
    around = stats[0].copy()
    assert not _kernels.finish_stats(sums_of(x, around), around, 1e-5, stats, False, nxt)
    np.testing.assert_allclose(stats[2], x.var(0), rtol=1e-12)
    # just below the threshold a shifted sum is accepted as it is
    y = x[:, [0]] - x[:, [0]].mean()
    y = y + np.sqrt(REFINE / 2 * y.var())
    s = np.zeros(1)
    assert not _kernels.finish_stats(sums_of(y, s), s, 0.0, np.empty((3, 1)), True)


def test_non_finite_sums() -> None:
    shift = np.array([1.0, 2.0])
    sums = np.array([np.nan, np.inf, np.nan, np.inf, 4.0])
    stats = np.empty((3, 2))
    nxt = shift.copy()
    assert not _kernels.finish_stats(sums, shift, 1e-5, stats, True, nxt)
    assert np.isnan(stats[0, 0]) and np.isnan(stats[2, 0])
    np.testing.assert_array_equal(nxt, shift)   # a non-finite mean never becomes the shift


@pytest.mark.parametrize("call, error, message", [
    (lambda st: _kernels.finish_stats(np.zeros(7), np.zeros(3), 1e-5, st[:, :3].copy(), True),
     ValueError, "expected a count of at least 1 (got 0.0)"),
    (lambda st: _kernels.finish_stats(np.zeros(5), np.zeros(3), 1e-5, st[:, :3].copy()),
     ValueError, "sums: expected length 7 (got 5)"),
    (lambda st: _kernels.finish_stats(np.ones(7), np.zeros(3), 1e-5, st[:2].copy()),
     TypeError, "stats: expected a (3, C) float64 numpy.ndarray"),
    (lambda st: _kernels.finish_stats(np.ones(7), np.zeros(3), 1e-5, st[:, :3].copy(), True,
                                      None, np.zeros(3, np.int64)),
     TypeError, "running_mean: expected a 1-D float32 or float64 numpy.ndarray of length 3"),
])
def test_errors_say_what_was_expected(call, error, message) -> None:
    with pytest.raises(error) as info:
        call(np.zeros((3, 4)))
    assert message in str(info.value)


@pytest.mark.parametrize("x_dtype", [np.float32, np.float64])
def test_float32_parameters_act_like_their_float64_values(x_dtype: type) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 4, 5)).astype(x_dtype)
    dy = rng.normal(size=(3, 4, 5)).astype(x_dtype)
    mean, invstd = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    w32, b32 = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    w64, b64 = w32.astype(np.float64), b32.astype(np.float64)
    y32, y64 = np.empty_like(x), np.empty_like(x)
    _kernels.normalize(x, mean, invstd, w32, b32, y32, 1)
    _kernels.normalize(x, mean, invstd, w64, b64, y64, 1)
    np.testing.assert_array_equal(y32, y64)
    _kernels.backward_input(dy, x, mean, invstd, w32, mean, invstd, y32, 1)
    _kernels.backward_input(dy, x, mean, invstd, w64, mean, invstd, y64, 1)
    np.testing.assert_array_equal(y32, y64)
    with pytest.raises(TypeError, match=r"weight: expected a 1-D float32 or float64 numpy.ndarray "
                                        r"of length 4 \(got float16"):
        _kernels.normalize(x, mean, invstd, w32.astype(np.float16), None, y32, 1)


@pytest.mark.parametrize("grad_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 4, 5), (15, 4), (0, 4, 5)])
def test_backward_reduce_writes_the_parameter_gradients(grad_dtype: type, shape: tuple) -> None:
    rng = np.random.default_rng(3)
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    mean, invstd = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    out = np.empty(8)
    gw, gb = np.full(4, np.nan, grad_dtype), np.full(4, np.nan, grad_dtype)
    _kernels.backward_reduce(dy, x, mean, out, 1, invstd, gw, gb)
    axes = (0, 2) if len(shape) == 3 else 0
    sum_dy = dy.sum(axes)
    sum_dy_xmu = (dy * (x - (mean[:, None] if len(shape) == 3 else mean))).sum(axes)
    np.testing.assert_allclose(out, np.concatenate([sum_dy, sum_dy_xmu]), rtol=1e-12, atol=1e-12)
    rtol = 1e-6 if grad_dtype == np.float32 else 1e-12
    np.testing.assert_allclose(gw, sum_dy_xmu * invstd, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(gb, sum_dy, rtol=rtol, atol=1e-12)
    # negative control: without the invstd factor the weight gradient would differ
    if shape[0]:
        assert not np.allclose(gw, sum_dy_xmu, rtol=rtol)
    # either output alone; grad_weight needs invstd
    gb2 = np.empty(4, grad_dtype)
    _kernels.backward_reduce(dy, x, mean, out, 1, None, None, gb2)
    np.testing.assert_array_equal(gb2, gb)
    with pytest.raises(TypeError, match=r"invstd: expected a 1-D float64 numpy.ndarray of length 4 "
                                        r"\(got NoneType\)"):
        _kernels.backward_reduce(dy, x, mean, out, 1, None, gw)
    with pytest.raises(ValueError, match=r"grad_bias: expected length 4 \(got 3\)"):
        _kernels.backward_reduce(dy, x, mean, out, 1, invstd, gw, np.empty(3, grad_dtype))


def test_finish_stats_counts_the_batch_once_and_makes_the_cumulative_average() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 1.0, size=(30, 3))
    shift = np.zeros(3)
    rm, rv = np.full(3, 10.0), np.full(3, 10.0)
    count = np.array(3, dtype=np.int64)          # a 0-d view, like a tensor's counter
    stats = np.empty((3, 3))
    assert not _kernels.finish_stats(sums_of(x, shift), shift, 1e-5, stats, True, None,
                                     rm, rv, None, count)
    assert int(count) == 4
    # factor None: 1 / batches seen, after counting this one
    np.testing.assert_allclose(rm, 0.75 * 10.0 + 0.25 * x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(rv, 0.75 * 10.0 + 0.25 * x.var(0, ddof=1), rtol=1e-13)
    # a numeric factor wins over the counter, which still counts
    _kernels.finish_stats(sums_of(x, shift), shift, 1e-5, stats, True, None, rm, rv, 0.0, count)
    assert int(count) == 5
    np.testing.assert_allclose(rm, 0.75 * 10.0 + 0.25 * x.mean(0), rtol=1e-13)
    # a pass that asks for a second one counts nothing: its second call counts
    far = x + 1e6
    assert _kernels.finish_stats(sums_of(far, shift), shift, 1e-5, stats, True, None,
                                 rm, rv, None, count)
    assert int(count) == 5
    # without a counter, factor None leaves the running statistics alone
    rm0 = rm.copy()
    _kernels.finish_stats(sums_of(x, shift), shift, 1e-5, stats, True, None, rm, rv, None)
    np.testing.assert_array_equal(rm, rm0)
    with pytest.raises(TypeError, match=r"num_batches_tracked: expected an int64 numpy.ndarray "
                                        r"of one element \(got float64"):
        _kernels.finish_stats(sums_of(x, shift), shift, 1e-5, stats, True, None, rm, rv, None,
                              np.zeros(1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_input_divides_the_sums_by_count(dtype: type) -> None:
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(3, 4, 5)).astype(dtype), rng.normal(size=(3, 4, 5)).astype(dtype)
    mean, invstd = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    sums = rng.normal(size=8) * 15.0
    by_count, by_means = np.empty_like(x), np.empty_like(x)
    _kernels.backward_input(dy, x, mean, invstd, None, sums[:4], sums[4:], by_count, 1, 15.0)
    _kernels.backward_input(dy, x, mean, invstd, None, sums[:4] / 15.0, sums[4:] / 15.0,
                            by_means, 1)
    np.testing.assert_allclose(by_count, by_means, rtol=1e-5 if dtype == np.float32 else 1e-12)
    with pytest.raises(ValueError, match=r"count: expected a positive number \(got 0.0\)"):
        _kernels.backward_input(dy, x, mean, invstd, None, sums[:4], sums[4:], by_count, 1, 0.0)
