"""``SyncBatchNorm``: the module that decides; ``function.py`` computes."""
from __future__ import annotations

import os
import weakref
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .comm import CommSpec, Communicator, LocalCommunicator, gather_values, get_communicator
from .function import sync_batch_norm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization with statistics over the whole distributed batch, on CPU.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training, the per-channel mean and biased variance are those of the
    global batch: the union of every rank's input, whatever its size. Each
    forward issues one allreduce of ``2C + 1`` float64 values
    (``[sum(x - s), sum((x - s)^2), count]`` with a per-channel shift ``s``
    common to all ranks), each backward one of ``2C`` values. In evaluation
    the running statistics are used and nothing is communicated.

    A drop-in replacement for :class:`torch.nn.SyncBatchNorm`: same
    constructor, parameters, buffers and ``state_dict`` keys, so checkpoints
    move both ways between it, ``torch.nn.SyncBatchNorm`` and
    ``torch.nn.BatchNorm1d/2d/3d``. Unlike it, it runs on CPU tensors and
    inside CPU :class:`~torch.nn.parallel.DistributedDataParallel` (it does not
    subclass ``torch.nn.SyncBatchNorm``, which DDP refuses on CPU).

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, +)`.
        eps: added to the variance for numerical stability. Default: 1e-5
        momentum: factor of the running statistics update; ``None`` for a
            cumulative moving average. Default: 0.1
        affine: learnable :math:`\gamma` and :math:`\beta`. Default: ``True``
        track_running_stats: keep running mean and variance for evaluation;
            if ``False``, batch statistics are used in evaluation too (local
            to each rank, without communication). Default: ``True``
        process_group: what the statistics are summed over: ``None`` or
            ``"auto"`` (torch.distributed if initialized, through shared
            memory when all its ranks are on this host; else MPI
            ``COMM_WORLD`` when launched with more than one rank; else this
            process alone), ``"torch"``, ``"mpi"``, ``"local"``, ``"shm"``, a
            ``torch.distributed.ProcessGroup``, an mpi4py communicator, or a
            :class:`syncbn.comm.Communicator`. Default: ``None``
        device, dtype: of the parameters and buffers (CPU only).
        debug: before every forward, check with one small collective that all
            ranks agree on this layer (channels, input dtype, train/eval, call
            count, order of construction) and raise the same error on every
            rank if not; eval-mode calls join that check too, and in training
            a second check precedes the backward collective. Every rank must
            then build the same SyncBatchNorm layers in the same order. Default: the environment variable
            ``SYNCBN_DEBUG`` (``1`` turns it on).

    Shape:
        - Input: :math:`(N, C, +)`, any rank >= 2; channels-last and
          channels-last-3d inputs are read in place, with no transposed copy.
        - Output: same shape, dtype and memory format as the input.

    Every rank must call every synchronized layer the same number of times,
    in the same order, in the same mode: a rank with no samples still calls
    it (with an empty batch) and joins the collectives.

    Examples::

        >>> # mpirun -n 4 python train.py   or   torchrun --nproc_per_node 4 train.py
        >>> bn = syncbn.SyncBatchNorm(64)
        >>> y = bn(torch.randn(8, 64, 32, 32))
        >>> model = syncbn.convert_sync_batchnorm(torchvision_model)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: CommSpec = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        debug: Optional[bool] = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group
        self._comm: Optional[Communicator] = None
        # Common shift of the statistics sums (see function.py); starts at
        # zero on every rank, then follows the global mean. Not a buffer: it
        # is derived state, kept out of state_dict for torch compatibility.
        self._shift = np.zeros(num_features)
        if debug is None:
            debug = os.environ.get("SYNCBN_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
        self.debug = debug
        self._calls = 0
        # Debug mode: the layer's number among those built on the same
        # process group in this process, equal on every rank that builds the
        # same model, so the check tells apart two layers of equal width.
        self._layer_index = _next_layer_index(process_group)

    @property
    def communicator(self) -> Communicator:
        """The communicator this layer sums over, resolved on first use."""
        if self._comm is None:
            self._comm = get_communicator(self.process_group)
        return self._comm

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "process_group":
            # a new group invalidates the resolved communicator
            self.__dict__["_comm"] = None
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        # the resolved communicator holds live handles (copy.deepcopy, pickle)
        state = super().__getstate__()
        state["_comm"] = None
        return state

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm: expected an input of at least 2 dimensions (N, C, ...) "
                f"(got {input.dim()}D input of shape {list(input.shape)})")

    def _check_input(self, input: torch.Tensor) -> None:
        # The rule for every error path: raise before any collective is
        # entered, or after one on every rank alike. These depend on local
        # input, so they come before the first allreduce; a rank that alone
        # gets a bad input then leaves the others waiting in it unless debug
        # mode (which compares the ranks first) or the launcher ends the job.
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm: expected input with {self.num_features} channels "
                f"(num_features) in dimension 1 (got {input.shape[1]}, input shape "
                f"{list(input.shape)})")
        if not input.is_floating_point():
            raise TypeError(
                "SyncBatchNorm: expected a floating-point input (float32, float64, "
                f"float16 or bfloat16) (got {input.dtype})")
        if not input.is_cpu:
            raise ValueError(
                f"SyncBatchNorm: expected a CPU tensor (got device {input.device}); "
                "for GPUs use torch.nn.SyncBatchNorm")

    def _check_agreement(self, input: torch.Tensor) -> None:
        """Debug mode: the same error on every rank when ranks disagree on this layer."""
        self._calls += 1
        self._check_fields(input.shape[1] if input.dim() >= 2 else -1,
                           _DTYPE_CODES.get(input.dtype, -1), _FORWARD, self._calls)

    def _check_fields(self, channels: int, dtype_code: int, phase: int, call: int) -> None:
        # The same fields, so the same buffer size, before forward and backward
        # collectives: a rank one collective ahead of the others meets a
        # check, never a statistics buffer.
        fields = {
            "layer (order of construction)": self._layer_index,
            "pass": phase,
            "num_features": self.num_features,
            "input channels": channels,
            "input dtype": dtype_code,
            "training": int(self.training),
            "calls of this layer": call,
        }
        comm = self.communicator
        table = gather_values(comm, [float(v) for v in fields.values()])
        differ = [name for k, name in enumerate(fields) if not bool((table[:, k] == table[0, k]).all())]
        if not differ:
            return
        lines = []
        for name in differ:
            k = list(fields).index(name)
            by_value: dict[float, list[int]] = {}
            for r in range(comm.size):
                by_value.setdefault(float(table[r, k]), []).append(r)
            shown = ", ".join(f"{_show(name, v)} on ranks {ranks}" for v, ranks in by_value.items())
            lines.append(f"  {name}: {shown}")
        raise RuntimeError(
            f"SyncBatchNorm({self.num_features}) consistency check failed on rank "
            f"{comm.rank} of {comm.size}: the ranks disagree on\n" + "\n".join(lines) +
            "\nEvery rank must call every synchronized layer the same number of times, in "
            "the same order and mode, with the same number of channels and dtype.")

    def _member(self, table: dict[str, Any], name: str) -> Any:
        """``getattr(self, name)`` for a parameter or buffer, straight from its
        table when it is there (Module.__getattr__ costs on the forward path);
        through getattr when something (a parametrization, weight norm) has
        taken it out."""
        return table[name] if name in table else getattr(self, name)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.debug:
            # before local validation, so that a bad input on one rank
            # raises on every rank instead of leaving the others waiting
            self._check_agreement(input)
        self._check_input(input)
        # Same decisions as torch.nn.modules.batchnorm._BatchNorm.forward.
        params, buffers = self._parameters, self._buffers
        weight, bias = self._member(params, "weight"), self._member(params, "bias")
        running_mean = self._member(buffers, "running_mean")
        running_var = self._member(buffers, "running_var")
        if not self.training:
            if running_mean is not None or running_var is not None:
                return F.batch_norm(input, running_mean, running_var, weight,
                                    bias, False, 0.0, self.eps)
            # Batch statistics in eval (track_running_stats=False) stay local,
            # like torch.nn.SyncBatchNorm; a scratch shift keeps the shared one
            # identical across ranks.
            return sync_batch_norm(input, weight, bias, None, None, None,
                                   self._shift.copy(), self.eps, self.momentum, _LOCAL)
        comm = self._comm if self._comm is not None else self.communicator
        if self.debug:
            comm = _CheckedBackward(self, comm, input.shape[1],
                                    _DTYPE_CODES.get(input.dtype, -1), self._calls)
        tracking = self.track_running_stats
        out = sync_batch_norm(
            input, weight, bias,
            running_mean if tracking else None,
            running_var if tracking else None,
            self._member(buffers, "num_batches_tracked") if tracking else None,
            self._shift, self.eps, self.momentum, comm)
        if isinstance(comm, _CheckedBackward):
            comm.forward_done = True
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", process_group={self.process_group!r}" if self.process_group is not None else "")

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_group: CommSpec = None) -> torch.nn.Module:
        """See :func:`syncbn.convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)


