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


def _kernel_input(x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, _Layout]:
    """``x`` as the kernels read it: (tensor kept alive, numpy view, layout).

    Contiguous and channels-last inputs are viewed in place; only other
    strides (or float16/bfloat16, widened to float32) cost a copy.
    """
    if x.dtype not in _KERNEL_DTYPES:
        x = x.float()  # keeps the memory format
    shape = x.shape
    a = x.numpy(force=True)  # (a view: x is a CPU tensor)
    # (N, C, 1, 1) is contiguous both ways: rows keep the channel loop innermost
    rows = len(shape) == 2 or math.prod(shape[2:]) == 1
    for layout in (_layout(rows, shape), _layout(True, shape)):
        v = layout.view(a)
        if v is not None:
            return x, v, layout
    x = x.contiguous()
    layout = _layout(False, shape)
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


# torch dtypes that numpy can view directly (bfloat16 cannot)
_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
_NUMPY_VIEWABLE = tuple(_NUMPY_DTYPE)


def _param(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """A per-channel parameter as the kernels take it: a numpy view of a
    float32/float64 tensor (no copy), float64 for other dtypes."""
    if t is None:
        return None
    if t.dtype in _KERNEL_DTYPES:
        return t.numpy(force=True)
    return t.detach().to(torch.float64).numpy()


def _from_vec(v: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A float64 numpy vector as a new tensor of ``dtype``."""
    if dtype in _NUMPY_VIEWABLE:
        return torch.from_numpy(v.astype(_NUMPY_DTYPE[dtype]))
    return torch.from_numpy(v).to(dtype)


def _running_update(
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    momentum: Optional[float],
) -> tuple[Optional[np.ndarray], Optional[np.ndarray], float]:
    """What finish_stats needs to update the running statistics: the buffers
    as numpy (None: no update) and this batch's factor.

    With momentum None the factor makes a cumulative average
    (1 / batches seen). float16/bfloat16 buffers get float64 copies, written
    back by :func:`_running_done`.
    """
    if running_mean is None or running_var is None:
        return None, None, 0.0
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        factor = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    else:
        factor = momentum
    return _param(running_mean), _param(running_var), factor


def _running_done(running_mean: torch.Tensor, running_var: torch.Tensor,
                  rm: np.ndarray, rv: np.ndarray) -> None:
    """After finish_stats wrote the running statistics through numpy."""
    for t, a in ((running_mean, rm), (running_var, rv)):
        if t.dtype in _KERNEL_DTYPES:
            increment_version(t)  # what a torch in-place op would do
        else:
            t.copy_(torch.from_numpy(a))


def _batch_stats(
    xv: np.ndarray,
    shift: np.ndarray,
    eps: float,
    comm: Communicator,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    momentum: Optional[float],
) -> tuple[float, Optional[np.ndarray]]:
    """Global count and (3, C) mean, invstd, variance (None for a count of 0).

    One allreduce; a second one only when the shift was so far from this
    batch's mean that the variance would lose its accuracy (finish_stats
    decides from reduced values, so on every rank alike). Moves ``shift`` to
    the global mean and updates the running statistics.
    """
    C = xv.shape[1]
    nt = torch.get_num_threads()
    b = np.empty(2 * C + 1)
    buf = torch.from_numpy(b)
    _kernels.local_stats(xv, shift, b, nt)
    # Every rank joins, even with no samples: the others are waiting in this
    # same collective, and an empty shard contributes exact zeros.
    comm.allreduce_(buf)
    n = float(b[2 * C])
    if n == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got a global "
            f"batch of 1 value per channel (local input of {xv.size} values)")
    if n == 0:
        return 0.0, None
    stats = np.empty((3, C))
    rm, rv, factor = _running_update(running_mean, running_var, num_batches_tracked, momentum)
    # The next call's common shift is this call's global mean: identical on
    # every rank (it comes out of the allreduce) and close to the next
    # batch's mean, which keeps the shifted sums free of cancellation.
    if _kernels.finish_stats(b, shift, eps, stats, True, shift, rm, rv, factor):
        around = stats[0].copy()
        _kernels.local_stats(xv, around, b, nt)
        comm.allreduce_(buf)
        _kernels.finish_stats(b, around, eps, stats, False, shift, rm, rv, factor)
    if rm is not None:
        _running_done(running_mean, running_var, rm, rv)
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
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, _Layout, float, Optional[np.ndarray]]:
    """Shared forward: output, the kernel-dtype input and its kernel view, the
    layout, the global count and the statistics."""
    xk, xv, layout = _kernel_input(x)
    n, stats = _batch_stats(xv, shift, eps, comm, running_mean, running_var,
                            num_batches_tracked, momentum)
    if stats is None:
        return torch.empty_like(x), xk, xv, layout, n, stats
    yv, y = layout.empty(xk.dtype)
    _kernels.normalize(xv, stats[0], stats[1], _param(weight), _param(bias), yv,
                       torch.get_num_threads())
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y, xk, xv, layout, n, stats


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with statistics summed over ``comm``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
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
        y, xk, xv, layout, n, stats = _forward(x, weight, bias, running_mean, running_var,
                                               num_batches_tracked, shift, eps, momentum, comm)
        # Saved: the tensor the kernels read (the input itself, unless it
        # needed a copy); a float16/bfloat16 input is saved as it came and
        # widened again in backward, so it costs no more memory than torch's.
        same = xk.dtype == x.dtype
        ctx.save_for_backward(xk if same else x, weight)
        ctx.xv = xv if same else None   # its kernel view, which backward reuses
        ctx.input_dtype, ctx.kernel_dtype = x.dtype, xk.dtype
        ctx.layout, ctx.count, ctx.stats, ctx.comm = layout, n, stats, comm
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable  # the backward is numpy + kernels: no graph to differentiate again
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors  # (also autograd's check that x was not modified)
        layout: _Layout = ctx.layout
        stats: Optional[np.ndarray] = ctx.stats
        comm: Communicator = ctx.comm
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        C = x.shape[1]
        if stats is None:
            # every rank saw a global count of 0 and skips the collective alike
            return (torch.zeros_like(grad_out, dtype=ctx.input_dtype) if need_x else None,
                    torch.zeros(C, dtype=weight.dtype) if need_w else None,
                    torch.zeros(C, dtype=ctx.bias_dtype) if need_b else None,
                    *([None] * 7))
        xv = ctx.xv if ctx.xv is not None else _like_input(x, layout, ctx.kernel_dtype)
        dyv = _like_input(grad_out, layout, ctx.kernel_dtype)
        b = np.empty(2 * C)
        buf = torch.from_numpy(b)
        nt = torch.get_num_threads()
        _kernels.backward_reduce(dyv, xv, stats[0], b, nt)
        # parameter gradients are local sums, taken before the buffer is reduced
        grad_w = _from_vec(b[C:] * stats[1], weight.dtype) if need_w else None
        grad_b = _from_vec(b[:C], ctx.bias_dtype) if need_b else None
        grad_x = None
        if need_x:
            comm.allreduce_(buf)
            b /= ctx.count   # the global means of dy and of dy * (x - mean)
            dxv, grad_x = layout.empty(ctx.kernel_dtype)
            _kernels.backward_input(dyv, xv, stats[0], stats[1], _param(weight),
                                    b[:C], b[C:], dxv, nt)
            if grad_x.dtype != ctx.input_dtype:
                grad_x = grad_x.to(ctx.input_dtype)
        return (grad_x, grad_w, grad_b, *([None] * 7))


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
        return SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var,
                                           num_batches_tracked, shift, eps, momentum, comm)
    return _forward(x, weight, bias, running_mean, running_var, num_batches_tracked,
                    shift, eps, momentum, comm)[0]
