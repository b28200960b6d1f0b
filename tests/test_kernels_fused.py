"""The kernels' fused residual add and activation, against torch's composition.

normalize and local_forward compute ``z = (x - mean) * invstd * weight + bias
[+ residual]`` and ``out = activation(z)`` (z also to ``preact``);
backward_reduce and local_backward take dy, the gradient of ``out``, and the
saved y (or z), write ``dz = dy * activation'(.)`` to ``grad_preact`` and
reduce over dz; backward_input then takes dz as its dy.

The reference is torch in float64: autograd through the activation at z as
the kernels see it (rounded to the data's dtype), then through
``F.batch_norm`` for dx and the parameter gradients. Every activation
(leaky_relu with a positive and a negative slope), with and without a
residual, on both layouts, both dtypes, one thread and two; then boundary
values (z = 0 and 6, NaN, +-inf) against torch in the data's own dtype, the
aliasing the layer relies on, negative controls and the errors.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from syncbn import _kernels as K  # noqa: N812  (the kernel tests' name for it)

DTYPES = [np.float32, np.float64]
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}

# Element-wise outputs: a few roundings in the data's dtype, relative to the
# value (rtol) and to the size of the terms that made it (atol times a scale).
# Sums: float64 over dz as stored, which for float32 data differs from the
# float64 reference by about an ulp of float32 per term.
TOL = {
    np.float32: {"rtol": 1e-5, "atol": 1e-5, "sums": 2e-6},
    np.float64: {"rtol": 1e-12, "atol": 1e-12, "sums": 1e-12},
}

# id: (code, negative_slope)
ACTIVATIONS = {
    "none": (K.ACT_NONE, 0.01),
    "relu": (K.ACT_RELU, 0.01),
    "relu6": (K.ACT_RELU6, 0.01),
    "leaky_relu": (K.ACT_LEAKY_RELU, 0.2),
    "leaky_relu<0": (K.ACT_LEAKY_RELU, -0.3),
    "silu": (K.ACT_SILU, 0.01),
}

# The kernels' thread rule (see test_kernels.py): one thread per GRAIN units
# of work, a value being one unit (two in backward_reduce and the local
# kernels), capped by the parts to deal out (values, rows; channels in the
# local kernels). The fused options do not change it.
GRAIN = 65536

# id: (shape: (N, C, L) runs or (M, C) rows, threads)
CASES = {
    "runs": ((3, 5, 7), 1),
    "runs, L>=256": ((2, 3, 300), 1),
    "rows": ((37, 5), 1),
    # two threads: many short runs (reduced channel by channel) ...
    "runs, 2 threads, short runs": ((128, 11, 150), 2),
    # ... few runs cut into pieces ...
    "runs, 2 threads, pieces": ((4, 3, 11000), 2),
    # ... and rows
    "rows, 2 threads": ((26215, 5), 2),
}
RUN_CASES = {k: v for k, v in CASES.items() if len(v[0]) == 3}


def test_two_thread_cases_split() -> None:
    """The 2-thread cases are large enough for two threads in every kernel."""
    for shape, threads in CASES.values():
        if threads == 2:
            size = math.prod(shape)
            assert size >= 2 * GRAIN, shape
            if len(shape) == 3:
                assert shape[1] >= 2  # the local kernels split channels
            else:
                assert shape[0] >= 2


# --- data and references ---------------------------------------------------------------

def make(shape: tuple[int, ...], dtype: type, seed: int, loc: float = 0.0,
         scale: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def params(C: int, dtype: type, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias spreading z over both sides of 0 and past 6."""
    rng = np.random.default_rng(seed)
    weight = rng.uniform(0.5, 3.0, C) * rng.choice([-1.0, 1.0], C)
    bias = rng.uniform(-1.0, 3.0, C)
    return weight.astype(dtype), bias.astype(dtype)