_LOCAL = LocalCommunicator()

_FORWARD, _BACKWARD = 1, 2


class _CheckedBackward(Communicator):
    """Debug mode: the layer's consistency check before each backward collective.

    Forward collectives pass straight through (the forward was checked before
    validation); once the forward is done, every allreduce is preceded by the
    same fixed-size check, so a rank that goes on to a backward while the
    others are in a forward raises on every rank instead of mixing buffers.
    """

    name = "debug"

    def __init__(self, layer: SyncBatchNorm, inner: Communicator, channels: int,
                 dtype_code: int, call: int) -> None:
        super().__init__()
        self._layer, self._inner = layer, inner
        self._fields = (channels, dtype_code, _BACKWARD, call)
        self.forward_done = False

    @property
    def rank(self) -> int:
        return self._inner.rank

    @property
    def size(self) -> int:
        return self._inner.size

    def _allreduce(self, buf: torch.Tensor) -> None:
        if self.forward_done:
            self._layer._check_fields(*self._fields)
        self._inner.allreduce_(buf)


# Debug mode's layer numbers: per process group (None or a name, or the
# group object itself, forgotten with it), the order of construction.
_LAYER_COUNTS: dict[Any, int] = {}
_LAYER_COUNTS_BY_OBJECT: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _next_layer_index(spec: CommSpec) -> int:
    counts: Any = _LAYER_COUNTS
    key: Any = spec
    if spec is not None and not isinstance(spec, str):
        try:
            _LAYER_COUNTS_BY_OBJECT.get(spec)
            counts = _LAYER_COUNTS_BY_OBJECT
        except TypeError:  # not weak-referenceable
            key = ("object", id(spec))
    index = counts.get(key, 0)
    counts[key] = index + 1
    return index

