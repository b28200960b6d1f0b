"""The autograd function of synchronized batch normalization, and its statistics step.

Forward: local sums (kernel) -> one allreduce of ``[sum(C), sumsq(C), count]``
-> global mean and biased variance (kernel) -> normalize (kernel).
Backward: local ``[sum dy, sum dy*(x-mean)]`` (kernel) -> one allreduce ->
input gradient (kernel). Weight and bias gradients stay local: like any
parameter gradient, the data-parallel wrapper averages them. A group of one
process does each pass in one kernel call. The passes of a larger group are
syncbn/_group_passes.py's.

A training call goes through the C++ node of syncbn/_cpp_node.cpp instead
when it was built (see syncbn/_cpp_node_loader.py): the same kernels and passes,
without the Python autograd function around them; calls the node cannot
take come here.

Every rank must issue the same collectives in the same order, so nothing in
this file may raise on one rank only between entering the first collective
and leaving the last: errors that depend on local data are raised by the
module before the forward allreduce; errors that depend on global values
(the global count) are raised after it, on every rank alike.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable
from torch.autograd.graph import increment_version

from . import _kernels
from ._cpp_node_loader import NODE
from ._group_passes import (
    INVSTD,
    MEAN,
    RunningViews,
    check_count,
    global_statistics,
    group_backward,
)
from ._views import (
    KERNEL_DTYPES,
    KernelInput,
    KernelTensor,
    LayerArrays,
    kernel_input,
    kernel_view,
    new_vector,
)
from .comm import Communicator

__all__ = [
    "BatchStatistics",
    "LayerArgs",
    "SyncBatchNormActFunction",
    "SyncBatchNormFunction",
    "batch_statistics",
    "needs_grad",
    "normalize_with_running_stats",
    "sync_batch_norm",
]


class LayerArgs(NamedTuple):
    """What a call needs besides the input and the affine parameters
    (nothing here is differentiated)."""

    running_mean: torch.Tensor | None  # updated in place, or None: no update
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None  # counts the batches; momentum None needs it
    shift: np.ndarray  # float64 (C,), common to all ranks; becomes this call's global mean
    eps: float
    momentum: float | None  # None: cumulative moving average
    comm: Communicator
    activation: int = 0  # a kernel activation code (_kernels.ACT_*), applied after the residual
    negative_slope: float = 0.01  # of leaky_relu
    # the layer's kept views of its parameters and buffers; None: views made per call
    arrays: LayerArrays | None = None


class BatchStatistics(NamedTuple):
    """The global batch's statistics."""

    global_count: float  # values per channel over all ranks
    stats: np.ndarray | None  # (3, C) float64: mean, invstd, biased variance; None if count is 0


def _param(t: torch.Tensor | None) -> np.ndarray | None:
    """A per-channel parameter as the kernels take it: a view of a float32 or
    float64 tensor (no copy), a float64 copy of other dtypes."""
    if t is None:
        return None
    if t.dtype in KERNEL_DTYPES:
        return t.numpy(force=True)
    return t.detach().to(torch.float64).numpy()


def _layer_param(args: LayerArgs, name: str, t: torch.Tensor | None) -> np.ndarray | None:
    """:func:`_param` of the layer's tensor ``name``, through its kept views when it has them."""
    if t is None or args.arrays is None or t.dtype not in KERNEL_DTYPES:
        return _param(t)
    return args.arrays.of(name, t)


def _running_views(args: LayerArgs) -> RunningViews | None:
    """NumPy views of the running statistics and the batch counter (float64
    copies of float16 / bfloat16 buffers, written back by :func:`_running_done`),
    or None: no update."""
    if args.running_mean is None or args.running_var is None:
        return None
    mean = _layer_param(args, "running_mean", args.running_mean)
    var = _layer_param(args, "running_var", args.running_var)
    assert mean is not None and var is not None
    batches = args.num_batches_tracked
    if batches is None:
        return RunningViews(mean, var, None)
    arrays = args.arrays
    return RunningViews(
        mean, var, batches.numpy() if arrays is None else arrays.of("num_batches_tracked", batches)
    )


