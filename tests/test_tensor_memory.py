"""The kernels' arrays over tensor memory (``syncbn._memory.array_over``) and
the tensors whose memory is not what their values say.

The layer views a tensor's memory from its address once its shape, strides
and dtype match a layout it has checked. These tests cover what the address
alone does not show: a negated view (the negative bit), a storage offset, a
misaligned address, strides that change from call to call, and the lifetime
of the memory. Each layer test is checked against torch's batch norm, and a
negative control shows that the raw memory of its tensor differs from its
values, so that a layer reading it naively would fail.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import torch.nn as nn

from batchnorm_data import TOL, batch, misaligned, negated_view, set_random_affine
import syncbn
from syncbn._memory import array_over

C = 3
F32, F64 = np.dtype(np.float32).num, np.dtype(np.float64).num


# --- array_over --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24,), (4, 6), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_array_over_views_the_memory(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    t = torch.arange(24, dtype=dtype)
    a = array_over(t, t.data_ptr(), shape, F32 if dtype == torch.float32 else F64)
    assert a is not None
    assert a.shape == shape and a.flags.c_contiguous and a.flags.writeable
    np.testing.assert_array_equal(a.reshape(-1), t.numpy())
    a[(0,) * len(shape)] = -5  # writes through
    assert t[0] == -5


def test_array_over_keeps_its_owner_alive() -> None:
    def make() -> np.ndarray:
        t = torch.arange(6, dtype=torch.float64) + 10
        a = array_over(t, t.data_ptr(), (2, 3), F64)
        assert a is not None and a.base is t
        return a

    a = make()
    gc.collect()
    torch.ones(1000, dtype=torch.float64)  # (would take freed memory)
    np.testing.assert_array_equal(a.reshape(-1), np.arange(6) + 10)


def test_array_over_without_values() -> None:
    a = array_over(None, 0, (0, 3), F32)
    assert a is not None and a.shape == (0, 3) and a.dtype == np.float32


def test_array_over_misaligned_address_gives_none() -> None:
    t = torch.zeros(8, dtype=torch.float64)
    assert array_over(t, t.data_ptr() + 4, (2,), F64) is None
    assert array_over(t, t.data_ptr() + 2, (2,), F32) is None


@pytest.mark.parametrize("shape, typenum, error, match", [
    ((), F32, ValueError, r"expected 1 to 3 sizes \(got shape \(\)\)"),
    ((1, 2, 3, 4), F32, ValueError, r"expected 1 to 3 sizes"),
    ((2, -1), F32, ValueError, r"expected sizes of at least 0 \(got shape \(2, -1\)\)"),
    ((2,), np.dtype(np.int32).num, TypeError, r"expected the type number of float32 or float64"),
])
def test_array_over_bad_arguments(shape: tuple[int, ...], typenum: int, error: type, match: str) -> None:
    t = torch.zeros(8)
    with pytest.raises(error, match=match):
        array_over(t, t.data_ptr(), shape, typenum)


def test_array_over_null_address_with_values() -> None:
    with pytest.raises(ValueError, match=r"expected the address of 6 values \(got a null address\)"):
        array_over(None, 0, (2, 3), F32)


# --- the layer on tensors whose memory differs from their values ---------------


def _pair(dtype: torch.dtype = torch.float64, **kwargs) -> tuple[syncbn.SyncBatchNorm, nn.BatchNorm2d]:
    ours = syncbn.SyncBatchNorm(C, dtype=dtype, process_group="local", **kwargs)
    ref = nn.BatchNorm2d(C, dtype=dtype)
    set_random_affine(ours, 7)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _check(x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
    """A training step of both layers on ``x`` with output gradient ``grad``."""
    ours, ref = _pair(dtype)
    xo = x.detach().requires_grad_()  # (the same memory, strides and bits: x itself as a leaf)
    xb = x.detach().clone().requires_grad_()
    ya, yb = ours(xo), ref(xb)
    torch.testing.assert_close(ya, yb, **TOL[dtype])
    ya.backward(grad)
    yb.backward(grad.detach().clone())
    torch.testing.assert_close(xo.grad, xb.grad, **TOL[dtype])
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL[dtype])
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL[dtype])


def _raw(t: torch.Tensor) -> torch.Tensor:
    """What the memory at ``t``'s address holds, read as a contiguous tensor of its shape."""
    a = array_over(t, t.data_ptr(), (t.numel(),), F64 if t.dtype == torch.float64 else F32)
    assert a is not None
    return torch.from_numpy(a.copy()).view(t.shape)


def test_negated_view_input() -> None:
    x, g = batch((4, C, 5, 6), torch.Generator().manual_seed(0), torch.float64)
    negated = negated_view(x)
    assert torch.equal(_raw(negated), -x)  # a naive read of the memory would normalize -x
    _check(negated, g)