_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}


def _show(field: str, value: float) -> str:
    if field == "input dtype":
        names = {code: str(dt) for dt, code in _DTYPE_CODES.items()}
        return names.get(int(value), "not floating point")
    if field == "training":
        return "train" if value else "eval"
    if field == "pass":
        return "forward" if value == _FORWARD else "backward"
    return str(int(value))


def _copy_state(src: _BatchNorm, dst: _BatchNorm) -> None:
    """Make ``dst`` share ``src``'s parameters and buffers (the same objects)."""
    if src.affine:
        with torch.no_grad():
            dst.weight = src.weight
            dst.bias = src.bias
    dst.running_mean = src.running_mean
    dst.running_var = src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.training = src.training
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig


def convert_sync_batchnorm(module: torch.nn.Module,
                           process_group: CommSpec = None) -> torch.nn.Module:
    """Replace every batch-norm layer in ``module`` with :class:`SyncBatchNorm`.

    Every ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d,
    ``torch.nn.SyncBatchNorm``, lazy ones once initialized) becomes a
    ``syncbn.SyncBatchNorm`` that shares the original parameter and buffer
    objects and copies the training flag; other normalizations
    (InstanceNorm, GroupNorm, LayerNorm) are left alone.

    Args:
        module: the model, or a single layer.
        process_group: passed to every new layer (see :class:`SyncBatchNorm`).

    Returns:
        The converted module (``module`` itself, changed in place, unless it
        is a batch-norm layer).

    Example::

        >>> model = syncbn.convert_sync_batchnorm(model)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        _copy_state(module, out)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            out.add_module(name, new)
    return out


class _AnyRankBatchNorm(_BatchNorm):
    """Plain (unsynchronized) batch norm that accepts any input rank >= 2."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"expected an input of at least 2 dimensions (got {input.dim()}D input)")


def revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every :class:`SyncBatchNorm` (ours or torch's) with plain batch norm.

    For single-process inference or export: the new layers share the
    parameters and buffers and copy the training flag. They accept every
    input rank the synchronized layer did, so the same model runs unchanged.

    Returns:
        The reverted module (``module`` itself unless it is a sync layer).
    """
    out = module
    if isinstance(module, (SyncBatchNorm, torch.nn.SyncBatchNorm)):
        out = _AnyRankBatchNorm(module.num_features, module.eps, module.momentum,
                                module.affine, module.track_running_stats)
        _copy_state(module, out)
    for name, child in module.named_children():
        new = revert_sync_batchnorm(child)
        if new is not child:
            out.add_module(name, new)
    return out