def _running_done(args: LayerArgs, views: RunningViews) -> None:
    """After ``finish_stats`` wrote the running statistics through NumPy: what
    a torch in-place op would do (bump the version counters), and the copy
    back of float16 / bfloat16 buffers."""
    mean, var, batches = args.running_mean, args.running_var, args.num_batches_tracked
    assert mean is not None and var is not None
    if mean.dtype not in KERNEL_DTYPES:
        mean.copy_(torch.from_numpy(views.mean))
    if var.dtype not in KERNEL_DTYPES:
        var.copy_(torch.from_numpy(views.var))
    increment_version((mean, var) if batches is None else (mean, var, batches))


def batch_statistics(x: np.ndarray, args: LayerArgs, num_threads: int) -> BatchStatistics:
    """The global count and statistics of the batch whose local part is ``x``
    (a kernel view), as :func:`global_statistics` computes them; moves the
    shift to the global mean and updates the running statistics."""
    stats = np.empty((3, args.shift.shape[0]))
    running = _running_views(args)
    count = global_statistics(x, args.shift, args.eps, stats, running, args.momentum, args.comm, num_threads)
    if count == 0:
        return BatchStatistics(0.0, None)
    if running is not None:
        _running_done(args, running)
    return BatchStatistics(count, stats)


class _Forward(NamedTuple):
    """What the forward computed, and what its backward reuses."""

    output: torch.Tensor
    input: KernelInput  # what the kernels read: the input itself unless it was copied
    statistics: BatchStatistics
    weight_view: np.ndarray | None
    # the pre-activation bn(x) + residual, kept when the activation's
    # derivative needs it (not only its output); in the kernels' dtype
    preactivation: torch.Tensor | None = None


class _FusedOutput(NamedTuple):
    """The kernels' keyword arguments of the residual and the activation, and
    the tensor that receives the pre-activation (when the backward needs it)."""

    kwargs: dict[str, Any]
    preactivation: KernelTensor | None


def _fused_output(
    residual: torch.Tensor | None, activation: int, negative_slope: float, like: KernelInput
) -> _FusedOutput:
    """For a normalization of ``like`` (the kernels' input)."""
    if residual is None and activation == _kernels.ACT_NONE:
        return _FusedOutput({}, None)
    layout, kernel_dtype = like.layout, like.dtype
    kwargs: dict[str, Any] = {"activation": activation, "negative_slope": negative_slope}
    if residual is not None:
        kwargs["residual"] = kernel_view(residual, layout, kernel_dtype)
    preactivation = None
    if not _kernels.activation_uses_output(activation, negative_slope):
        preactivation = layout.new(like.strides, kernel_dtype)
        kwargs["preact"] = preactivation.array
    return _FusedOutput(kwargs, preactivation)


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    args: LayerArgs,
    residual: torch.Tensor | None = None,
) -> _Forward:
    kx = kernel_input(x)
    num_threads = torch.get_num_threads()
    if args.comm.size == 1:
        return _forward_alone(x, kx, weight, bias, args, num_threads, residual)
    statistics = batch_statistics(kx.array, args, num_threads)
    weight_view = _layer_param(args, "weight", weight)
    stats = statistics.stats
    if stats is None:
        return _Forward(torch.empty_like(x), kx, statistics, weight_view)
    out = kx.layout.new(kx.strides, kx.dtype)
    fused = _fused_output(residual, args.activation, args.negative_slope, kx)
    _kernels.normalize(
        kx.array,
        stats[MEAN],
        stats[INVSTD],
        weight_view,
        _layer_param(args, "bias", bias),
        out.array,
        num_threads,
        **fused.kwargs,
    )
    y = out.tensor.to(x.dtype) if kx.widened else out.tensor
    preactivation = None if fused.preactivation is None else fused.preactivation.tensor
    return _Forward(y, kx, statistics, weight_view, preactivation)


