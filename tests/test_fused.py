"""Single-process tests of the fused layer ``activation(bn(x) + residual)``.

``SyncBatchNorm(C, activation=...)(x, residual)`` against torch's
composition of the same steps (``BatchNorm``, ``+``, the activation
function): outputs, the gradients of the input, the residual and the affine
parameters, and the running statistics, step after step, in both the
group-of-one kernels and the synchronized ones (a partner rank without
samples). The multi-process cases are in dist_worker.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn as nn

from batchnorm_data import C, LAYOUTS, TOL, PartnerWithoutSamples, apply_activation, batch, set_random_affine
import syncbn
from syncbn.comm import Communicator, LocalCommunicator


# the fused activations round once more than the reference's composition
TOL = {**TOL, torch.float32: dict(atol=3e-5, rtol=3e-5)}
# (activation, negative_slope): every activation, and leaky_relu with a
# negative slope, whose derivative needs the pre-activation
ACTIVATIONS = [
    (None, 0.01),
    ("relu", 0.01),
    ("relu6", 0.01),
    ("leaky_relu", 0.2),
    ("leaky_relu", -0.5),
    ("silu", 0.01),
]


def _act_id(a: tuple[Optional[str], float]) -> str:
    return f"{a[0]}({a[1]})" if a[0] == "leaky_relu" else str(a[0])


def _pair(
    ref_cls: type[nn.Module],
    dtype: torch.dtype,
    activation: Optional[str],
    slope: float,
    comm: Communicator,
    **kwargs,
) -> tuple[syncbn.SyncBatchNorm, nn.Module]:
    ours = syncbn.SyncBatchNorm(
        C, dtype=dtype, process_group=comm, activation=activation, negative_slope=slope, **kwargs
    )
    ref = ref_cls(C, dtype=dtype, **kwargs)
    set_random_affine(ours, 7)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _compare_steps(
    ours: syncbn.SyncBatchNorm,
    ref: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    fmt: torch.memory_format,
    residual: bool,
    steps: int = 3,
    tol: Optional[dict] = None,
    ref_dtype: Optional[torch.dtype] = None,
) -> None:
    """Train steps of the fused layer and of torch's composition on the same
    data (the reference in ``ref_dtype``, default ``dtype``); everything must match."""
    tol = tol or TOL[dtype]
    ref_dtype = ref_dtype or dtype
    gen = torch.Generator().manual_seed(3)
    for step in range(steps):
        x, g = batch(shape, gen, dtype, fmt)
        # a residual of the same scale as the normalized output, so the
        # activations see both signs (and relu6 its upper bound)
        r = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype) if residual else None
        xa = x.clone().requires_grad_()
        ra = None if r is None else r.clone().requires_grad_()
        xb = x.to(ref_dtype).requires_grad_()
        rb = None if r is None else r.to(ref_dtype).requires_grad_()
        ya = ours(xa) if ra is None else ours(xa, ra)
        zb = ref(xb) if rb is None else ref(xb) + rb
        yb = apply_activation(zb, ours.activation, ours.negative_slope)
        (ya * g).sum().backward()
        (yb * g.to(ref_dtype)).sum().backward()
        torch.testing.assert_close(ya.to(ref_dtype), yb, **tol, msg=lambda m: f"step {step} output: {m}")
        assert ya.dtype == dtype and ya.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(
            xa.grad.to(ref_dtype), xb.grad, **tol, msg=lambda m: f"step {step} input grad: {m}"
        )
        if ra is not None:
            assert ra.grad is not None and ra.grad.dtype == dtype
            torch.testing.assert_close(
                ra.grad.to(ref_dtype), rb.grad, **tol, msg=lambda m: f"step {step} residual grad: {m}"
            )
        for name in ("weight", "bias"):
            pa, pb = getattr(ours, name), getattr(ref, name)
            if pb is None:
                assert pa is None
                continue
            torch.testing.assert_close(
                pa.grad.to(ref_dtype), pb.grad, **tol, msg=lambda m: f"step {step} {name} grad: {m}"
            )
        for name in ("running_mean", "running_var"):
            a, b = getattr(ours, name), getattr(ref, name)
            if b is not None:
                torch.testing.assert_close(
                    a.to(ref_dtype), b, **tol, msg=lambda m: f"step {step} {name}: {m}"
                )
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("group", ["alone", "synchronized"])
@pytest.mark.parametrize(
    "act, residual",
    # every activation with and without a residual, and the residual alone
    # (the plain layer is test_module.py's)
    [(act, residual) for act in ACTIVATIONS for residual in (False, True) if act[0] is not None or residual],
    ids=lambda v: _act_id(v) if isinstance(v, tuple) else ("residual" if v else "no_residual"),
)
def test_matches_torch_composition(
    act: tuple[Optional[str], float], residual: bool, group: str, layout: str, dtype: torch.dtype
) -> None:
    comm = LocalCommunicator() if group == "alone" else PartnerWithoutSamples()
    shape, ref_cls, fmt = LAYOUTS[layout]
    ours, ref = _pair(ref_cls, dtype, act[0], act[1], comm)
    _compare_steps(ours, ref, shape, dtype, fmt, residual)
    # fused: still one collective per pass, none alone
    assert ours.communicator.calls == (0 if group == "alone" else 2 * 3)


@pytest.mark.parametrize("act", [("relu", 0.01), ("silu", 0.01)], ids=_act_id)
@pytest.mark.parametrize(
    "kwargs", [{"momentum": None}, {"affine": False}, {"track_running_stats": False}], ids=str
)
def test_layer_options(act: tuple[Optional[str], float], kwargs: dict) -> None:
    shape, ref_cls, fmt = LAYOUTS["4d"]
    ours, ref = _pair(ref_cls, torch.float64, act[0], act[1], LocalCommunicator(), **kwargs)
    _compare_steps(ours, ref, shape, torch.float64, fmt, residual=True)


@pytest.mark.parametrize("layout", ["4d", "channels_last", "2d"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", [("relu", 0.01), ("silu", 0.01), ("leaky_relu", -0.5)], ids=_act_id)
def test_half_precision_against_float32(
    act: tuple[Optional[str], float], dtype: torch.dtype, layout: str
) -> None:
    shape, ref_cls, fmt = LAYOUTS[layout]
    ours, ref = _pair(ref_cls, torch.float32, act[0], act[1], LocalCommunicator())
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.float16 else dict(atol=1e-1, rtol=5e-2)
    _compare_steps(ours, ref, shape, dtype, fmt, residual=True, tol=tol, ref_dtype=torch.float32)


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("act", ACTIVATIONS[1:], ids=_act_id)
def test_eval_uses_running_stats(act: tuple[Optional[str], float], grad_enabled: bool) -> None:
    shape, ref_cls, fmt = LAYOUTS["channels_last"]
    ours, ref = _pair(ref_cls, torch.float32, act[0], act[1], PartnerWithoutSamples())
    _compare_steps(ours, ref, shape, torch.float32, fmt, residual=True, steps=2)
    ours.eval()
    ref.eval()
    gen = torch.Generator().manual_seed(5)
    x, _ = batch(shape, gen, torch.float32, fmt)
    r = torch.randn(shape, generator=gen)
    with torch.set_grad_enabled(grad_enabled):
        y = ours(x, r)
    expected = apply_activation(ref(x) + r, act[0], act[1])
    torch.testing.assert_close(y, expected, **TOL[torch.float32])
    assert ours.communicator.calls == 2 * 2  # eval: no collective


@pytest.mark.parametrize("group", ["alone", "synchronized"])
@pytest.mark.parametrize("layout", ["4d", "channels_last", "2d"])
def test_empty_batch(layout: str, group: str) -> None:
    """An empty batch (a rank without samples) gives empty outputs and
    gradients and leaves the statistics alone, fused as plain."""
    shape, _, fmt = LAYOUTS[layout]
    comm = LocalCommunicator() if group == "alone" else PartnerWithoutSamples()
    layer = syncbn.SyncBatchNorm(C, activation="silu", process_group=comm)
    x = torch.randn((0,) + shape[1:]).contiguous(memory_format=fmt).requires_grad_()
    r = torch.randn((0,) + shape[1:]).contiguous(memory_format=fmt).requires_grad_()
    y = layer(x, r)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * 2).sum().backward()
    assert x.grad.shape == x.shape and r.grad.shape == r.shape
    assert not layer.weight.grad.any() and not layer.bias.grad.any()
    assert int(layer.num_batches_tracked) == 0
    assert not layer.running_mean.any()


@pytest.mark.parametrize("act", ACTIVATIONS, ids=_act_id)
def test_gradcheck(act: tuple[Optional[str], float]) -> None:
    for comm in (LocalCommunicator(), PartnerWithoutSamples()):
        layer = syncbn.SyncBatchNorm(
            C,
            dtype=torch.float64,
            activation=act[0],
            negative_slope=act[1],
            process_group=comm,
            track_running_stats=False,
        )
        set_random_affine(layer, 11)
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(4, C, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        # away from the kinks of relu/relu6/leaky_relu, where the derivative jumps
        r = torch.randn(4, C, 5, generator=gen, dtype=torch.float64)
        r = (r + 0.3 * r.sign()).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x, r, w, b: layer(x, r), (x, r, layer.weight, layer.bias), atol=1e-6
        )


def test_reference_comparison_can_fail() -> None:
    """Negative controls: the same data through another activation, or
    without the residual, gives other outputs, so the comparisons above can fail."""
    shape, ref_cls, fmt = LAYOUTS["4d"]
    ours, ref = _pair(ref_cls, torch.float32, "silu", 0.01, LocalCommunicator())
    x, _ = batch(shape, torch.Generator().manual_seed(1), torch.float32, fmt)
    r = torch.randn(shape)
    assert torch.allclose(ours(x, r), torch.nn.functional.silu(ref(x) + r), atol=1e-5)
    assert not torch.allclose(ours(x, r), torch.relu(ref(x) + r), atol=1e-3)
    assert not torch.allclose(ours(x, r), torch.nn.functional.silu(ref(x)), atol=1e-3)


def test_output_modified_in_place_before_backward_is_an_error() -> None:
    """relu's derivative is read from the output it saved, as torch's relu does."""
    layer = syncbn.SyncBatchNorm(C, activation="relu")
    x = torch.randn(4, C, 5, requires_grad=True)
    y = layer(x)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.zeros(4, C, 6), ValueError, r"residual of the input's shape \[4, 3, 5\] \(got \[4, 3, 6\]\)"),
        (torch.zeros(1, C, 5), ValueError, "input's shape"),  # no broadcasting
        (
            torch.zeros(4, C, 5, dtype=torch.float64),
            TypeError,
            "input's dtype torch.float32 .got torch.float64",
        ),
        ([0.0] * 5, TypeError, "torch.Tensor .got list"),
    ],
)
def test_bad_residual_raises(bad: object, error: type[Exception], match: str) -> None:
    for layer in (syncbn.SyncBatchNorm(C, activation="relu"), syncbn.BatchNorm(C, activation="relu")):
        with pytest.raises(error, match=match):
            layer(torch.randn(4, C, 5), bad)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"activation": "gelu"}, ValueError, "one of 'relu', 'relu6', 'leaky_relu', 'silu' .got 'gelu'"),
        ({"activation": "ReLU"}, ValueError, "got 'ReLU'"),
        ({"activation": "relu", "negative_slope": "0.1"}, TypeError, "negative_slope: expected a float"),
    ],
)
def test_bad_activation_raises(kwargs: dict, error: type[Exception], match: str) -> None:
    for cls in (syncbn.SyncBatchNorm, syncbn.BatchNorm):
        with pytest.raises(error, match=match):
            cls(C, **kwargs)
    layer = syncbn.SyncBatchNorm(C)
    with pytest.raises(error, match=match):
        for name, value in kwargs.items():
            setattr(layer, name, value)


def test_repr_and_revert_keep_the_activation() -> None:
    layer = syncbn.SyncBatchNorm(C, activation="leaky_relu", negative_slope=0.2)
    assert "activation='leaky_relu', negative_slope=0.2" in repr(layer)
    plain = syncbn.revert_sync_batchnorm(layer)
    assert type(plain) is syncbn.BatchNorm and plain.activation == "leaky_relu"
    assert plain.negative_slope == 0.2
    x, r = torch.randn(4, C, 5), torch.randn(4, C, 5)
    torch.testing.assert_close(plain(x, r), layer(x, r))


def _peak_bytes(step) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        from bench import torch_alloc_peaks
    finally:
        sys.path.pop(0)
    peaks = torch_alloc_peaks({"step": step})
    if peaks is None:
        pytest.skip("this torch's profiler does not expose allocation events")
    return peaks["step"]


@pytest.mark.parametrize("layout", ["4d", "channels_last"])
@pytest.mark.parametrize("act", [("relu", 0.01), ("silu", 0.01)], ids=_act_id)
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
def test_peak_memory_not_above_torch_composition(
    act: tuple[Optional[str], float], residual: bool, layout: str
) -> None:
    shape, ref_cls, fmt = ((16, 32, 16, 16), nn.BatchNorm2d, LAYOUTS[layout][2])
    ours = syncbn.SyncBatchNorm(32, activation=act[0])
    ref = ref_cls(32)
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    r = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_() if residual else None
    # the output gradient in the output's layout, as the next layer gives it
    # (a gradient in another layout costs the kernels one copy)
    g = torch.randn(shape).contiguous(memory_format=fmt)

    def fused() -> None:
        y = ours(x) if r is None else ours(x, r)
        y.backward(g)

    def composed() -> None:
        z = ref(x) if r is None else ref(x) + r
        apply_activation(z, act[0], act[1]).backward(g)

    ours_peak, torch_peak = _peak_bytes(fused), _peak_bytes(composed)
    assert 0 < ours_peak <= torch_peak, f"fused {ours_peak} bytes, torch's composition {torch_peak}"