def per_channel_np(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A (C,) vector as a float64 array that broadcasts against x."""
    shape = (1, x.shape[1], 1) if x.ndim == 3 else (1, x.shape[1])
    return np.asarray(v, np.float64).reshape(shape)


def per_channel(v: np.ndarray, x: np.ndarray) -> torch.Tensor:
    """A (C,) vector as a float64 tensor that broadcasts against x."""
    return torch.from_numpy(per_channel_np(v, x))


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float64))


def torch_activation(code: int, slope: float) -> Callable[[torch.Tensor], torch.Tensor]:
    if code == K.ACT_NONE:
        return lambda z: z
    if code == K.ACT_RELU:
        return F.relu
    if code == K.ACT_RELU6:
        return F.relu6
    if code == K.ACT_LEAKY_RELU:
        return lambda z: F.leaky_relu(z, slope)
    if code == K.ACT_SILU:
        return F.silu
    raise AssertionError(code)


def channel_dims(x: np.ndarray) -> tuple[int, ...]:
    return (0, 2) if x.ndim == 3 else (0,)


def ref_forward(x: np.ndarray, mean: np.ndarray, invstd: np.ndarray, w: np.ndarray,
                b: np.ndarray, r: np.ndarray | None, code: int,
                slope: float) -> tuple[np.ndarray, np.ndarray]:
    """(z, activation(z)) in float64."""
    z = (t64(x) - per_channel(mean, x)) * per_channel(invstd, x) * per_channel(w, x) \
        + per_channel(b, x)
    if r is not None:
        z = z + t64(r)
    return z.numpy(), torch_activation(code, slope)(z).numpy()


def ref_backward(x: np.ndarray, dy: np.ndarray, w: np.ndarray, b: np.ndarray,
                 r: np.ndarray | None, code: int, slope: float,
                 eps: float = 1e-5) -> dict[str, np.ndarray]:
    """torch autograd of ``activation(batch_norm(x) [+ r])`` in float64, the
    activation taken at z rounded to the data's dtype (the z the kernels see):
    the batch statistics, the kernels' saved values (in the data's dtype), z,
    dz, dx and the parameter gradients."""
    xt = t64(x).requires_grad_()
    wt, bt = t64(w).requires_grad_(), t64(b).requires_grad_()
    z = F.batch_norm(xt, None, None, wt, bt, training=True, eps=eps)
    if r is not None:
        z = z + t64(r)
    zk = z.detach().to(TORCH_DTYPE[x.dtype.type]).double().requires_grad_()
    y = torch_activation(code, slope)(zk)
    (dz,) = torch.autograd.grad(y, zk, t64(dy))
    dx, gw, gb = torch.autograd.grad(z, [xt, wt, bt], dz)
    saved = y if K.activation_uses_output(code, slope) else zk
    mean = xt.detach().mean(channel_dims(x)).numpy()
    var = xt.detach().var(channel_dims(x), unbiased=False).numpy()
    return {"mean": mean, "invstd": 1.0 / np.sqrt(var + eps), "var": var,
            "saved": saved.detach().numpy().astype(x.dtype), "z": zk.detach().numpy(),
            "dz": dz.numpy(), "dx": dx.numpy(), "gw": gw.numpy(), "gb": gb.numpy()}


def channels_last(a: np.ndarray) -> np.ndarray:
    """(values, C) float64 view of either layout."""
    if a.ndim == 3:
        return np.moveaxis(a.astype(np.float64), 1, -1).reshape(-1, a.shape[1])
    return a.astype(np.float64)


def column_sums(v: np.ndarray) -> np.ndarray:
    return np.array([math.fsum(col) for col in v.T])


def assert_close(got: np.ndarray, ref: np.ndarray, dtype: type, what: str,
                 scale: np.ndarray | float = 1.0) -> None:
    """Element-wise: NaN where the reference has NaN, infinities equal, and
    |got - ref| <= rtol |ref| + atol * scale elsewhere."""
    tol = TOL[dtype]
    got = np.asarray(got, np.float64)
    scale = np.broadcast_to(np.maximum(scale, 1.0), ref.shape)
    nan, inf = np.isnan(ref), np.isinf(ref)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN at other places than the reference"
    assert np.array_equal(got[inf], ref[inf]), f"{what}: infinities differ"
    fin = ~(nan | inf)
    err = np.abs(got - ref)[fin]
    bound = tol["rtol"] * np.abs(ref)[fin] + tol["atol"] * scale[fin]
    assert np.all(err <= bound), \
        f"{what}: {np.count_nonzero(err > bound)} of {err.size} values off, max error {err.max()}"


def assert_sums_close(got: np.ndarray, ref: np.ndarray, scale: np.ndarray, dtype: type,
                      what: str) -> None:
    """Sums: within TOL[dtype]["sums"] of the sum of |terms| (scale)."""
    err = np.abs(np.asarray(got, np.float64) - ref)
    bound = TOL[dtype]["sums"] * (scale + 1.0)
    assert np.all(err <= bound), f"{what}: max error {err.max()}"


def assert_same_arithmetic(got: np.ndarray, ref: np.ndarray, residual: bool,
                           scale: np.ndarray) -> None:
    """Element-wise outputs of two thread counts: the same values. With a
    residual, z sums three terms, and -fassociative-math lets the compiler
    order them differently where it compiles the pass twice (once per thread
    count; the checked build does), so there a rounding of those terms may differ."""
    if not residual:
        np.testing.assert_array_equal(got, ref)
        return
    eps = np.finfo(got.dtype).eps
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    err = np.abs(got.astype(np.float64) - ref)[~nan]
    assert np.all(err <= 4 * eps * np.maximum(scale, 1.0)[~nan]), f"max difference {err.max()}"


def forward_inputs(shape: tuple[int, ...], dtype: type, residual: bool,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray,
                                           np.ndarray]:
    x = make(shape, dtype, seed, loc=0.5)
    r = make(shape, dtype, seed + 1) if residual else None
    w, b = params(shape[1], dtype, seed + 2)
    return x, r, w, b


# --- forward ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("residual", [False, True], ids=["no residual", "residual"])
@pytest.mark.parametrize("act", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
def test_normalize(act: tuple[int, float], residual: bool, dtype: type,
                   case: tuple[tuple[int, ...], int]) -> None:
    (code, slope), (shape, threads) = act, case
    x, r, w, b = forward_inputs(shape, dtype, residual)
    C = shape[1]
    rng = np.random.default_rng(3)
    mean, invstd = rng.uniform(-1.0, 1.0, C), rng.uniform(0.3, 1.5, C)
    needs_z = not K.activation_uses_output(code, slope)
    out = np.full_like(x, np.nan)
    pre = np.full_like(x, np.nan) if needs_z else None
    K.normalize(x, mean, invstd, w, b, out, threads, residual=r, activation=code,
                negative_slope=slope, preact=pre)
    z, y = ref_forward(x, mean, invstd, w, b, r, code, slope)
    scale = (np.abs(x - per_channel_np(mean, x)) * per_channel_np(invstd * np.abs(w), x)
             + per_channel_np(np.abs(b), x) + (0.0 if r is None else np.abs(r)))
    assert_close(out, y, dtype, "out", scale)
    if pre is not None:
        assert_close(pre, z, dtype, "preact", scale)
    if threads > 1:
        # the element-wise pass does the same arithmetic on every value, whatever the split
        # (see assert_same_arithmetic)
        out1 = np.empty_like(x)
        pre1 = np.empty_like(x) if needs_z else None
        K.normalize(x, mean, invstd, w, b, out1, 1, residual=r, activation=code,
                    negative_slope=slope, preact=pre1)
        assert_same_arithmetic(out, out1, residual, scale)
        if pre is not None:
            assert_same_arithmetic(pre, pre1, residual, scale)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("residual", [False, True], ids=["no residual", "residual"])
@pytest.mark.parametrize("act", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
def test_local_forward(act: tuple[int, float], residual: bool, dtype: type,
                       case: tuple[tuple[int, ...], int]) -> None:
    (code, slope), (shape, threads) = act, case
    x, r, w, b = forward_inputs(shape, dtype, residual)
    C = shape[1]
    needs_z = not K.activation_uses_output(code, slope)
    out = np.full_like(x, np.nan)
    pre = np.full_like(x, np.nan) if needs_z else None
    stats = np.full((3, C), np.nan)
    rm, rv, batches = np.zeros(C), np.ones(C), np.zeros(1, np.int64)
    K.local_forward(x, w, b, 1e-5, out, stats, None, rm, rv, 0.1, batches, threads,
                    residual=r, activation=code, negative_slope=slope, preact=pre)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(stats[0], x64.mean(channel_dims(x)), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(stats[2], x64.var(channel_dims(x)), rtol=1e-10)
    np.testing.assert_allclose(rm, 0.1 * stats[0], rtol=1e-12, atol=1e-15)
    assert batches[0] == 1
    z, y = ref_forward(x, stats[0], stats[1], w, b, r, code, slope)
    scale = (np.abs(x - per_channel_np(stats[0], x)) * per_channel_np(stats[1] * np.abs(w), x)
             + per_channel_np(np.abs(b), x) + (0.0 if r is None else np.abs(r)))
    assert_close(out, y, dtype, "out", scale)
    if pre is not None:
        assert_close(pre, z, dtype, "preact", scale)
    if threads > 1 and x.ndim == 3:
        # channel by channel: the same arithmetic whatever the split
        # (see assert_same_arithmetic; rows are summed per share, so there the
        # split changes the order of the additions)
        out1, stats1 = np.empty_like(x), np.empty((3, C))
        pre1 = np.empty_like(x) if needs_z else None
        K.local_forward(x, w, b, 1e-5, out1, stats1, num_threads=1, residual=r,
                        activation=code, negative_slope=slope, preact=pre1)
        np.testing.assert_array_equal(stats, stats1)
        assert_same_arithmetic(out, out1, residual, scale)
        if pre is not None:
            assert_same_arithmetic(pre, pre1, residual, scale)


# --- backward --------------------------------------------------------------------------

def backward_inputs(shape: tuple[int, ...], dtype: type, residual: bool, code: int,
                    slope: float) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                           dict[str, np.ndarray]]:
    x, r, w, b = forward_inputs(shape, dtype, residual, seed=10)
    dy = make(shape, dtype, 14, loc=0.1, scale=1.0)
    return x, dy, w, ref_backward(x, dy, w, b, r, code, slope)


def dz_scale(dy: np.ndarray, ref: dict[str, np.ndarray]) -> np.ndarray:
    """The size of dz's terms: |dy| (1 + |z|) (silu's derivative cancels near z = -1.28)."""
    return np.abs(dy.astype(np.float64)) * (1.0 + np.abs(ref["z"]))


def dx_scale(x: np.ndarray, dy: np.ndarray, w: np.ndarray,
             ref: dict[str, np.ndarray]) -> np.ndarray:
    """The size of dx's terms: dz (with its own error) and the two per-channel corrections."""
    dims = channel_dims(x)
    xhat = (x - per_channel_np(ref["mean"], x)) * per_channel_np(ref["invstd"], x)
    adz = np.abs(ref["dz"])
    c1 = adz.mean(dims, keepdims=True)
    c2 = (adz * np.abs(xhat)).mean(dims, keepdims=True)
    return ((dz_scale(dy, ref) + c1 + np.abs(xhat) * c2)
            * per_channel_np(ref["invstd"] * np.abs(w), x))


