"""The training passes of a group of several processes, over the kernels' arrays.

A group of one process computes each pass in one kernel call
(``local_forward``, ``local_backward``). A larger group must reduce its
statistics between the kernel calls:

* forward: local sums (``local_stats``) -> one allreduce of
  ``[sum(C), sumsq(C), count]`` -> global statistics (``finish_stats``) ->
  ``normalize``;
* backward: local ``[sum dz, sum dz*(x-mean)]`` (``backward_reduce``, which
  also writes the parameter gradients: local sums) -> one allreduce -> input
  gradient (``backward_input``).

:func:`group_forward` and :func:`group_backward` take the arguments of
``local_forward`` and ``local_backward``, after the communicator, so that the
C++ node (syncbn/_cpp_node.cpp) calls either the same way; the Python
function (syncbn/function.py) calls them too. Both paths issue the same
collectives in the same order, so the ranks of one group may take different
paths.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _kernels
from .comm import Communicator

__all__ = ["INVSTD", "MEAN", "VAR", "RunningViews", "global_statistics", "group_backward", "group_forward"]

# rows of the (3, C) statistics
MEAN, INVSTD, VAR = 0, 1, 2


class RunningViews(NamedTuple):
    """The running statistics as ``finish_stats`` updates them: NumPy arrays."""

    mean: np.ndarray
    var: np.ndarray
    batches: np.ndarray | None  # the batch counter, one int64


def check_count(count: float, x: np.ndarray) -> None:
    """Training needs more than one value per channel in the global batch."""
    if count == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got a global "
            f"batch of 1 value per channel (local input of {x.size} values)"
        )


def global_statistics(
    x: np.ndarray,
    shift: np.ndarray,
    eps: float,
    stats: np.ndarray,
    running: RunningViews | None,
    momentum: float | None,
    comm: Communicator,
    num_threads: int,
) -> float:
    """The global count of the batch whose local part is ``x``; when it is not
    0, its statistics written to ``stats`` (3, C), the shift moved to the
    global mean and the running statistics updated.

    One allreduce; a second one only when the shift was so far from this
    batch's mean that the variance would lose its accuracy (``finish_stats``
    decides from reduced values, so on every rank alike).
    """
    C = shift.shape[0]
    sums = np.empty(2 * C + 1)
    _kernels.local_stats(x, shift, sums, num_threads)
    # Every rank joins, even with no samples: the others are waiting in this
    # same collective, and an empty shard contributes exact zeros. A group
    # of one has no one to wait for.
    alone = comm.size == 1
    if not alone:
        comm.allreduce_array_(sums)
    count = float(sums[2 * C])
    check_count(count, x)
    if count == 0:
        return 0.0
    update: dict[str, Any] = {
        # The next call's shift is this call's global mean: identical on every
        # rank (it comes out of the allreduce) and close to the next batch's
        # mean, which keeps the shifted sums free of cancellation.
        "next_shift": shift,
        "running_mean": None if running is None else running.mean,
        "running_var": None if running is None else running.var,
        "factor": momentum,  # None: finish_stats makes the cumulative average
        "num_batches_tracked": None if running is None else running.batches,
    }
    if _kernels.finish_stats(sums, shift, eps, stats, refine=True, **update):
        around = stats[MEAN].copy()
        _kernels.local_stats(x, around, sums, num_threads)
        if not alone:
            comm.allreduce_array_(sums)
        _kernels.finish_stats(sums, around, eps, stats, refine=False, **update)
    return count


def group_forward(
    comm: Communicator,
    x: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    out: np.ndarray,
    stats: np.ndarray,
    next_shift: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    factor: float | None,
    num_batches_tracked: np.ndarray | None,
    num_threads: int,
    **fused: Any,
) -> float:
    """``local_forward``'s work over ``comm``: the global statistics, then the
    normalization of ``x`` (with ``fused``: ``normalize``'s residual,
    activation, negative_slope and preact). Returns the global count; ``x``
    has values, so it is not 0."""
    running = None
    if running_mean is not None and running_var is not None:
        running = RunningViews(running_mean, running_var, num_batches_tracked)
    count = global_statistics(x, next_shift, eps, stats, running, factor, comm, num_threads)
    _kernels.normalize(x, stats[MEAN], stats[INVSTD], weight, bias, out, num_threads, **fused)
    return count


def group_backward(
    comm: Communicator,
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    weight: np.ndarray | None,
    out: np.ndarray | None,
    grad_weight: np.ndarray | None,
    grad_bias: np.ndarray | None,
    num_threads: int,
    global_count: float,
    **activation: Any,
) -> None:
    """``local_backward``'s work over ``comm`` (with ``activation``: its
    activation, negative_slope, saved and grad_preact). The parameter
    gradients are local sums, written before the buffer is reduced; without
    ``out`` (no input gradient) nothing is reduced."""
    C = mean.shape[0]
    sums = np.empty(2 * C)  # [sum dz, sum dz * (x - mean)]
    _kernels.backward_reduce(dy, x, mean, sums, num_threads, invstd, grad_weight, grad_bias, **activation)
    if out is None:
        return
    comm.allreduce_array_(sums)
    # dz = dy * activation'(z), written by the reduction pass
    dz = activation["grad_preact"] if activation else dy
    # (backward_input takes the reduced sums and divides them by the count)
    _kernels.backward_input(dz, x, mean, invstd, weight, sums[:C], sums[C:], out, num_threads, global_count)
