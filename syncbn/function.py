"""Autograd function of synchronized batch normalization.

Forward: local sums (kernel) -> one allreduce of ``[sum(C), sumsq(C), count]``
-> global mean and biased variance -> normalize (kernel).
Backward: local ``[sum dy, sum dy*(x-mean)]`` (kernel) -> one allreduce ->
input gradient (kernel). Weight and bias gradients stay local: like any
parameter gradient, the data-parallel wrapper averages them.

Every rank must issue the same collectives in the same order, so nothing in
this file may raise on one rank only between entering the first collective
and leaving the last: errors that depend on local data are raised by the
module before the forward allreduce; errors that depend on global values
(the global count) are raised after it, on every rank alike.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from torch.autograd.function import once_differentiable
from torch.autograd.graph import increment_version

from . import _kernels
from .comm import Communicator

__all__ = ["SyncBatchNormFunction", "sync_batch_norm"]

# dtypes the kernels take directly; float16 / bfloat16 go through float32
_KERNEL_DTYPES = (torch.float32, torch.float64)


class _Layout:
    """How a tensor ``(N, C, *spatial)`` is laid out for the kernels.

    ``rows``: (M, C) rows (2-D, channels-last), else (N, C, L) runs;
    ``kshape``: the kernels' view of it. Made once per shape (see _layout):
    this is on the per-call path, where every Python operation counts.
    """

    __slots__ = ("rows", "shape", "kshape", "perm", "inverse", "pshape")

    def __init__(self, rows: bool, shape: tuple[int, ...]) -> None:
        self.rows, self.shape = rows, tuple(shape)
        C = shape[1]
        if rows:
            # axis order that makes a rows-layout tensor C-contiguous (channels last)
            self.perm = (0, *range(2, len(shape)), 1)
            self.inverse = tuple(self.perm.index(i) for i in range(len(shape)))
            self.pshape = tuple(shape[p] for p in self.perm)
            self.kshape: tuple[int, ...] = (math.prod(shape) // C if C else 0, C)
        else:
            self.kshape = (shape[0], C, math.prod(shape[2:]))

    def view(self, a: np.ndarray) -> Optional[np.ndarray]:
        """Zero-copy kernel view of ``a`` (numpy, logical shape), or None if none exists."""
        if self.rows:
            a = a.transpose(self.perm)
        return a.reshape(self.kshape) if a.flags.c_contiguous else None

    def new_like(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, torch.Tensor]:
        """A new tensor with the strides of ``t`` (which this layout views), and its kernel view.

        ``torch.empty_like`` keeps the strides of a dense tensor and is the
        cheapest way to a new tensor (no shape to parse).
        """
        out = torch.empty_like(t, dtype=dtype)
        v = self.view(out.numpy())
        # (None never for the tensors the layer passes)
        return (v, out) if v is not None else self.empty(dtype)

    def empty(self, dtype: torch.dtype) -> tuple[np.ndarray, torch.Tensor]:
        """A new tensor of logical shape in this layout, and its kernel view."""
        if self.rows:
            t = torch.empty(self.pshape, dtype=dtype)
            return t.numpy().reshape(self.kshape), t.permute(self.inverse)
        t = torch.empty(self.shape, dtype=dtype)
        return t.numpy().reshape(self.kshape), t


_LAYOUTS: dict[tuple[bool, tuple[int, ...]], _Layout] = {}


def _layout(rows: bool, shape: tuple[int, ...]) -> _Layout:
    key = (rows, shape)
    layout = _LAYOUTS.get(key)
    if layout is None:
        if len(_LAYOUTS) > 4096:  # a model fed ever new shapes: start over
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _Layout(rows, shape)
    return layout


# (shape, strides in bytes, item size) of a NumPy view -> the layout the
# kernels read it in (None: no zero-copy view, the input is copied to
# contiguous). The item size matters: float64 (2, 4) contiguous and a float32
# (2, 4) view of every other column have the same strides in bytes.
_VIEWS: dict[tuple[tuple[int, ...], tuple[int, ...], int], Optional[_Layout]] = {}


def _view_layout(a: np.ndarray) -> Optional[_Layout]:
    shape = a.shape
    # (N, C, 1, 1) is contiguous both ways: rows keep the channel loop innermost
    rows = len(shape) == 2 or math.prod(shape[2:]) == 1
    for layout in (_layout(rows, shape), _layout(True, shape)):
        if layout.view(a) is not None:
            return layout
    return None


def _kernel_input(x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, _Layout]:
    """``x`` as the kernels read it: (tensor kept alive, numpy view, layout).

    Contiguous and channels-last inputs are viewed in place; only other
    strides (or float16/bfloat16, widened to float32) cost a copy.
    """
    if x.dtype not in _KERNEL_DTYPES:
        x = x.float()  # keeps the memory format
    a = x.numpy(force=True)  # (a view: x is a CPU tensor)
    key = (a.shape, a.strides, a.itemsize)
    try:
        layout = _VIEWS[key]
    except KeyError:
        if len(_VIEWS) > 4096:  # a model fed ever new shapes: start over
            _VIEWS.clear()
        layout = _VIEWS[key] = _view_layout(a)
    if layout is not None:
        return x, layout.view(a), layout  # (a view: the layout was found for these strides)
    x = x.contiguous()
    layout = _layout(False, tuple(x.shape))
    return x, x.numpy(force=True).reshape(layout.kshape), layout


def _like_input(t: torch.Tensor, layout: _Layout, dtype: torch.dtype) -> np.ndarray:
    """``t`` (e.g. the output gradient) as a kernel view in ``layout``, copied if needed."""
    if t.dtype != dtype:
        t = t.to(dtype)
    a = t.numpy(force=True)
    v = layout.view(a)
    if v is None:  # e.g. an expanded gradient: one contiguous copy in the right order
        v, _ = layout.empty(t.dtype)
        if layout.rows:
            v.reshape(layout.pshape)[...] = a.transpose(layout.perm)
        else:
            v.reshape(layout.shape)[...] = a
    return v


def _param(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """A per-channel parameter as the kernels take it: a numpy view of a
    float32/float64 tensor (no copy), float64 for other dtypes."""
    if t is None:
        return None
    if t.dtype in _KERNEL_DTYPES:
        return t.numpy(force=True)
    return t.detach().to(torch.float64).numpy()


def _grad_vec(dtype: torch.dtype, C: int) -> tuple[np.ndarray, torch.Tensor]:
    """A new (C,) parameter gradient: the array a kernel writes, and the tensor
    over it (float64 for dtypes the kernels do not take: convert after)."""
    a = np.empty(C, np.float32 if dtype == torch.float32 else np.float64)
    return a, torch.from_numpy(a)


def _running_update(
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
) -> tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """The running statistics and the batch counter as finish_stats updates
    them (NumPy views; float64 copies of float16/bfloat16 buffers, written back
    by :func:`_running_done`), or Nones: no update."""
    if running_mean is None or running_var is None:
        return None, None, None
    return (_param(running_mean), _param(running_var),
            None if num_batches_tracked is None else num_batches_tracked.numpy())


def _running_done(running_mean: torch.Tensor, running_var: torch.Tensor,
                  num_batches_tracked: Optional[torch.Tensor],
                  rm: np.ndarray, rv: np.ndarray) -> None:
    """After finish_stats wrote the running statistics through numpy: what a
    torch in-place op would do (bump the version counters), and the copy back
    of float16/bfloat16 buffers."""
    if running_mean.dtype not in _KERNEL_DTYPES:
        running_mean.copy_(torch.from_numpy(rm))
    if running_var.dtype not in _KERNEL_DTYPES:
        running_var.copy_(torch.from_numpy(rv))
    increment_version((running_mean, running_var) if num_batches_tracked is None
                      else (running_mean, running_var, num_batches_tracked))


def _batch_stats(
    xv: np.ndarray,
    shift: np.ndarray,
    eps: float,
    comm: Communicator,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    momentum: Optional[float],
    nt: int,
) -> tuple[float, Optional[np.ndarray]]:
    """Global count and (3, C) mean, invstd, variance (None for a count of 0).

    One allreduce; a second one only when the shift was so far from this
    batch's mean that the variance would lose its accuracy (finish_stats
    decides from reduced values, so on every rank alike). Moves ``shift`` to
    the global mean and updates the running statistics.
    """
    C = shift.shape[0]
    b = np.empty(2 * C + 1)
    _kernels.local_stats(xv, shift, b, nt)
    # Every rank joins, even with no samples: the others are waiting in this
    # same collective, and an empty shard contributes exact zeros.
    comm.allreduce_array_(b)
    n = float(b[2 * C])
    if n == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got a global "
            f"batch of 1 value per channel (local input of {xv.size} values)")
    if n == 0:
        return 0.0, None
    stats = np.empty((3, C))
    rm, rv, batches = _running_update(running_mean, running_var, num_batches_tracked)
    # The next call's common shift is this call's global mean: identical on
    # every rank (it comes out of the allreduce) and close to the next
    # batch's mean, which keeps the shifted sums free of cancellation.
    # (momentum None: finish_stats makes the cumulative average.)
    if _kernels.finish_stats(b, shift, eps, stats, True, shift, rm, rv, momentum, batches):
        around = stats[0].copy()
        _kernels.local_stats(xv, around, b, nt)
        comm.allreduce_array_(b)
        _kernels.finish_stats(b, around, eps, stats, False, shift, rm, rv, momentum, batches)
    if rm is not None:
        _running_done(running_mean, running_var, num_batches_tracked, rm, rv)
    return n, stats


def _forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    shift: np.ndarray,
    eps: float,
    momentum: Optional[float],
    comm: Communicator,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, _Layout, float, Optional[np.ndarray],
           Optional[np.ndarray]]:
    """Shared forward: output, the kernel-dtype input and its kernel view, the
    layout, the global count, the statistics and the weight as the kernels took it."""
    xk, xv, layout = _kernel_input(x)
    nt = torch.get_num_threads()
    n, stats = _batch_stats(xv, shift, eps, comm, running_mean, running_var,
                            num_batches_tracked, momentum, nt)
    wv = _param(weight)
    if stats is None:
        return torch.empty_like(x), xk, xv, layout, n, stats, wv
    yv, y = layout.new_like(xk, xk.dtype)
    _kernels.normalize(xv, stats[0], stats[1], wv, _param(bias), yv, nt)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y, xk, xv, layout, n, stats, wv


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with statistics summed over ``comm``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        rest: tuple[Any, ...],
    ) -> torch.Tensor:
        # ``rest``: the arguments of _forward after bias (running statistics,
        # shift, eps, momentum, comm), none differentiable. One argument
        # instead of seven: Function.apply costs per argument.
        y, xk, xv, layout, n, stats, wv = _forward(x, weight, bias, *rest)
        # Saved: the tensor the kernels read (the input itself, unless it
        # needed a copy); a float16/bfloat16 input is saved as it came and
        # widened again in backward, so it costs no more memory than torch's.
        # The saved tensors are autograd's check that neither x nor the weight
        # changed in place before the backward, which reuses their views.
        same = xk.dtype == x.dtype
        ctx.save_for_backward(xk if same else x, weight)
        ctx.state = (xv if same else None, wv, layout, n, stats, rest[-1],  # (comm)
                     x.dtype, xk.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @once_differentiable  # the backward is numpy + kernels: no graph to differentiate again
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors  # (also autograd's check that x was not modified)
        xv, wv, layout, count, stats, comm, input_dtype, kernel_dtype, bias_dtype = ctx.state
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        C = x.shape[1]
        if stats is None:
            # every rank saw a global count of 0 and skips the collective alike
            return (torch.zeros_like(grad_out, dtype=input_dtype) if need_x else None,
                    torch.zeros(C, dtype=weight.dtype) if need_w else None,
                    torch.zeros(C, dtype=bias_dtype) if need_b else None, None)
        in_place = xv is not None   # the kernels read x itself, in this layout
        if not in_place:
            xv = _like_input(x, layout, kernel_dtype)
        dyv = _like_input(grad_out, layout, kernel_dtype)
        b = np.empty(2 * C)
        nt = torch.get_num_threads()
        # parameter gradients are local sums, written before the buffer is reduced
        gw, grad_w = _grad_vec(weight.dtype, C) if need_w else (None, None)
        gb, grad_b = _grad_vec(bias_dtype, C) if need_b else (None, None)
        _kernels.backward_reduce(dyv, xv, stats[0], b, nt, stats[1], gw, gb)
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and grad_b.dtype != bias_dtype:
            grad_b = grad_b.to(bias_dtype)
        grad_x = None
        if need_x:
            comm.allreduce_array_(b)   # (backward_input divides by the count)
            dxv, grad_x = (layout.new_like(x, kernel_dtype) if in_place
                           else layout.empty(kernel_dtype))
            _kernels.backward_input(dyv, xv, stats[0], stats[1], wv, b[:C], b[C:], dxv, nt, count)
            if grad_x.dtype != input_dtype:
                grad_x = grad_x.to(input_dtype)
        return grad_x, grad_w, grad_b, None


def sync_batch_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    shift: np.ndarray,
    eps: float,
    momentum: Optional[float],
    comm: Communicator,
) -> torch.Tensor:
    """Batch norm with batch statistics summed over ``comm``; updates running stats.

    Args:
        x: input ``(N, C, *)``, already validated by the caller.
        weight, bias: affine parameters ``(C,)`` or None.
        running_mean, running_var: buffers updated in place, or None.
        num_batches_tracked: counter for ``momentum=None`` (cumulative average), or None.
        shift: float64 ``(C,)`` common shift of the sums, the same on every rank;
            overwritten with this call's global mean.
        eps: added to the variance.
        momentum: running-statistics factor; None for the cumulative average.
        comm: the communicator the statistics are summed over.

    Without autograd (``torch.no_grad()`` or nothing requiring grad) the
    forward issues its one allreduce and saves nothing.
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad))
    if needs_grad:
        return SyncBatchNormFunction.apply(x, weight, bias, (
            running_mean, running_var, num_batches_tracked, shift, eps, momentum, comm))
    return _forward(x, weight, bias, running_mean, running_var, num_batches_tracked,
                    shift, eps, momentum, comm)[0]