def _forward_alone(
    x: torch.Tensor,
    kx: KernelInput,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    args: LayerArgs,
    num_threads: int,
    residual: torch.Tensor | None,
) -> _Forward:
    """The forward of a group of one process: nothing to wait for between the
    statistics and the normalization, so one kernel call does both, channel
    by channel, while each channel's values are in cache."""
    C = args.shift.shape[0]
    count = float(kx.array.size // C) if C else 0.0
    check_count(count, kx.array)
    weight_view = _layer_param(args, "weight", weight)
    if count == 0:
        return _Forward(torch.empty_like(x), kx, BatchStatistics(0.0, None), weight_view)
    stats = np.empty((3, C))
    running = _running_views(args)
    out = kx.layout.new(kx.strides, kx.dtype)
    fused = _fused_output(residual, args.activation, args.negative_slope, kx)
    _kernels.local_forward(
        kx.array,
        weight_view,
        _layer_param(args, "bias", bias),
        args.eps,
        out.array,
        stats,
        next_shift=args.shift,
        running_mean=None if running is None else running.mean,
        running_var=None if running is None else running.var,
        factor=args.momentum,
        num_batches_tracked=None if running is None else running.batches,
        num_threads=num_threads,
        **fused.kwargs,
    )
    if running is not None:
        _running_done(args, running)
    y = out.tensor.to(x.dtype) if kx.widened else out.tensor
    preactivation = None if fused.preactivation is None else fused.preactivation.tensor
    return _Forward(y, kx, BatchStatistics(count, stats), weight_view, preactivation)


def normalize_with_running_stats(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    activation: int,
    negative_slope: float,
) -> torch.Tensor:
    """Evaluation without autograd: ``activation(bn(x) + residual)`` with the
    running statistics, in one kernel pass (nothing communicated)."""
    kx = kernel_input(x)
    mean = running_mean.detach().to(torch.float64).numpy()
    invstd = (running_var.detach().to(torch.float64) + eps).rsqrt_().numpy()
    out = kx.layout.new(kx.strides, kx.dtype)
    fused = _fused_output(residual, activation, negative_slope, kx)
    _kernels.normalize(
        kx.array,
        mean,
        invstd,
        _param(weight),
        _param(bias),
        out.array,
        torch.get_num_threads(),
        **fused.kwargs,
    )
    return out.tensor if out.tensor.dtype == x.dtype else out.tensor.to(x.dtype)


class _Saved:
    """What the backward needs besides the saved tensors (named, on ``ctx``)."""

    __slots__ = (
        "activation",
        "bias_dtype",
        "comm",
        "input_dtype",
        "input_view",
        "kernel_dtype",
        "layout",
        "negative_slope",
        "statistics",
        "strides",
        "weight_view",
    )

    def __init__(
        self, forward: _Forward, x: torch.Tensor, bias: torch.Tensor | None, args: LayerArgs
    ) -> None:
        kx = forward.input
        kernel_dtype = kx.dtype
        # the kernels' view of the input, when the input saved is that tensor
        self.input_view: np.ndarray | None = None if kx.widened else kx.array
        self.weight_view = forward.weight_view
        self.layout = kx.layout
        self.strides = kx.strides
        self.statistics = forward.statistics
        self.comm = args.comm
        self.activation = args.activation
        self.negative_slope = args.negative_slope
        self.input_dtype = x.dtype if kx.widened else kernel_dtype
        self.kernel_dtype = kernel_dtype
        self.bias_dtype = None if bias is None else bias.dtype


def _vector_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes a parameter's gradient in (float64 for dtypes
    the kernels do not take: converted after)."""
    return torch.float32 if dtype == torch.float32 else torch.float64


def _grad_vector(dtype: torch.dtype, C: int) -> tuple[np.ndarray, torch.Tensor]:
    """A new (C,) parameter gradient: the array a kernel writes, and the tensor
    over it, of dtype ``_vector_dtype(dtype)``."""
    grad = new_vector(C, _vector_dtype(dtype))
    return grad.array, grad.tensor


def _new_grad(saved: _Saved) -> KernelTensor:
    """A new gradient of the input's shape, with the strides of the tensor the kernels read."""
    return saved.layout.new(saved.strides, saved.kernel_dtype)