def test_imaginary_part_of_a_conjugate_input() -> None:
    # the public way to a negated view (strided: every other value of the complex memory)
    x, g = batch((4, C, 5, 6), torch.Generator().manual_seed(0), torch.float64)
    negated = torch.complex(torch.zeros_like(x), -x).conj().imag
    assert negated.is_neg() and torch.equal(negated, x)
    _check(negated, g)


def test_negated_view_output_gradient() -> None:
    x, g = batch((4, C, 5, 6), torch.Generator().manual_seed(1), torch.float64)
    negated = negated_view(g)
    assert torch.equal(_raw(negated), -g)
    _check(x, negated)


def _fused_pair() -> tuple[syncbn.SyncBatchNorm, nn.BatchNorm2d]:
    ours = syncbn.SyncBatchNorm(C, dtype=torch.float64, process_group="local", activation="relu")
    ref = nn.BatchNorm2d(C, dtype=torch.float64)
    set_random_affine(ours, 7)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_input_with_a_storage_offset() -> None:
    x, g = batch((5, C, 4, 4), torch.Generator().manual_seed(3), torch.float64)
    tail = x[1:]  # contiguous, starting one sample into the storage
    assert tail.storage_offset() > 0 and tail.is_contiguous()
    # the storage's start holds the sample left out, not the tensor's first values
    assert not torch.equal(x[0], tail[0])
    _check(tail, g[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_misaligned_input(dtype: torch.dtype) -> None:
    x, g = batch((4, C, 5, 6), torch.Generator().manual_seed(4), dtype)
    _check(misaligned(x), g.to(dtype), dtype)


def test_misaligned_output_gradient() -> None:
    x, g = batch((4, C, 5, 6), torch.Generator().manual_seed(5), torch.float64)
    _check(x, misaligned(g))


@pytest.mark.parametrize("odd", [negated_view, misaligned], ids=["negated", "misaligned"])
def test_odd_residual(odd) -> None:
    # a fused layer's residual: read through the same views as the input
    x, g = batch((4, C, 5, 6), torch.Generator().manual_seed(6), torch.float64)
    r = torch.randn(x.shape, dtype=torch.float64)
    ours, ref = _fused_pair()
    ra, rb = odd(r).detach().requires_grad_(), r.clone().requires_grad_()
    ya, yb = ours(x, ra), torch.relu(ref(x) + rb)
    torch.testing.assert_close(ya, yb, **TOL[torch.float64])
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ra.grad, rb.grad, **TOL[torch.float64])


def test_strides_that_change_from_call_to_call() -> None:
    # the same shape in three memory orders through one layer: each call must
    # read its own strides, not those of the layout the shape had before (the
    # last is read through a copy; the first two in place, and the output
    # keeps their memory format)
    gen = torch.Generator().manual_seed(8)
    ours, ref = _pair()
    for step in range(2):
        for in_place, make in (
            (True, lambda t: t),
            (True, lambda t: t.contiguous(memory_format=torch.channels_last)),
            (False, lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)),
        ):
            x, g = batch((4, C, 5, 5), gen, torch.float64)
            x = make(x)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ours(xa), ref(xb)
            torch.testing.assert_close(ya, yb, **TOL[torch.float64])
            assert ya.stride() == x.stride() or not in_place
            ya.backward(make(g))
            yb.backward(make(g))
            torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_gradient_keeps_the_memory_format(dtype: torch.dtype) -> None:
    x, g = batch((4, C, 5, 6), torch.Generator().manual_seed(9), dtype, torch.channels_last)
    ours = syncbn.SyncBatchNorm(C, process_group="local")
    xa = x.clone().requires_grad_()
    y = ours(xa)
    y.backward(g.contiguous(memory_format=torch.channels_last))
    assert y.dtype == dtype and xa.grad.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert xa.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.usefixtures("python_path")
def test_layout_caches_that_start_over_between_forward_and_backward(monkeypatch) -> None:
    # a model fed ever new shapes makes the caches start over, possibly
    # between a forward and its backward: the backward must still read its
    # output gradient in the forward's layout
    from syncbn import _views

    ours, ref = _pair()
    gen = torch.Generator().manual_seed(10)
    for step, shape in enumerate([(4, C, 5, 6), (2, C, 3, 3), (4, C, 5, 6)]):
        x, g = batch(shape, gen, torch.float64, torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        layout = ya.grad_fn.saved.layout
        monkeypatch.setattr(_views, "_CACHE_LIMIT", 0)
        new_shape = torch.randn(3, C, 7, 61 + step, dtype=torch.float64)
        assert (new_shape.shape, new_shape.stride(), new_shape.dtype) not in _views._LAYOUTS
        ours(new_shape)  # a shape not seen before: the caches start over
        monkeypatch.setattr(_views, "_CACHE_LIMIT", 4096)
        assert layout not in _views._KERNEL_LAYOUTS.values()
        ya.backward(g.contiguous(memory_format=torch.channels_last))
        yb.backward(g)
        torch.testing.assert_close(ya, yb, **TOL[torch.float64])
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