def ref_sums(x: np.ndarray, dy: np.ndarray,
             ref: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """[sum(dz), sum(dz * (x - mean))] and the sums of the |terms| (with dz's error)."""
    dz, xm = channels_last(ref["dz"]), channels_last(x) - ref["mean"]
    s = channels_last(dz_scale(dy, ref))
    return (np.concatenate([column_sums(dz), column_sums(dz * xm)]),
            np.concatenate([s.sum(0), (s * np.abs(xm)).sum(0)]))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("residual", [False, True], ids=["no residual", "residual"])
@pytest.mark.parametrize("act", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
def test_backward_reduce_and_input(act: tuple[int, float], residual: bool, dtype: type,
                                   case: tuple[tuple[int, ...], int]) -> None:
    """backward_reduce writes dz and sums over it; backward_input on dz gives dx.
    Without a residual dx goes over dz in place (as the layer does), with one
    dz is kept (the residual's gradient)."""
    (code, slope), (shape, threads) = act, case
    x, dy, w, ref = backward_inputs(shape, dtype, residual, code, slope)
    C = shape[1]
    mean, invstd = ref["mean"], ref["invstd"]
    sums = np.full(2 * C, np.nan)
    gw, gb = np.full(C, np.nan, dtype), np.full(C, np.nan, dtype)
    if code == K.ACT_NONE:
        K.backward_reduce(dy, x, mean, sums, threads, invstd, gw, gb)
        gz = dy.copy()
    else:
        gz = np.full_like(dy, np.nan)
        K.backward_reduce(dy, x, mean, sums, threads, invstd, gw, gb, activation=code,
                          negative_slope=slope, saved=ref["saved"], grad_preact=gz)
    assert_close(gz, ref["dz"], dtype, "grad_preact", dz_scale(dy, ref))
    want, scale = ref_sums(x, dy, ref)
    assert_sums_close(sums, want, scale, dtype, "sums")
    assert_sums_close(gb, ref["gb"], scale[:C], dtype, "grad_bias")
    assert_sums_close(gw, ref["gw"], scale[C:] * invstd, dtype, "grad_weight")
    if threads > 1 and code != K.ACT_NONE:
        gz1 = np.empty_like(dy)
        K.backward_reduce(dy, x, mean, np.empty(2 * C), 1, activation=code,
                          negative_slope=slope, saved=ref["saved"], grad_preact=gz1)
        np.testing.assert_array_equal(gz, gz1)
    dx = np.full_like(x, np.nan) if residual else gz
    K.backward_input(gz, x, mean, invstd, w, sums[:C], sums[C:], dx, threads,
                     float(x.size // C))
    assert_close(dx, ref["dx"], dtype, "dx", dx_scale(x, dy, w, ref))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("residual", [False, True], ids=["no residual", "residual"])
@pytest.mark.parametrize("act", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
def test_local_backward(act: tuple[int, float], residual: bool, dtype: type,
                        case: tuple[tuple[int, ...], int]) -> None:
    """Without a residual dx goes into grad_preact itself (out=grad_preact), as
    the layer does; with one, dz is kept in grad_preact."""
    (code, slope), (shape, threads) = act, case
    x, dy, w, ref = backward_inputs(shape, dtype, residual, code, slope)
    C = shape[1]
    mean, invstd = ref["mean"], ref["invstd"]
    gw, gb = np.full(C, np.nan, dtype), np.full(C, np.nan, dtype)
    fused: dict[str, object] = {}
    gz: np.ndarray | None = None
    if code != K.ACT_NONE:
        gz = np.full_like(dy, np.nan)
        fused = {"activation": code, "negative_slope": slope, "saved": ref["saved"],
                 "grad_preact": gz}
    dx = gz if gz is not None and not residual else np.full_like(x, np.nan)
    K.local_backward(dy, x, mean, invstd, w, dx, gw, gb, threads, **fused)
    _, scale = ref_sums(x, dy, ref)
    assert_sums_close(gb, ref["gb"], scale[:C], dtype, "grad_bias")
    assert_sums_close(gw, ref["gw"], scale[C:] * invstd, dtype, "grad_weight")
    assert_close(dx, ref["dx"], dtype, "dx", dx_scale(x, dy, w, ref))
    if gz is not None and residual:
        assert_close(gz, ref["dz"], dtype, "grad_preact", dz_scale(dy, ref))
    if threads > 1 and x.ndim == 3:
        # channel by channel: the same arithmetic whatever the split
        dx1 = np.empty_like(x)
        if gz is not None:
            fused["grad_preact"] = np.empty_like(dy)
        K.local_backward(dy, x, mean, invstd, w, dx1, None, None, 1, **fused)
        np.testing.assert_array_equal(dx, dx1)


# --- boundaries: z = 0 and 6, signed zeros, NaN and infinities, against torch ---------

SPECIAL = [-np.inf, -7.0, -1.2785, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 3.0, 5.999, 6.0,
           6.0001, 40.0, np.inf, np.nan]


def special_values(dtype: type, layout: str) -> np.ndarray:
    v = np.array(SPECIAL, dtype)
    return v.reshape(2, 1, -1) if layout == "runs" else v.reshape(-1, 1)


@pytest.mark.parametrize("layout", ["runs", "rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("via", ["x", "residual"])
@pytest.mark.parametrize("act", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
def test_boundary_values_as_torch(act: tuple[int, float], via: str, dtype: type,
                                  layout: str) -> None:
    """z = x exactly (mean 0, invstd 1), or z = 0 + residual: the forward and
    the backward against torch in the data's own dtype.

    The backward's reference is taken one value at a time: torch's relu6
    backward (hardtanh_backward) passes dy at z = NaN in its scalar loop
    (``(z <= 0 || z >= 6) ? 0 : dy``, also its decomposition, which
    torch.compile uses) but gives 0 in its vector loop (a ``0 < z < 6`` mask),
    so in eager mode the answer depends on where the NaN sits. The kernels
    follow the formula."""
    code, slope = act
    z = special_values(dtype, layout)
    x, r = (z, None) if via == "x" else (np.zeros_like(z), z)
    one, zero = np.ones(1), np.zeros(1)
    out, pre = np.empty_like(z), np.empty_like(z)
    needs_z = code != K.ACT_NONE
    K.normalize(x, zero, one, None, None, out, 1, residual=r, activation=code,
                negative_slope=slope, preact=pre if needs_z else None)
    y = torch_activation(code, slope)(torch.from_numpy(z.copy())).numpy()
    dy = np.linspace(-2.0, 3.0, z.size).astype(dtype).reshape(z.shape)
    dz = np.empty_like(z)
    for i in np.ndindex(z.shape):
        zt = torch.tensor([z[i]]).requires_grad_()
        (dzt,) = torch.autograd.grad(torch_activation(code, slope)(zt), zt,
                                     torch.tensor([dy[i]]))
        dz[i] = dzt.item()
    # silu: exp differs between libraries by an ulp, and silu' cancels near z = -1.28
    silu_tol = {"rtol": 8 * np.finfo(dtype).eps, "atol": 16 * np.finfo(dtype).eps}
    if code == K.ACT_SILU:
        np.testing.assert_allclose(out, y, **silu_tol)
    else:
        np.testing.assert_array_equal(out, y)
    if needs_z:
        np.testing.assert_array_equal(pre, z)
    if code == K.ACT_NONE:
        return
    saved = out if K.activation_uses_output(code, slope) else pre
    gz = np.empty_like(z)
    sums = np.empty(2)
    K.backward_reduce(dy, z, zero, sums, 1, activation=code, negative_slope=slope,
                      saved=saved, grad_preact=gz)
    if code == K.ACT_SILU:
        np.testing.assert_allclose(gz, dz, **silu_tol)
    else:
        np.testing.assert_array_equal(gz, dz)
    if layout == "runs":
        gz2 = np.empty_like(z)
        K.local_backward(dy, z, zero, one, None, None, None, None, 1, activation=code,
                         negative_slope=slope, saved=saved, grad_preact=gz2)
        np.testing.assert_array_equal(gz2, gz)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_silu_across_the_range(dtype: type) -> None:
    """silu and its derivative (the kernels' own exp) against float64 torch,
    over z from -800 to 800: a few ulps of the value, and of exp's tail
    (past |z| = 87, float32; 708, float64) a tiny absolute error."""
    eps = np.finfo(dtype).eps
    tiny = 1e-36 if dtype == np.float32 else 1e-305
    z = np.concatenate([np.linspace(-800.0, 800.0, 100001), np.linspace(-100.0, 100.0, 100001),
                        np.linspace(-2.0, 2.0, 10001)]).astype(dtype).reshape(1, 1, -1)
    z = z[np.isfinite(z)].reshape(1, 1, -1)
    out, pre = np.empty_like(z), np.empty_like(z)
    K.normalize(z, np.zeros(1), np.ones(1), None, None, out, 1, activation=K.ACT_SILU,
                preact=pre)
    zt = torch.from_numpy(z.astype(np.float64)).requires_grad_()
    yt = F.silu(zt)
    dy = np.full_like(z, 1.5)
    (dzt,) = torch.autograd.grad(yt, zt, torch.from_numpy(dy.astype(np.float64)))
    y = yt.detach().numpy()
    assert np.all(np.abs(out - y) <= 4 * eps * np.abs(y) + tiny), \
        f"silu: max error / |silu| {np.max(np.abs(out - y) / (np.abs(y) + tiny))}"
    gz = np.empty_like(z)
    K.backward_reduce(dy, z, np.zeros(1), np.empty(2), 1, activation=K.ACT_SILU, saved=pre,
                      grad_preact=gz)
    dz = dzt.numpy()
    # silu' has a zero near z = -1.28, where the rounding of its terms counts
    assert np.all(np.abs(gz - dz) <= 8 * eps * (np.abs(dz) + np.abs(dy) * (1 + np.abs(z))) + tiny), \
        "silu backward"


# --- aliasing --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["runs", "rows"])
@pytest.mark.parametrize("target", ["x", "residual"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_normalize_out_may_be_x_or_residual(act: str, target: str, layout: str) -> None:
    code, slope = ACTIVATIONS[act]
    shape = (3, 4, 37) if layout == "runs" else (45, 4)
    x, r, w, b = forward_inputs(shape, np.float32, True)
    mean, invstd = np.full(4, 0.25), np.full(4, 0.8)
    pre = np.empty_like(x) if act == "silu" else None
    expected, pre_expected = np.empty_like(x), np.empty_like(x) if pre is not None else None
    K.normalize(x, mean, invstd, w, b, expected, 1, residual=r, activation=code,
                negative_slope=slope, preact=pre_expected)
    out = x if target == "x" else r
    K.normalize(x, mean, invstd, w, b, out, 1, residual=r, activation=code,
                negative_slope=slope, preact=pre)
    np.testing.assert_array_equal(out, expected)
    if pre is not None:
        np.testing.assert_array_equal(pre, pre_expected)


@pytest.mark.parametrize("target", ["x", "residual"])
def test_local_forward_out_may_be_x_or_residual(target: str) -> None:
    code, slope = ACTIVATIONS["leaky_relu<0"]
    x, r, w, b = forward_inputs((3, 4, 37), np.float64, True)
    expected, pre_expected = np.empty_like(x), np.empty_like(x)
    K.local_forward(x, w, b, 1e-5, expected, np.empty((3, 4)), residual=r, activation=code,
                    negative_slope=slope, preact=pre_expected)
    out, pre = (x if target == "x" else r), np.empty_like(x)
    K.local_forward(x, w, b, 1e-5, out, np.empty((3, 4)), residual=r, activation=code,
                    negative_slope=slope, preact=pre)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(pre, pre_expected)


@pytest.mark.parametrize("layout", ["runs", "rows"])
@pytest.mark.parametrize("target", ["dy", "saved"])
def test_backward_reduce_grad_preact_may_be_dy_or_saved(target: str, layout: str) -> None:
    code, slope = ACTIVATIONS["relu6"]
    shape = (3, 4, 37) if layout == "runs" else (45, 4)
    x, dy, _, ref = backward_inputs(shape, np.float32, True, code, slope)
    saved = ref["saved"]
    gz, sums = np.empty_like(dy), np.empty(8)
    K.backward_reduce(dy, x, ref["mean"], sums, 1, activation=code, negative_slope=slope,
                      saved=saved, grad_preact=gz)
    into = dy if target == "dy" else saved
    sums2 = np.empty(8)
    K.backward_reduce(dy, x, ref["mean"], sums2, 1, activation=code, negative_slope=slope,
                      saved=saved, grad_preact=into)
    np.testing.assert_array_equal(into, gz)
    # (the same sums, perhaps added in another order: aliased arrays may keep
    # the compiler's vector loop from running)
    np.testing.assert_allclose(sums2, sums, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("out_is", ["grad_preact", "dy", "x", "saved"])
def test_local_backward_out_may_be_any_input_but_grad_preact_not_x(out_is: str) -> None:
    code, slope = ACTIVATIONS["silu"]
    x, dy, w, ref = backward_inputs((3, 4, 37), np.float64, False, code, slope)
    args = (ref["mean"], ref["invstd"], w)
    gz, dx = np.empty_like(dy), np.empty_like(dy)
    gw, gb = np.empty(4), np.empty(4)
    K.local_backward(dy, x, *args, dx, gw, gb, 1, activation=code, negative_slope=slope,
                     saved=ref["saved"], grad_preact=gz)
    dy2, x2, saved2, gz2 = dy.copy(), x.copy(), ref["saved"].copy(), np.empty_like(dy)
    out = {"grad_preact": gz2, "dy": dy2, "x": x2, "saved": saved2}[out_is]
    gw2, gb2 = np.empty(4), np.empty(4)
    K.local_backward(dy2, x2, *args, out, gw2, gb2, 1, activation=code, negative_slope=slope,
                     saved=saved2, grad_preact=gz2)
    np.testing.assert_array_equal(out, dx)
    np.testing.assert_array_equal(gw2, gw)
    np.testing.assert_array_equal(gb2, gb)
    if out_is != "grad_preact":
        np.testing.assert_array_equal(gz2, gz)


# --- negative controls: the references tell the options apart -------------------------

@pytest.mark.parametrize("act", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
def test_other_activations_do_not_match(act: tuple[int, float]) -> None:
    """Each kernel output matches its own activation's reference and no other's,
    nor the reference without the residual: the tests above can fail."""
    code, slope = act
    x, r, w, b = forward_inputs((4, 3, 50), np.float64, True)
    mean, invstd = np.zeros(3), np.ones(3)
    out = np.empty_like(x)
    pre = None if K.activation_uses_output(code, slope) else np.empty_like(x)
    K.normalize(x, mean, invstd, w, b, out, 1, residual=r, activation=code,
                negative_slope=slope, preact=pre)
    dy = make(x.shape, np.float64, 5)
    own = ref_backward(x, dy, w, b, r, code, slope)
    gz = dy
    if code != K.ACT_NONE:
        gz = np.empty_like(x)
        K.backward_reduce(dy, x, own["mean"], np.empty(6), 1, activation=code,
                          negative_slope=slope, saved=own["saved"], grad_preact=gz)
    for other_id, (other, other_slope) in ACTIVATIONS.items():
        same = (other, other_slope) == (code, slope)
        _, y = ref_forward(x, mean, invstd, w, b, r, other, other_slope)
        assert np.allclose(out, y, rtol=1e-9, atol=1e-9) == same, f"forward, {other_id}"
        dz = ref_backward(x, dy, w, b, r, other, other_slope)["dz"]
        assert np.allclose(gz, dz, rtol=1e-9, atol=1e-9) == same, f"backward, {other_id}"
    _, y = ref_forward(x, mean, invstd, w, b, None, code, slope)
    assert not np.allclose(out, y, rtol=1e-3, atol=1e-3), "the residual was not added"


# --- empty tensors ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 3, 0), (0, 3)], ids=str)
def test_empty(shape: tuple[int, ...]) -> None:
    x = np.zeros(shape, np.float32)
    C = shape[1]
    silu = {"activation": K.ACT_SILU, "negative_slope": 0.01}
    K.normalize(x, np.zeros(C), np.ones(C), None, None, np.empty_like(x), 2, residual=x,
                preact=np.empty_like(x), **silu)
    sums, gw, gb = np.full(2 * C, np.nan), np.full(C, np.nan), np.full(C, np.nan)
    K.backward_reduce(x, x, np.zeros(C), sums, 2, np.ones(C), gw, gb, saved=x,
                      grad_preact=np.empty_like(x), **silu)
    assert (sums == 0).all() and (gw == 0).all() and (gb == 0).all()
    if x.ndim == 3:
        gw[:], gb[:] = np.nan, np.nan
        K.local_backward(x, x, np.zeros(C), np.ones(C), None, np.empty_like(x), gw, gb, 2,
                         saved=x, grad_preact=np.empty_like(x), **silu)
        assert (gw == 0).all() and (gb == 0).all()
    z = np.zeros((2, 0, 4))
    K.local_forward(z, None, None, 1e-5, z, np.empty((3, 0)), residual=z, preact=z.copy(),
                    **silu)


# --- activation_uses_output and errors -------------------------------------------------

def test_activation_uses_output() -> None:
    assert (K.ACT_NONE, K.ACT_RELU, K.ACT_RELU6, K.ACT_LEAKY_RELU, K.ACT_SILU) == (0, 1, 2, 3, 4)
    assert all(type(c) is int for c in (K.ACT_NONE, K.ACT_SILU))
    assert K.activation_uses_output(K.ACT_NONE, 0.01)
    assert K.activation_uses_output(K.ACT_RELU, -1.0)
    assert K.activation_uses_output(K.ACT_RELU6, 0.01)
    assert K.activation_uses_output(K.ACT_LEAKY_RELU, 0.01)
    assert K.activation_uses_output(K.ACT_LEAKY_RELU, 0.0)
    assert not K.activation_uses_output(K.ACT_LEAKY_RELU, -0.01)
    assert not K.activation_uses_output(K.ACT_LEAKY_RELU, float("nan"))
    assert not K.activation_uses_output(K.ACT_SILU, 0.01)


def f32(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


def vec(n: int) -> np.ndarray:
    return np.zeros(n)


def read_only(*shape: int) -> np.ndarray:
    a = f32(*shape)
    a.flags.writeable = False
    return a


CODES = r"expected one of ACT_NONE \(0\), ACT_RELU \(1\), ACT_RELU6 \(2\), " \
        r"ACT_LEAKY_RELU \(3\), ACT_SILU \(4\) \(got {}\)"


def _normalize(**kw: object) -> Callable[[], None]:
    x = kw.pop("x", f32(2, 3, 4))
    out = kw.pop("out", f32(2, 3, 4))
    return lambda: K.normalize(x, vec(3), vec(3), None, None, out, 1, **kw)


def _reduce(**kw: object) -> Callable[[], None]:
    x = kw.pop("x", f32(2, 3, 4))
    return lambda: K.backward_reduce(f32(2, 3, 4), x, vec(3), vec(6), 1, **kw)


def _local_backward(**kw: object) -> Callable[[], None]:
    x = kw.pop("x", f32(2, 3, 4))
    return lambda: K.local_backward(f32(2, 3, 4), x, vec(3), vec(3), None, f32(2, 3, 4), **kw)


def _local_forward(**kw: object) -> Callable[[], None]:
    return lambda: K.local_forward(f32(2, 3, 4), None, None, 1e-5, f32(2, 3, 4),
                                   np.empty((3, 3)), **kw)


_shared = f32(2, 3, 4)

# (kernel call, error type, regex naming what was expected and what came)
ERRORS = {
    "unknown code": (lambda: K.activation_uses_output(5, 0.0), ValueError, CODES.format(5)),
    "negative code": (_normalize(activation=-1), ValueError, CODES.format(-1)),
    "unknown code, local_forward": (_local_forward(activation=9), ValueError, CODES.format(9)),
    "unknown code, backward_reduce": (_reduce(activation=7), ValueError, CODES.format(7)),
    "unknown code, local_backward": (_local_backward(activation=7), ValueError, CODES.format(7)),
    "residual shape": (
        _normalize(residual=f32(2, 3, 5), activation=K.ACT_RELU), ValueError,
        r"residual: expected shape \(2, 3, 4\) like x \(got \(2, 3, 5\)\)"),
    "residual shape, local_forward": (
        _local_forward(residual=f32(2, 4, 4)), ValueError,
        r"residual: expected shape \(2, 3, 4\) like x \(got \(2, 4, 4\)\)"),
    "residual dtype": (
        _normalize(residual=np.zeros((2, 3, 4))), TypeError,
        r"residual: expected dtype float32 like x \(got float64\)"),
    "residual not an array": (
        _normalize(residual=[0.0]), TypeError, r"residual: expected a numpy.ndarray \(got list\)"),
    "preact without activation": (
        _normalize(preact=f32(2, 3, 4)), ValueError, r"preact: expected None with ACT_NONE"),
    "preact is out": (
        _normalize(out=_shared, preact=_shared, activation=K.ACT_SILU), ValueError,
        r"preact: expected an array apart from out \(got out itself\)"),
    "preact read-only": (
        _normalize(preact=read_only(2, 3, 4), activation=K.ACT_SILU), ValueError,
        r"preact: expected a writeable array \(got a read-only one\)"),
    "grad_preact read-only": (
        _reduce(activation=K.ACT_RELU, saved=f32(2, 3, 4), grad_preact=read_only(2, 3, 4)),
        ValueError, r"grad_preact: expected a writeable array \(got a read-only one\)"),
    "missing saved": (
        _reduce(activation=K.ACT_RELU, grad_preact=f32(2, 3, 4)), ValueError,
        r"saved: expected an array like dy with an activation \(got None\)"),
    "missing grad_preact": (
        _reduce(activation=K.ACT_SILU, saved=f32(2, 3, 4)), ValueError,
        r"grad_preact: expected an array like dy with an activation \(got None\)"),
    "missing saved, local_backward": (
        _local_backward(activation=K.ACT_RELU6, grad_preact=f32(2, 3, 4)), ValueError,
        r"saved: expected an array like dy with an activation \(got None\)"),
    "missing grad_preact, local_backward": (
        _local_backward(activation=K.ACT_LEAKY_RELU, saved=f32(2, 3, 4)), ValueError,
        r"grad_preact: expected an array like dy with an activation \(got None\)"),
    "saved shape": (
        _reduce(activation=K.ACT_RELU, saved=f32(2, 3), grad_preact=f32(2, 3, 4)), ValueError,
        r"saved: expected shape \(2, 3, 4\) like dy \(got \(2, 3\)\)"),
    "saved without activation": (
        _reduce(saved=f32(2, 3, 4)), ValueError, r"saved: expected None with ACT_NONE"),
    "grad_preact without activation": (
        _local_backward(grad_preact=f32(2, 3, 4)), ValueError,
        r"grad_preact: expected None with ACT_NONE"),
    "grad_preact is x": (
        _reduce(x=_shared, activation=K.ACT_RELU, saved=f32(2, 3, 4), grad_preact=_shared),
        ValueError, r"grad_preact: expected an array apart from x"),
    "grad_preact is x, local_backward": (
        _local_backward(x=_shared, activation=K.ACT_RELU, saved=f32(2, 3, 4),
                        grad_preact=_shared),
        ValueError, r"grad_preact: expected an array apart from x"),
    "activation not an int": (_normalize(activation="relu"), TypeError, r"integer"),
}


@pytest.mark.parametrize("call, error, message", ERRORS.values(), ids=ERRORS.keys())
def test_errors_say_what_was_expected_and_what_came(
        call: Callable[[], None], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_errors_leave_outputs_untouched() -> None:
    x = f32(2, 3, 4)
    out, gz, sums = np.full_like(x, 7.0), np.full_like(x, 7.0), np.full(6, 7.0)
    with pytest.raises(ValueError):
        K.normalize(x, vec(3), vec(3), None, None, out, residual=f32(2, 3, 5),
                    activation=K.ACT_RELU)
    with pytest.raises(ValueError):
        K.backward_reduce(x, x, vec(3), sums, activation=K.ACT_RELU, grad_preact=gz)
    with pytest.raises(ValueError):
        K.local_backward(x, x, vec(3), vec(3), None, out, activation=K.ACT_RELU,
                         saved=f32(2, 3, 5), grad_preact=gz)
    assert (out == 7.0).all() and (gz == 7.0).all() and (sums == 7.0).all()

