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
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch.autograd.function import once_differentiable
from torch.autograd.graph import increment_version

from . import _kernels
from .comm import Communicator

__all__ = ["SyncBatchNormFunction", "sync_batch_norm"]

# dtypes the kernels take directly; float16 / bfloat16 go through float32
_KERNEL_DTYPES = (torch.float32, torch.float64)


class _Layout(NamedTuple):
    """How a tensor ``(N, C, *spatial)`` is laid out for the kernels."""

    rows: bool              # True: (M, C) rows (2-D, channels-last); False: (N, C, L)
    shape: tuple[int, ...]  # the tensor's shape

    @property
    def perm(self) -> tuple[int, ...]:
        """Axis order that makes a rows-layout tensor C-contiguous (channels last)."""
        return (0, *range(2, len(self.shape)), 1)

    def view(self, a: np.ndarray) -> Optional[np.ndarray]:
        """Zero-copy kernel view of ``a`` (numpy, logical shape), or None if none exists."""
        C = self.shape[1]
        if self.rows:
            a = a.transpose(self.perm)
            return a.reshape(-1, C) if a.flags.c_contiguous else None
        if not a.flags.c_contiguous:
            return None
        return a.reshape(self.shape[0], C, math.prod(self.shape[2:]))

    def empty(self, dtype: torch.dtype) -> tuple[np.ndarray, torch.Tensor]:
        """A new tensor of logical shape in this layout, and its kernel view."""
        C = self.shape[1]
        if self.rows:
            perm = self.perm
            t = torch.empty([self.shape[p] for p in perm], dtype=dtype)
            inverse = [perm.index(i) for i in range(len(perm))]
            return t.numpy().reshape(-1, C), t.permute(inverse)
        t = torch.empty(self.shape, dtype=dtype)
        return t.numpy().reshape(self.shape[0], C, math.prod(self.shape[2:])), t


def _kernel_input(x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, _Layout]:
    """``x`` as the kernels read it: (tensor kept alive, numpy view, layout).

    Contiguous and channels-last inputs are viewed in place; only other
    strides (or float16/bfloat16, widened to float32) cost a copy.
    """
    if x.dtype not in _KERNEL_DTYPES:
        x = x.float()  # keeps the memory format
    a = x.detach().numpy()
    shape = tuple(x.shape)
    spatial = math.prod(shape[2:])
    # (N, C, 1, 1) is contiguous both ways: rows keep the channel loop innermost
    for layout in (_Layout(rows=x.dim() == 2 or spatial == 1, shape=shape),
                   _Layout(rows=True, shape=shape)):
        v = layout.view(a)
        if v is not None:
            return x, v, layout
    x = x.contiguous()
    layout = _Layout(rows=False, shape=shape)
    return x, layout.view(x.detach().numpy()), layout


def _like_input(t: torch.Tensor, layout: _Layout, dtype: torch.dtype) -> np.ndarray:
    """``t`` (e.g. the output gradient) as a kernel view in ``layout``, copied if needed."""
    if t.dtype != dtype:
        t = t.to(dtype)
    a = t.detach().numpy()
    v = layout.view(a)
    if v is None:  # e.g. an expanded gradient: one contiguous copy in the right order
        v, _ = layout.empty(t.dtype)
        if layout.rows:
            v.reshape([layout.shape[p] for p in layout.perm])[...] = a.transpose(layout.perm)
        else:
            v.reshape(layout.shape)[...] = a
    return v


# torch dtypes that numpy can view directly (bfloat16 cannot)
_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
_NUMPY_VIEWABLE = tuple(_NUMPY_DTYPE)


