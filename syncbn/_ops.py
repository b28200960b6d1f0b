"""The layer's training step as ``torch.library`` operators: the path ``torch.compile`` traces.

Dynamo cannot trace what the eager path is made of (NumPy views of tensors,
Cython kernels, a Python communicator), so while compiling
:class:`~syncbn.SyncBatchNorm` calls these operators instead; each is opaque
to the compiler, which sees only its schema and its fake (shape-only)
implementation, and runs the same kernels as the eager path inside:

* ``syncbn::batch_stats``: local sums, the allreduce, the global mean and
  inverse standard deviation; updates the shift and the running statistics
  in place (they are its declared ``mutates_args``, and it has no gradient:
  it reads a detached input).
* ``syncbn::normalize``: ``(x - mean) * invstd * weight + bias``. Its
  gradient (``register_autograd``) is that of the whole batch norm: the
  statistics it is given are those of ``x`` over all ranks, so the gradient
  with respect to ``x`` includes their dependence on ``x``.
* ``syncbn::normalize_backward``: the weight and bias gradients (local,
  like any parameter gradient: the data-parallel wrapper averages them)
  and, from the allreduce of ``[sum dy, sum dy * (x - mean)]``, the input
  gradient.

Two operators forward, because a differentiable operator may not mutate
its inputs and the statistics step must; one backward (each operator call
costs tens of microseconds of dispatch).

An operator's arguments are tensors, scalars and strings, so the
communicator is named by a string: the layer's key in a registry of layers
(weakly held), whose communicator is resolved when the operator first runs,
not while tracing (resolving one can take collectives: the shared-memory
set-up).

The error rule of the eager path holds: input errors are raised by the
module before the first operator; a global count of 1 is raised by
``batch_stats`` after its allreduce, on every rank alike.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable, Optional, Protocol

import numpy as np
import torch

from . import _kernels
from ._group_passes import INVSTD, MEAN
from ._views import kernel_input, kernel_view
from .comm import Communicator, LocalCommunicator
from .function import LayerArgs, _param, batch_statistics

__all__ = ["LOCAL", "register", "sync_batch_norm"]


class CommunicatorOwner(Protocol):
    """What the registry holds: something with a lazily resolved communicator (the layer)."""

    @property
    def communicator(self) -> Communicator: ...


LOCAL = "local"
"""The key of this process alone (batch statistics in eval mode stay local)."""

_LOCAL_COMM = LocalCommunicator()
_OWNERS: dict[str, Callable[[], Optional[CommunicatorOwner]]] = {}
_numbers = itertools.count()


def register(owner: CommunicatorOwner) -> str:
    """A new key naming ``owner``'s communicator in the operators' arguments.

    The registry holds ``owner`` weakly and forgets the key when it is
    collected; a copy of a layer registers itself again (a key names one object).
    """
    key = f"layer{next(_numbers)}"
    _OWNERS[key] = weakref.ref(owner)
    weakref.finalize(owner, _OWNERS.pop, key, None)
    return key


def _communicator(key: str) -> Communicator:
    if key == LOCAL:
        return _LOCAL_COMM
    ref = _OWNERS.get(key)
    owner = None if ref is None else ref()
    if owner is None:
        raise RuntimeError(
            f"syncbn: expected the key of a live SyncBatchNorm layer (got {key!r}, "
            f"which names none; registered: {len(_OWNERS)})"
        )
    return owner.communicator


def _strided_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (a result of ``x``'s shape) with the strides ``torch.empty_like(x)``
    gives, which the fake implementations promise; a copy only for inputs the
    kernels could not read in place."""
    if t.stride() == x.stride():
        return t
    like = torch.empty_like(x, dtype=t.dtype)
    return t if like.stride() == t.stride() else like.copy_(t)


def _rows(stats: torch.Tensor) -> np.ndarray:
    """The (3, C) float64 statistics as the kernels read their rows."""
    return stats.contiguous().numpy()


# --------------------------------------------------------------------------- #
# forward                                                                      #
# --------------------------------------------------------------------------- #