def _as(t: torch.Tensor | None, have: torch.dtype | None, want: torch.dtype | None) -> torch.Tensor | None:
    """``t`` (None, or of dtype ``have``: known, so not read back) in dtype ``want``."""
    return t if t is None or want is None or have == want else t.to(want)


def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    # (the saved tensors are also autograd's check that none was modified in place)
    x, weight, activation_saved = ctx.saved_tensors
    saved: _Saved = ctx.saved
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    fused = len(ctx.needs_input_grad) == 5  # (x, weight, bias, residual, args)
    need_r = fused and ctx.needs_input_grad[3]
    C = x.shape[1]
    stats = saved.statistics.stats
    if stats is None:
        # every rank saw a global count of 0 and skips the collective alike
        zero_grads = (
            torch.zeros_like(grad_out, dtype=saved.input_dtype) if need_x else None,
            torch.zeros(C, dtype=weight.dtype) if need_w else None,
            torch.zeros(C, dtype=saved.bias_dtype) if need_b else None,
        )
        residual_grad = (torch.zeros_like(grad_out, dtype=saved.input_dtype) if need_r else None,)
        return (*zero_grads, *(residual_grad if fused else ()), None)
    layout, kernel_dtype = saved.layout, saved.kernel_dtype
    x_view = saved.input_view if saved.input_view is not None else kernel_view(x, layout, kernel_dtype)
    dy_view = kernel_view(grad_out, layout, kernel_dtype)
    num_threads = torch.get_num_threads()
    # parameter gradients are local sums, written before the buffer is reduced
    weight_dtype = None if weight is None else weight.dtype
    gw, grad_w = _grad_vector(weight_dtype, C) if need_w and weight_dtype is not None else (None, None)
    bias_dtype = saved.bias_dtype
    gb, grad_b = _grad_vector(bias_dtype, C) if need_b and bias_dtype is not None else (None, None)
    # The activation's gradient: dz = dy * activation'(z), written by the
    # reduction pass into dz (the residual's gradient too), which the input
    # gradient then reads instead of dy.
    activation: dict[str, Any] = {}
    grad_r = grad_out if need_r else None
    dz: KernelTensor | None = None
    if saved.activation != _kernels.ACT_NONE:
        dz = _new_grad(saved)
        grad_r = dz.tensor if need_r else None
        activation = {
            "activation": saved.activation,
            "negative_slope": saved.negative_slope,
            "saved": kernel_view(activation_saved, layout, kernel_dtype),
            "grad_preact": dz.array,
        }
    # the input gradient overwrites dz when nothing else needs it
    dx = (dz if dz is not None and not need_r else _new_grad(saved)) if need_x else None
    # local_backward's arguments, which group_backward takes after the communicator
    arguments = (
        dy_view,
        x_view,
        stats[MEAN],
        stats[INVSTD],
        saved.weight_view,
        None if dx is None else dx.array,
        gw,
        gb,
        num_threads,
    )
    if saved.comm.size == 1:
        # a group of one: the reduction and the input gradient in one call
        _kernels.local_backward(*arguments, **activation)
    else:
        group_backward(saved.comm, *arguments, saved.statistics.global_count, **activation)
    input_dtype = saved.input_dtype
    grads = (
        _as(None if dx is None else dx.tensor, kernel_dtype, input_dtype),
        None if weight_dtype is None else _as(grad_w, _vector_dtype(weight_dtype), weight_dtype),
        None if bias_dtype is None else _as(grad_b, _vector_dtype(bias_dtype), bias_dtype),
    )
    if fused:
        # (the output gradient has the output's dtype, the input's)
        grad_residual = _as(grad_r, input_dtype if dz is None else kernel_dtype, input_dtype)
        return (*grads, grad_residual, None)
    return (*grads, None)


# The backward is NumPy and kernels: there is no graph to differentiate
# again. Under create_graph=True, once_differentiable makes a second
# differentiation raise; otherwise its wrapping costs for nothing.
_backward_once = once_differentiable(_backward)