def _vec(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """A per-channel parameter as float64 numpy (numpy casts cost far less than torch ops)."""
    if t is None:
        return None
    if t.dtype in _NUMPY_VIEWABLE:
        return t.detach().numpy().astype(np.float64)
    return t.detach().to(torch.float64).numpy()


def _from_vec(v: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A float64 numpy vector as a new tensor of ``dtype``."""
    if dtype in _NUMPY_VIEWABLE:
        return torch.from_numpy(v.astype(_NUMPY_DTYPE[dtype]))
    return torch.from_numpy(v).to(dtype)



def _lerp_(buf: torch.Tensor, target: np.ndarray, factor: float) -> None:
    """``buf = (1 - factor) * buf + factor * target`` in place (a running-statistics buffer).

    torch's own formula: unlike ``lerp`` it keeps a +-Inf buffer +-Inf. Done
    in numpy on the buffer's memory (a few microseconds less per call than
    torch ops), then autograd's version counter is bumped as a torch op would.
    """
    if buf.dtype in _NUMPY_VIEWABLE:
        b = buf.numpy()
        b *= 1.0 - factor
        b += factor * target
        increment_version(buf)
    else:
        buf.mul_(1.0 - factor).add_(_from_vec(target, buf.dtype), alpha=factor)


class _Stats(NamedTuple):
    count: float
    mean: np.ndarray
    invstd: np.ndarray


def _global_stats(
    xv: np.ndarray,
    shift: np.ndarray,
    eps: float,
    comm: Communicator,
) -> tuple[_Stats, np.ndarray]:
    """Global count, mean and invstd, and the biased variance.

    One allreduce; a second one only when the shift was so far from this
    batch's mean that the variance would lose its accuracy (see _REFINE).
    """
    C = xv.shape[1]
    b = np.empty(2 * C + 1)
    buf = torch.from_numpy(b)
    _kernels.local_stats(xv, shift, b, torch.get_num_threads())
    # Every rank joins, even with no samples: the others are waiting in this
    # same collective, and an empty shard contributes exact zeros.
    comm.allreduce_(buf)
    n = float(b[2 * C])
    if n == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got a global "
            f"batch of 1 value per channel (local input of {xv.size} values)")
    if n == 0:
        return _Stats(0.0, np.zeros(C), np.zeros(C)), np.zeros(C)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf input: NaN/Inf stats
        return _finish_stats(xv, shift, eps, comm, b, buf, n)


def _finish_stats(
    xv: np.ndarray,
    shift: np.ndarray,
    eps: float,
    comm: Communicator,
    b: np.ndarray,
    buf: torch.Tensor,
    n: float,
) -> tuple[_Stats, np.ndarray]:
    C = xv.shape[1]
    s = shift
    d = b[:C] / n                               # mean - shift
    var = b[C:2 * C] / n - d * d
    # The variance keeps about 16 - log10((mean - shift)^2 / var) digits.
    # When the shift is too far from this batch's mean (a first call with a
    # huge |mean| / std, or the batch after a huge outlier), sum again around
    # the mean just found. The decision uses reduced values only, so every
    # rank takes it alike.
    far = np.isfinite(d) & (d * d > _REFINE * np.maximum(var, 0.0))
    if far.any():
        s = np.where(np.isfinite(d), s + d, s)
        _kernels.local_stats(xv, s, b, torch.get_num_threads())
        comm.allreduce_(buf)
        d = b[:C] / n
        var = b[C:2 * C] / n - d * d
    var = np.maximum(var, 0.0)
    mean = s + d
    invstd = 1.0 / np.sqrt(var + eps)
    return _Stats(n, mean, invstd), var


# (mean - shift)^2 / var above which the statistics are summed again around
# the mean. Below it the relative error of the variance is at most about
# 1e-16 * 1e13 = 1e-3: |mean| / std up to 1e6 from a zero shift (the first
# call) stays within 1e-4 in one allreduce.
_REFINE = 1e13


def _update_running(
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    momentum: Optional[float],
    stats: _Stats,
    var: np.ndarray,
) -> None:
    """Exponential (or, with momentum None, cumulative) running statistics, in place."""
    if running_mean is None or running_var is None:
        return
    if num_batches_tracked is not None:
        num_batches_tracked.numpy()[...] += 1
        increment_version(num_batches_tracked)
    if momentum is None:
        factor = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    else:
        factor = momentum
    n = stats.count
    # (buffers never require grad: no torch.no_grad() needed on this hot path)
    with np.errstate(over="ignore"):
        _lerp_(running_mean, stats.mean, factor)
        _lerp_(running_var, var * (n / (n - 1)), factor)


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
) -> tuple[torch.Tensor, torch.Tensor, _Layout, _Stats]:
    """Shared forward: returns output, the kernel-dtype input, its layout and the stats."""
    xk, xv, layout = _kernel_input(x)
    stats, var = _global_stats(xv, shift, eps, comm)
    if stats.count == 0:
        return torch.empty_like(x), xk, layout, stats
    _update_running(running_mean, running_var, num_batches_tracked, momentum, stats, var)
    # The next call's common shift is this call's global mean: identical on
    # every rank (it comes out of the allreduce) and close to the next batch's
    # mean, which keeps the shifted sums free of cancellation.
    # (A non-finite mean, from NaN/Inf input, must not poison later calls.)
    np.copyto(shift, stats.mean, where=np.isfinite(stats.mean))
    yv, y = layout.empty(xk.dtype)
    _kernels.normalize(xv, stats.mean, stats.invstd, _vec(weight), _vec(bias), yv,
                       torch.get_num_threads())
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y, xk, layout, stats


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
        y, xk, layout, stats = _forward(x, weight, bias, running_mean, running_var,
                                        num_batches_tracked, shift, eps, momentum, comm)
        # Saved: the tensor the kernels read (the input itself, unless it
        # needed a copy); a float16/bfloat16 input is saved as it came and
        # widened again in backward, so it costs no more memory than torch's.
        ctx.save_for_backward(xk if xk.dtype == x.dtype else x, weight)
        ctx.input_dtype, ctx.kernel_dtype = x.dtype, xk.dtype
        ctx.layout, ctx.stats, ctx.comm = layout, stats, comm
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable  # the backward is numpy + kernels: no graph to differentiate again
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        layout: _Layout = ctx.layout
        stats: _Stats = ctx.stats
        comm: Communicator = ctx.comm
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        C = x.shape[1]
        if stats.count == 0:
            # every rank saw a global count of 0 and skips the collective alike
            return (torch.zeros_like(grad_out, dtype=ctx.input_dtype) if need_x else None,
                    torch.zeros(C, dtype=weight.dtype) if need_w else None,
                    torch.zeros(C, dtype=ctx.bias_dtype) if need_b else None,
                    *([None] * 7))
        xv = _like_input(x, layout, ctx.kernel_dtype)
        dyv = _like_input(grad_out, layout, ctx.kernel_dtype)
        b = np.empty(2 * C)
        buf = torch.from_numpy(b)
        nt = torch.get_num_threads()
        _kernels.backward_reduce(dyv, xv, stats.mean, b, nt)
        # parameter gradients are local sums, taken before the buffer is reduced
        grad_w = _from_vec(b[C:] * stats.invstd, weight.dtype) if need_w else None
        grad_b = _from_vec(b[:C], ctx.bias_dtype) if need_b else None
        grad_x = None
        if need_x:
            comm.allreduce_(buf)
            dxv, grad_x = layout.empty(ctx.kernel_dtype)
            _kernels.backward_input(dyv, xv, stats.mean, stats.invstd, _vec(weight),
                                    b[:C] / stats.count, b[C:] / stats.count, dxv, nt)
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