@torch.library.custom_op(
    "syncbn::batch_stats",
    mutates_args=("shift", "running_mean", "running_var", "num_batches_tracked"),
    device_types="cpu",
)
def batch_stats(
    x: torch.Tensor,
    shift: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    eps: float,
    momentum: Optional[float],
    comm: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global statistics of the batch whose local part is ``x``: (stats, count).

    ``stats`` is (3, C) float64: mean, inverse standard deviation, biased
    variance (zeros when the global batch is empty); ``count`` a 0-dim
    float64 tensor, the values per channel over all ranks. Moves ``shift``
    (float64, common to all ranks) to the global mean and updates the running
    statistics, as :func:`syncbn.function.batch_statistics` does.
    """
    kx = kernel_input(x)
    args = LayerArgs(
        running_mean, running_var, num_batches_tracked, shift.numpy(), eps, momentum, _communicator(comm)
    )
    statistics = batch_statistics(kx.array, args, torch.get_num_threads())
    count = torch.tensor(statistics.global_count, dtype=torch.float64)
    if statistics.stats is None:
        return torch.zeros(3, x.shape[1], dtype=torch.float64), count
    return torch.from_numpy(statistics.stats), count


@batch_stats.register_fake
def _batch_stats_fake(
    x: torch.Tensor,
    shift: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    eps: float,
    momentum: Optional[float],
    comm: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return (x.new_empty((3, x.shape[1]), dtype=torch.float64), x.new_empty((), dtype=torch.float64))


@torch.library.custom_op("syncbn::normalize", mutates_args=(), device_types="cpu")
def normalize(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    stats: torch.Tensor,
    count: torch.Tensor,
    comm: str,
) -> torch.Tensor:
    """``(x - mean) * invstd * weight + bias`` with ``stats`` and ``count`` from
    ``batch_stats`` of this ``x``; ``comm`` is the backward's communicator."""
    kx = kernel_input(x)
    rows = _rows(stats)
    out = kx.layout.new(kx.strides, kx.dtype)
    _kernels.normalize(
        kx.array, rows[MEAN], rows[INVSTD], _param(weight), _param(bias), out.array, torch.get_num_threads()
    )
    y = out.tensor if out.tensor.dtype == x.dtype else out.tensor.to(x.dtype)
    return _strided_like(y, x)


@normalize.register_fake
def _normalize_fake(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    stats: torch.Tensor,
    count: torch.Tensor,
    comm: str,
) -> torch.Tensor:
    return torch.empty_like(x)


# --------------------------------------------------------------------------- #
# backward                                                                     #
# --------------------------------------------------------------------------- #


@torch.library.custom_op("syncbn::normalize_backward", mutates_args=(), device_types="cpu")
def normalize_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    count: torch.Tensor,
    comm: str,
    input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm's gradients: (input, weight, bias).

    The weight and bias gradients (float64, C each) are local sums, like any
    parameter gradient. The input gradient takes the allreduce of the local
    ``[sum dy, sum dy * (x - mean)]`` over ``comm``; without ``input_grad``
    neither is done and the first result is empty (every rank decides alike:
    whether the input needs a gradient is a property of the model).
    """
    C = x.shape[1]
    kx = kernel_input(x)
    dy = kernel_view(grad_out, kx.layout, kx.dtype)
    rows = _rows(stats)
    num_threads = torch.get_num_threads()
    sums, grad_weight, grad_bias = np.empty(2 * C), np.empty(C), np.empty(C)
    _kernels.backward_reduce(
        dy, kx.array, rows[MEAN], sums, num_threads, rows[INVSTD], grad_weight, grad_bias
    )
    grads = torch.from_numpy(grad_weight), torch.from_numpy(grad_bias)
    n = float(count)
    if not input_grad:
        return (x.new_empty(0), *grads)
    if n == 0:
        # every rank saw a global count of 0 and skips the collective alike
        return (torch.zeros_like(x), *grads)
    communicator = _communicator(comm)
    if communicator.size > 1:  # (a group of one has no one to wait for)
        communicator.allreduce_array_(sums)
    out = kx.layout.new(kx.strides, kx.dtype)
    # (backward_input takes the reduced sums and divides them by the count)
    _kernels.backward_input(
        dy, kx.array, rows[MEAN], rows[INVSTD], _param(weight), sums[:C], sums[C:], out.array, num_threads, n
    )
    dx = out.tensor if out.tensor.dtype == x.dtype else out.tensor.to(x.dtype)
    return (_strided_like(dx, x), *grads)


@normalize_backward.register_fake
def _normalize_backward_fake(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    count: torch.Tensor,
    comm: str,
    input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    C = x.shape[1]
    return (
        torch.empty_like(x) if input_grad else x.new_empty(0),
        x.new_empty(C, dtype=torch.float64),
        x.new_empty(C, dtype=torch.float64),
    )


def _normalize_setup(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[
        torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, torch.Tensor, str
    ],
    output: torch.Tensor,
) -> None:
    x, weight, bias, stats, count, comm = inputs
    # torch saves None for an absent weight; its annotation names Tensor only
    ctx.save_for_backward(x, weight, stats, count)  # type: ignore[arg-type]
    ctx.comm = comm  # type: ignore[attr-defined]
    ctx.weight_dtype = None if weight is None else weight.dtype  # type: ignore[attr-defined]
    ctx.bias_dtype = None if bias is None else bias.dtype  # type: ignore[attr-defined]


def _normalize_backward(
    ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
) -> tuple[Optional[torch.Tensor], ...]:
    x, weight, stats, count = ctx.saved_tensors  # type: ignore[attr-defined]
    need_x, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
    grad_x, grad_weight, grad_bias = normalize_backward(grad_out, x, weight, stats, count, ctx.comm, need_x)  # type: ignore[attr-defined]
    return (
        grad_x if need_x else None,
        grad_weight.to(ctx.weight_dtype) if need_w else None,  # type: ignore[attr-defined]
        grad_bias.to(ctx.bias_dtype) if need_b else None,  # type: ignore[attr-defined]
        None,
        None,
        None,
    )


normalize.register_autograd(_normalize_backward, setup_context=_normalize_setup)


def sync_batch_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    shift: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    eps: float,
    momentum: Optional[float],
    comm: str,
) -> torch.Tensor:
    """:func:`syncbn.function.sync_batch_norm` through the operators: what dynamo traces.

    ``shift`` (float64) and the running statistics are updated in place;
    ``comm`` is a key from :func:`register` (or :data:`LOCAL`).
    """
    stats, count = batch_stats(
        x.detach(), shift, running_mean, running_var, num_batches_tracked, eps, momentum, comm
    )
    out: torch.Tensor = normalize(x, weight, bias, stats, count, comm)
    return out