def _save(
    ctx: Any,
    forward: _Forward,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    args: LayerArgs,
) -> None:
    """Save what the backward needs.

    The tensor the kernels read (the input itself, unless it needed a copy);
    a float16/bfloat16 input is saved as it came and widened again in
    backward, so it costs no more memory than torch's. With an activation,
    also what its derivative is computed from: the output (as torch's relu
    saves it) or the pre-activation (as torch's silu saves its input). The
    saved tensors are autograd's check that none of them changed in place
    before the backward, which reuses their views.
    """
    activation_saved = None
    if args.activation != _kernels.ACT_NONE:
        activation_saved = forward.output if forward.preactivation is None else forward.preactivation
    ctx.save_for_backward(x if forward.input.widened else forward.input.tensor, weight, activation_saved)
    ctx.saved = _Saved(forward, x, bias, args)


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with statistics summed over ``args.comm``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        args: LayerArgs,
    ) -> torch.Tensor:
        # (One argument for everything not differentiated: Function.apply costs per argument.)
        forward = _forward(x, weight, bias, args)
        _save(ctx, forward, x, weight, bias, args)
        return forward.output

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            return _backward_once(ctx, grad_out)
        return _backward(ctx, grad_out)


class SyncBatchNormActFunction(SyncBatchNormFunction):
    """:class:`SyncBatchNormFunction` followed by ``+ residual`` and the
    activation ``args.activation``, in the same kernel passes. The backward
    is inherited: it tells the two apart by the number of inputs."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        args: LayerArgs,
    ) -> torch.Tensor:
        forward = _forward(x, weight, bias, args, residual)
        _save(ctx, forward, x, weight, bias, args)
        return forward.output


def needs_grad(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None
) -> bool:
    """Whether autograd records a call on these tensors."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    )


def sync_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    args: LayerArgs,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch norm with batch statistics summed over ``args.comm``; updates the
    running statistics; then ``+ residual`` and the activation ``args.activation``.

    Args:
        x: input ``(N, C, *)``, already validated by the caller.
        weight, bias: affine parameters ``(C,)`` or None.
        args: the running statistics, shift, eps, momentum, communicator and activation.
        residual: None, or a tensor of the input's shape and dtype (validated by the caller).

    Without autograd (``torch.no_grad()`` or nothing requiring grad) the
    forward issues its one allreduce and saves nothing.
    """
    fused = residual is not None or args.activation != _kernels.ACT_NONE
    out: torch.Tensor
    if NODE is not None and not torch._C._are_functorch_transforms_active():
        # the C++ node, unless the call needs the Python path
        taken = NODE.forward(
            x,
            weight,
            bias,
            residual,
            args.running_mean,
            args.running_var,
            args.num_batches_tracked,
            args.eps,
            args.momentum,
            args.shift,
            args.activation,
            args.negative_slope,
            None if args.comm.size == 1 else args.comm,
        )
        if taken is not None:
            return taken  # type: ignore[no-any-return]
    if not needs_grad(x, weight, bias, residual):
        return _forward(x, weight, bias, args, residual).output
    if torch._C._are_functorch_transforms_active():
        # (Function.apply explains that these functions do not support vmap and grad)
        if fused:
            out = SyncBatchNormActFunction.apply(x, weight, bias, residual, args)  # type: ignore[no-untyped-call]
        else:
            out = SyncBatchNormFunction.apply(x, weight, bias, args)  # type: ignore[no-untyped-call]
    elif fused:
        out = _APPLY_ACT(x, weight, bias, residual, args)
    else:
        out = _APPLY(x, weight, bias, args)
    return out


def _recording_apply(function: type[torch.autograd.Function]) -> Any:
    """``function.apply`` without its Python wrapper: autograd's own C++
    ``apply``, which runs the forward and records the backward node.

    The wrapper's work (binding default arguments for ``setup_context``,
    which these functions do not define; routing functorch transforms, which
    the caller does) is not needed here, and on the per-call path it costs:
    a cold call through it (caches evicted by the layer before, as in a
    network) measured about 40 us more than the direct one.
    """
    return super(torch.autograd.Function, function).apply  # type: ignore[misc]


_APPLY = _recording_apply(SyncBatchNormFunction)
_APPLY_ACT = _recording_apply(SyncBatchNormActFunction)
