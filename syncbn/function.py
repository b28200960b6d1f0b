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

from . import _kernels
from .comm import Communicator

__all__ = ["SyncBatchNormFunction", "sync_batch_norm"]

# dtypes the kernels take directly; float16 / bfloat16 go through float32
_KERNEL_DTYPES = (torch.float32, torch.float64)


class _Layout(NamedTuple):
    rows: bool          # True: (M, C) rows (2-D, channels-last); False: (N, C, L)
    perm: tuple[int, ...]


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, _Layout]:
    """Pick the kernel layout that views ``x`` without a copy (copy only if none does)."""
    perm = (0, *range(2, x.dim()), 1)
    spatial = 1
    for s in x.shape[2:]:
        spatial *= s
    if x.is_contiguous() and (x.dim() == 2 or spatial > 1):
        return x, _Layout(rows=x.dim() == 2, perm=perm)
    if x.permute(perm).is_contiguous():  # channels-last (or spatial size 1)
        return x, _Layout(rows=True, perm=perm)
    return x.contiguous(), _Layout(rows=False, perm=perm)


def _view(t: torch.Tensor, layout: _Layout) -> np.ndarray:
    """Zero-copy numpy view of ``t`` as ``(M, C)`` rows or ``(N, C, L)``."""
    C = t.shape[1]
    if layout.rows:
        return t.detach().permute(layout.perm).numpy().reshape(-1, C)
    return t.detach().numpy().reshape(t.shape[0], C, math.prod(t.shape[2:]))


def _empty_like(t: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """An uninitialized tensor shaped like ``t`` whose memory is in ``layout``."""
    if layout.rows:
        inverse = [0] * len(layout.perm)
        for i, p in enumerate(layout.perm):
            inverse[p] = i
        shape = [t.shape[p] for p in layout.perm]
        return torch.empty(shape, dtype=t.dtype).permute(inverse)
    return torch.empty(t.shape, dtype=t.dtype)


def _to_kernel(t: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """``t`` in a dtype the kernels take, in ``layout``'s memory order."""
    if t.dtype not in _KERNEL_DTYPES:
        t = t.float()
    if layout.rows:
        if not t.permute(layout.perm).is_contiguous():
            out = _empty_like(t, layout)
            out.copy_(t)
            return out
        return t
    return t.contiguous()


def _vec(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().to(torch.float64).numpy()


class _Stats(NamedTuple):
    count: float
    mean: np.ndarray
    invstd: np.ndarray


def _global_stats(
    xk: torch.Tensor,
    layout: _Layout,
    shift: torch.Tensor,
    eps: float,
    comm: Communicator,
) -> tuple[_Stats, np.ndarray]:
    """Global count, mean and invstd after one allreduce; also the biased variance."""
    C = xk.shape[1]
    buf = torch.empty(2 * C + 1, dtype=torch.float64)
    b = buf.numpy()
    _kernels.local_stats(_view(xk, layout), shift.numpy(), b, torch.get_num_threads())
    # Every rank joins, even with no samples: the others are waiting in this
    # same collective, and an empty shard contributes exact zeros.
    comm.allreduce_(buf)
    n = float(b[2 * C])
    if n == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got a global "
            f"batch of 1 value per channel (local input size {list(xk.shape)})")
    if n == 0:
        return _Stats(0.0, np.zeros(C), np.zeros(C)), np.zeros(C)
    d = b[:C] / n                               # mean - shift
    var = np.maximum(b[C:2 * C] / n - d * d, 0.0)
    mean = shift.numpy() + d
    invstd = 1.0 / np.sqrt(var + eps)
    return _Stats(n, mean, invstd), var


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
        num_batches_tracked.add_(1)
    if momentum is None:
        factor = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    else:
        factor = momentum
    n = stats.count
    unbiased = var * (n / (n - 1))
    with torch.no_grad():
        running_mean.lerp_(torch.from_numpy(stats.mean).to(running_mean.dtype), factor)
        running_var.lerp_(torch.from_numpy(unbiased).to(running_var.dtype), factor)


def _forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    shift: torch.Tensor,
    eps: float,
    momentum: Optional[float],
    comm: Communicator,
) -> tuple[torch.Tensor, torch.Tensor, _Layout, _Stats]:
    """Shared forward: returns output, the kernel-dtype input, its layout and the stats."""
    x, layout = _layout(x)
    xk = _to_kernel(x, layout)
    stats, var = _global_stats(xk, layout, shift, eps, comm)
    if stats.count == 0:
        return _empty_like(x, layout), xk, layout, stats
    _update_running(running_mean, running_var, num_batches_tracked, momentum, stats, var)
    # The next call's common shift is this call's global mean: identical on
    # every rank (it comes out of the allreduce) and close to the next batch's
    # mean, which keeps the shifted sums free of cancellation.
    # (A non-finite mean, from NaN/Inf input, must not poison later calls.)
    finite = np.isfinite(stats.mean)
    shift.numpy()[finite] = stats.mean[finite]
    yk = _empty_like(xk, layout)
    _kernels.normalize(_view(xk, layout), stats.mean, stats.invstd, _vec(weight), _vec(bias),
                       _view(yk, layout), torch.get_num_threads())
    y = yk if yk.dtype == x.dtype else yk.to(x.dtype)
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
        shift: torch.Tensor,
        eps: float,
        momentum: Optional[float],
        comm: Communicator,
    ) -> torch.Tensor:
        y, xk, layout, stats = _forward(x, weight, bias, running_mean, running_var,
                                        num_batches_tracked, shift, eps, momentum, comm)
        # The input is saved as given when the kernels read it directly; a
        # float16/bfloat16 input is saved in its own dtype and widened again
        # in backward, so the saved activation costs no more than torch's.
        ctx.save_for_backward(xk if xk.dtype == x.dtype else x, weight)
        ctx.layout, ctx.stats, ctx.comm = layout, stats, comm
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        layout: _Layout = ctx.layout
        stats: _Stats = ctx.stats
        comm: Communicator = ctx.comm
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        C = x.shape[1]
        if stats.count == 0:
            # every rank saw a global count of 0 and skips the collective alike
            return (torch.zeros_like(grad_out) if need_x else None,
                    torch.zeros(C, dtype=weight.dtype) if need_w else None,
                    torch.zeros(C, dtype=ctx.bias_dtype) if need_b else None,
                    *([None] * 7))
        xk = _to_kernel(x, layout)
        dyk = _to_kernel(grad_out, layout)
        buf = torch.empty(2 * C, dtype=torch.float64)
        b = buf.numpy()
        xv, dyv = _view(xk, layout), _view(dyk, layout)
        nt = torch.get_num_threads()
        _kernels.backward_reduce(dyv, xv, stats.mean, b, nt)
        # parameter gradients are local sums, taken before the buffer is reduced
        grad_w = torch.from_numpy(b[C:] * stats.invstd).to(weight.dtype) if need_w else None
        grad_b = torch.from_numpy(b[:C].copy()).to(ctx.bias_dtype) if need_b else None
        grad_x = None
        if need_x:
            comm.allreduce_(buf)
            dxk = _empty_like(xk, layout)
            _kernels.backward_input(dyv, xv, stats.mean, stats.invstd, _vec(weight),
                                    b[:C] / stats.count, b[C:] / stats.count,
                                    _view(dxk, layout), nt)
            grad_x = dxk if dxk.dtype == grad_out.dtype else dxk.to(grad_out.dtype)
        return (grad_x, grad_w, grad_b, *([None] * 7))


def sync_batch_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    shift: torch.Tensor,
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
